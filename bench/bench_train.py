"""Training benchmark: peftcli against what users would run instead, on the same work.

    make bench                                            # the CPU benchmark below
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py [--examples 160] [--no-scaling]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py --quick     # a smoke run, tiny model
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py --gpu       # bf16 LoRA + 4-bit QLoRA, 1B Llama shape

Three trainers, each in a fresh interpreter (`bench_trainers.py`) with the same thread count:
peftcli (`peftcli train` on a recipe written here), TRL's `SFTTrainer` with a LoRA
`peft_config` (prompt/completion data: completion-only loss), and a plain transformers
`Trainer` + PEFT script (prompt masked with -100, `DataCollatorForSeq2Seq` padding). Same
random-init Llama (written here, seed 0), same mixed-length data (generated here), same LoRA
(r 16, alpha 32, all linear layers, dropout 0), max length, batch, learning rate, schedule
(cosine, no warmup), optimizer (torch AdamW), seed, one epoch; fp32 on CPU. With packing
(peftcli `data.packing`, TRL `packing=True`) and without; the plain Trainer has no packing.

Writes `bench/results/cpu.{md,json,png}` (and `cpu-scaling.png`), or `gpu.{md,json}`, and
prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_workload as work  # noqa: E402

TRAINERS = ("peftcli", "trl", "trainer")
LABELS = {
    "peftcli": "peftcli",
    "trl": "TRL SFTTrainer",
    "trainer": "transformers Trainer",
    "plain": "plain loop (ceiling)",
}
RESULTS = HERE / "results"

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch's device name.
GPU_BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 (no bf16 support)
}


@dataclass
class Settings:
    shape: work.Shape = field(default_factory=work.Shape)
    data: work.DataSpec = field(default_factory=lambda: work.DataSpec(examples=160))
    eval_examples: int = 32
    max_length: int = 512
    batch_size: int = 8
    lr: float = 2e-3
    r: int = 16
    alpha: int = 32
    epochs: int = 1
    seed: int = 0
    threads: int = 2
    precision: str = "fp32"
    tokenizer_vocab: int = 8192
    # Scaling: the same number of tokens per epoch at each length; widths on the mixed data.
    scaling_lengths: tuple[int, ...] = (128, 256, 512)
    scaling_tokens: int = 8192
    scaling_widths: tuple[int, ...] = (256, 512, 768)
    scaling_examples: int = 64


def quick_settings() -> Settings:
    return Settings(
        shape=work.Shape(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=176),
        data=work.DataSpec(examples=32, median=48, max_len=128),
        eval_examples=8,
        max_length=128,
        scaling_lengths=(64, 128),
        scaling_tokens=1024,
        scaling_widths=(64, 128),
        scaling_examples=16,
    )


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        out["peftcli"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return out


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": versions(),
    }


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return 0.0


def cpu_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, threshold: float, log: Any) -> float:
    """Wait (polling each minute, at most `limit_s`) until the 1-minute load is below `threshold`."""
    deadline = time.monotonic() + limit_s
    while (load := loadavg()) >= threshold and time.monotonic() < deadline:
        log(f"bench: 1-minute load {load:.2f} >= {threshold}; waiting for a quiet machine")
        time.sleep(min(60.0, max(1.0, deadline - time.monotonic())))
    return loadavg()


# --------------------------------------------------------------------------- children


def child_env(threads: int, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PEFTCLI_HOME": str(home / "peftcli-home"),  # a cold data cache per run
        "HF_DATASETS_CACHE": str(home / "datasets-cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
    }


def run_child(argv: list[str], folder: Path, threads: int, timeout: float = 1800) -> dict[str, Any]:
    """Run a child with its output in folder/log.txt; returns its rusage and the machine's load."""
    folder.mkdir(parents=True, exist_ok=True)
    busy, started = cpu_busy_seconds(), time.perf_counter()
    with open(folder / "log.txt", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads, folder))
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    own_cpu = usage.ru_utime + usage.ru_stime
    after = cpu_busy_seconds()
    others = None
    if busy is not None and after is not None:
        # CPU that other processes used while this one ran, as a share of the machine.
        others = max(0.0, (after - busy - own_cpu) / (wall * (os.cpu_count() or 1)))
    return {
        "returncode": proc.returncode,
        "child_wall_s": wall,
        "child_cpu_s": own_cpu,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB; the child's own peak, everything included
        "others_cpu_share": others,
    }


def run_trainer(cfg: dict[str, Any], folder: Path, log: Any) -> dict[str, Any]:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cfg = {**cfg, "out": str(folder)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    label = f"{cfg['trainer']}{' packed' if cfg['packing'] else ''} ({Path(cfg['model']).name})"
    log(f"bench: {label}: training (1-minute load {loadavg():.2f})")
    proc = run_child(
        [
            sys.executable,
            str(HERE / "bench_trainers.py"),
            str(folder / "config.json"),
            str(folder / "result.json"),
        ],
        folder,
        cfg["threads"],
    )
    result = {"trainer": cfg["trainer"], "packing": cfg["packing"], "model": Path(cfg["model"]).name}
    if proc["returncode"] != 0 or not (folder / "result.json").is_file():
        tail = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-15:]
        log(f"bench: {label} failed (exit {proc['returncode']}):\n  " + "\n  ".join(tail))
        return {**result, **proc, "error": tail[-1] if tail else f"exit {proc['returncode']}"}
    child = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    child["peak_rss_mib"] = proc.pop("peak_rss_mib")  # the parent's view includes everything to exit
    result = {**result, **child, **proc}
    log(
        f"bench: {label}: {result['train_s']:.1f}s/epoch, "
        f"{result['supervised_tokens'] / result['train_s']:.0f} supervised tok/s, "
        f"peak heap {result.get('peak_heap_mib') or 0:.0f} MiB, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB, eval loss {result.get('eval_loss') or float('nan'):.4f}"
    )
    return result


def measure_matmul_peak(threads: int, folder: Path, dtype: str = "float32", size: int = 2048) -> float:
    """FLOP/s of a large square matmul in a child with the same threads: the best of several."""
    code = f"""
import json, sys, time, torch
torch.set_num_threads({threads})
dev = "cuda" if torch.cuda.is_available() and "{dtype}" == "bfloat16" else "cpu"
a = torch.randn({size}, {size}, device=dev, dtype=torch.{dtype})
b = torch.randn({size}, {size}, device=dev, dtype=torch.{dtype})
best = 0.0
for i in range(12):
    if dev == "cuda": torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(4): a @ b
    if dev == "cuda": torch.cuda.synchronize()
    best = max(best, 4 * 2 * {size} ** 3 / (time.perf_counter() - t))
json.dump({{"flops": best}}, open(sys.argv[1], "w"))
"""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "peak.json"
    proc = run_child([sys.executable, "-c", code, str(out)], folder, threads, timeout=600)
    if proc["returncode"] != 0:
        raise SystemExit(f"bench: measuring the matmul peak failed; see {folder / 'log.txt'}")
    return json.loads(out.read_text())["flops"]


# --------------------------------------------------------------------------- the work


@dataclass
class Work:
    folder: Path
    tokenizer: Path
    models: dict[str, Path]
    data: dict[str, Path]
    stats: dict[str, Any]


def prepare_work(settings: Settings, folder: Path, log: Any, widths: bool = True) -> Work:
    tok_dir = folder / "tokenizer"
    tokenizer = work.build_tokenizer(tok_dir, settings.tokenizer_vocab, settings.seed)
    models, data, stats = {}, {}, {}
    shapes = [settings.shape]
    if widths:
        shapes += [work.width_shape(h, settings.shape) for h in settings.scaling_widths]
    for shape in shapes:
        if shape.name not in models:
            log(f"bench: writing {shape.name} ({work.total_params(shape) / 1e6:.1f}M parameters)")
            models[shape.name] = work.build_model(folder / shape.name, shape, tok_dir)
    spec = replace(settings.data, max_len=settings.max_length, seed=settings.seed)
    data["train"] = folder / "train.jsonl"
    stats["train"] = work.write_data(data["train"], spec, tokenizer)
    data["eval"] = folder / "eval.jsonl"
    stats["eval"] = work.write_data(
        data["eval"], replace(spec, examples=settings.eval_examples, seed=spec.seed + 1), tokenizer
    )
    if widths:
        data["widths"] = folder / "widths.jsonl"
        stats["widths"] = work.write_data(
            data["widths"], replace(spec, examples=settings.scaling_examples), tokenizer
        )
        for length in settings.scaling_lengths:
            n = max(settings.batch_size, settings.scaling_tokens // length)
            name = f"length-{length}"
            data[name] = folder / f"{name}.jsonl"
            stats[name] = work.write_data(
                data[name], replace(spec, examples=n, fixed=length - 4, max_len=length), tokenizer
            )
    return Work(folder, tok_dir, models, data, stats)


def trainer_config(
    settings: Settings, trainer: str, model: Path, train: Path, packing: bool, **over: Any
) -> dict[str, Any]:
    cfg = {
        "trainer": trainer,
        "model": str(model),
        "train": str(train),
        "eval": None,
        "max_length": settings.max_length,
        "packing": packing,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "r": settings.r,
        "alpha": settings.alpha,
        "epochs": settings.epochs,
        "seed": settings.seed,
        "precision": settings.precision,
        "quantization": "none",
        "threads": settings.threads,
    }
    return {**cfg, **over}


# --------------------------------------------------------------------------- derived numbers


def derive(result: dict[str, Any], shape: work.Shape, r: int, peak: float) -> dict[str, Any]:
    """Throughput, padding and MFU from a run's raw counts."""
    if "error" in result:
        return result
    losses = result.get("losses") or []
    tail = losses[-max(1, len(losses) // 5) :]
    flops = work.flops_per_token(shape, r) * result["tokens"]
    return {
        **result,
        "supervised_tok_s": result["supervised_tokens"] / result["train_s"],
        "tok_s": result["tokens"] / result["train_s"],
        "padding_fraction": 1 - result["tokens"] / result["positions"] if result["positions"] else 0.0,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "model_flops": flops,
        "mfu": flops / result["train_s"] / peak,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each run against the best run of the same configuration (1.00 = the best)."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    fastest = min(r["train_s"] for r in ok)
    smallest = min(r["peak_rss_mib"] for r in ok)
    leanest = min((r["peak_heap_mib"] for r in ok if r.get("peak_heap_mib")), default=None)
    for r in ok:
        r["time_vs_best"] = r["train_s"] / fastest
        r["throughput_vs_best"] = fastest / r["train_s"]
        r["rss_vs_best"] = r["peak_rss_mib"] / smallest
        if leanest and r.get("peak_heap_mib"):
            r["heap_vs_best"] = r["peak_heap_mib"] / leanest


# --------------------------------------------------------------------------- report


def fmt(value: Any, spec: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def main_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    head = (
        "| data | trainer | epoch (s) | vs best | supervised tok/s | peak heap (MiB) | vs best | "
        "peak RSS (MiB) | padding | MFU | final train loss | eval loss | prep (s) | steps |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for config, rows in groups.items():
        for trainer in TRAINERS:
            r = next((x for x in rows if x["trainer"] == trainer), None)
            if r is None:
                lines.append(f"| {config} | {LABELS[trainer]} | n/a (no packing) |" + " |" * 11)
                continue
            if "error" in r:
                lines.append(f"| {config} | {LABELS[trainer]} | failed: {r['error'][:60]} |" + " |" * 11)
                continue
            lines.append(
                f"| {config} | {LABELS[trainer]} | {r['train_s']:.1f} | {r['time_vs_best']:.2f}× | "
                f"{r['supervised_tok_s']:.0f} | {fmt(r.get('peak_heap_mib'), '.0f')} | "
                f"{fmt(r.get('heap_vs_best'))}× | {r['peak_rss_mib']:.0f} | "
                f"{100 * r['padding_fraction']:.1f}% | {100 * r['mfu']:.1f}% | "
                f"{fmt(r['final_train_loss'], '.4f')} | {fmt(r.get('eval_loss'), '.4f')} | "
                f"{r['prep_s']:.2f} | {r['steps']} |"
            )
    return head + "\n".join(lines) + "\n"


def scaling_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| sweep | value | trainer | epoch (s) | tokens | tok/s | peak heap (MiB) | peak RSS (MiB) | MFU |\n"
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for r in rows:
        label = LABELS[r["trainer"]] + (" (packed)" if r["packing"] else "")
        if "error" in r:
            lines.append(f"| {r['sweep']} | {r['value']} | {label} | failed | | | | | |")
            continue
        lines.append(
            f"| {r['sweep']} | {r['value']} | {label} | {r['train_s']:.1f} | {r['tokens']} | "
            f"{r['tok_s']:.0f} | {fmt(r.get('peak_heap_mib'), '.0f')} | {r['peak_rss_mib']:.0f} | "
            f"{100 * r['mfu']:.1f}% |"
        )
    return head + "\n".join(lines) + "\n"


def memory(mine: dict[str, Any], peers: Any, key: str) -> str:
    """`1234 vs 2345 MiB (lowest peer)`, or `n/a` where a run did not measure it."""
    theirs = [r[key] for r in peers if r.get(key)]
    if not mine.get(key) or not theirs:
        return "n/a"
    return f"{mine[key]:.0f} vs {min(theirs):.0f} MiB (lowest peer)"


def verdict(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Plain sentences: is peftcli as fast as the fastest peer, and packed faster than padded?"""
    out = []
    for config, rows in groups.items():
        ok = {r["trainer"]: r for r in rows if "error" not in r}
        if "peftcli" not in ok or len(ok) < 2:
            continue
        mine = ok.pop("peftcli")
        best = min(ok.values(), key=lambda r: r["train_s"])
        word = "faster than" if mine["train_s"] < best["train_s"] else "slower than"
        out.append(
            f"{config}: peftcli {mine['train_s']:.1f}s/epoch vs {LABELS[best['trainer']]} {best['train_s']:.1f}s "
            f"(peftcli {best['train_s'] / mine['train_s']:.2f}× the throughput, {word} the fastest peer); "
            f"peak heap {memory(mine, ok.values(), 'peak_heap_mib')}; "
            f"peak RSS {memory(mine, ok.values(), 'peak_rss_mib')}."
        )
    padded = [r for r in groups.get("padded", []) if "error" not in r and r["trainer"] != "peftcli"]
    packed = next(
        (r for r in groups.get("packed", []) if r["trainer"] == "peftcli" and "error" not in r), None
    )
    if padded and packed:
        best = min(padded, key=lambda r: r["train_s"])
        out.append(
            f"peftcli packed vs the fastest padded peer ({LABELS[best['trainer']]}): "
            f"{best['train_s'] / packed['train_s']:.2f}× the throughput; peak heap "
            f"{memory(packed, padded, 'peak_heap_mib')}; peak RSS {memory(packed, padded, 'peak_rss_mib')}."
        )
    losses = [r["eval_loss"] for rows in groups.values() for r in rows if r.get("eval_loss") is not None]
    if losses:
        out.append(
            f"Eval loss after one epoch: {min(losses):.4f} to {max(losses):.4f} across all runs "
            f"(spread {max(losses) - min(losses):.4f})."
        )
    return out


def chart(groups: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"peftcli": "#1f77b4", "trl": "#ff7f0e", "trainer": "#2ca02c"}
    configs = list(groups)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    width = 0.26
    for panel, (key, label) in enumerate(
        (
            ("train_s", "seconds per epoch (lower is better)"),
            ("peak_heap_mib", "peak heap (live malloc), MiB (lower is better)"),
            ("peak_rss_mib", "peak RSS, MiB (lower is better)"),
        )
    ):
        ax = axes[panel]
        for i, trainer in enumerate(TRAINERS):
            xs, ys = [], []
            for j, config in enumerate(configs):
                r = next((x for x in groups[config] if x["trainer"] == trainer and "error" not in x), None)
                if r is not None and r.get(key):
                    xs.append(j + (i - 1) * width)
                    ys.append(r[key])
            bars = ax.bar(xs, ys, width, label=LABELS[trainer], color=colors[trainer])
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        for j, config in enumerate(configs):
            if not any(x["trainer"] == "trainer" for x in groups[config]):
                ax.text(j + width, 0, "n/a", ha="center", va="bottom", fontsize=8, color=colors["trainer"])
        ax.set_xticks(range(len(configs)), configs)
        ax.set_title(label, fontsize=10)
        ax.margins(y=0.15)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    ax = axes[3]
    for config, style in zip(configs, ("-", "--"), strict=False):
        for r in groups[config]:
            if "error" in r or not r.get("losses"):
                continue
            n = len(r["losses"])
            steps = [(i + 1) / n for i in range(n)]
            ax.plot(
                steps,
                r["losses"],
                style,
                color=colors[r["trainer"]],
                label=f"{LABELS[r['trainer']]}, {config}",
                lw=1.2,
            )
    ax.set_xlabel("epoch (padded runs coincide: same batches, same math)")
    ax.set_title("train loss per supervised token, per optimizer step", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling_chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"peftcli": "#1f77b4", "trl": "#ff7f0e", "trainer": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, sweep, xlabel in (
        (axes[0], "length", "sequence length (tokens), same tokens per epoch"),
        (axes[1], "width", "model width (hidden size)"),
    ):
        for trainer in TRAINERS:
            pts = sorted(
                (r["value"], r["train_s"])
                for r in rows
                if r["sweep"] == sweep and r["trainer"] == trainer and "error" not in r
            )
            if pts:
                packed = any(r["packing"] for r in rows if r["sweep"] == sweep and r["trainer"] == trainer)
                ax.plot(
                    *zip(*pts, strict=True),
                    "o-",
                    color=colors[trainer],
                    label=LABELS[trainer] + (" (packed)" if packed else ""),
                )
                for x, y in pts:
                    ax.annotate(
                        f"{y:.1f}s",
                        (x, y),
                        textcoords="offset points",
                        xytext=(0, 6),
                        ha="center",
                        fontsize=8,
                    )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per epoch")
        ax.set_xticks(sorted({r["value"] for r in rows if r["sweep"] == sweep}))
        ax.margins(y=0.2)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CPU


def run_cpu(args: argparse.Namespace) -> int:
    settings = quick_settings() if args.quick else Settings()
    if args.examples:
        settings.data = replace(settings.data, examples=args.examples)
    if args.threads:
        settings.threads = args.threads
    out_dir = Path(args.out)
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="peftcli-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    scaling = not args.no_scaling
    work_ = prepare_work(settings, folder, log, widths=scaling)
    quiet_start = wait_quiet(args.max_wait, args.quiet_load, log)
    log(f"bench: starting at 1-minute load {quiet_start:.2f} ({settings.threads} threads)")
    peak = measure_matmul_peak(settings.threads, folder / "peak")
    log(f"bench: fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")

    main_model = work_.models[settings.shape.name]
    groups: dict[str, list[dict[str, Any]]] = {"padded": [], "packed": []}
    for config, packing in (("padded", False), ("packed", True)):
        for trainer in TRAINERS:
            if trainer == "trainer" and packing:
                continue
            cfg = trainer_config(
                settings, trainer, main_model, work_.data["train"], packing, eval=str(work_.data["eval"])
            )
            result = run_trainer(cfg, folder / "runs" / f"{trainer}-{config}", log)
            groups[config].append(derive(result, settings.shape, settings.r, peak))
        add_ratios(groups[config])

    scaling_rows: list[dict[str, Any]] = []
    if scaling:
        best_peer = min(
            (r for rows in groups.values() for r in rows if r["trainer"] != "peftcli" and "error" not in r),
            key=lambda r: r["train_s"],
            default=None,
        )
        entrants = [("peftcli", True)]
        if best_peer is not None and not args.no_scaling_peer:
            entrants.append((best_peer["trainer"], best_peer["packing"]))
        for trainer, packing in entrants:
            for length in settings.scaling_lengths:
                cfg = trainer_config(
                    settings, trainer, main_model, work_.data[f"length-{length}"], packing, max_length=length
                )
                r = run_trainer(cfg, folder / "runs" / f"{trainer}-length-{length}", log)
                scaling_rows.append(
                    {"sweep": "length", "value": length, **derive(r, settings.shape, settings.r, peak)}
                )
            for hidden in settings.scaling_widths:
                shape = work.width_shape(hidden, settings.shape)
                cfg = trainer_config(
                    settings, trainer, work_.models[shape.name], work_.data["widths"], packing
                )
                r = run_trainer(cfg, folder / "runs" / f"{trainer}-width-{hidden}", log)
                scaling_rows.append({"sweep": "width", "value": hidden, **derive(r, shape, settings.r, peak)})

    report = {
        "machine": machine(),
        "command": args.command,
        "settings": {**asdict(settings), "shape": work.shape_dict(settings.shape)},
        "data": work_.stats,
        "matmul_peak_flops": peak,
        "flops_per_token": work.flops_per_token(settings.shape, settings.r),
        "flops_formula": work.FLOPS_FORMULA,
        "load_at_start": quiet_start,
        "quiet_load": args.quiet_load,
        "load_at_end": loadavg(),
        "total_s": time.perf_counter() - started,
        "groups": groups,
        "scaling": scaling_rows,
        "verdict": verdict(groups),
    }
    text = render_cpu(report, quick=args.quick)
    if not args.no_write:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = "cpu-quick" if args.quick else "cpu"
        (out_dir / f"{stem}.json").write_text(
            json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8"
        )
        (out_dir / f"{stem}.md").write_text(text, encoding="utf-8")
        chart(
            groups,
            out_dir / f"{stem}.png",
            f"LoRA r={settings.r} on {settings.shape.name} ({work.total_params(settings.shape) / 1e6:.0f}M), {report['machine']['cpu']}, {settings.threads} threads, fp32",
        )
        if scaling_rows:
            scaling_chart(scaling_rows, out_dir / f"{stem}-scaling.png", "Scaling: seconds per epoch")
        log(f"bench: wrote {out_dir / stem}.md/.json/.png")
    print(text)
    if not args.workdir and not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if all("error" not in r for rows in groups.values() for r in rows) else 1


def render_cpu(report: dict[str, Any], quick: bool = False) -> str:
    s, m, d = report["settings"], report["machine"], report["data"]["train"]
    shape = s["shape"]
    load = report["load_at_start"]
    others = [
        r.get("others_cpu_share")
        for rows in report["groups"].values()
        for r in rows
        if r.get("others_cpu_share") is not None
    ]
    quiet = (
        f"1-minute load {load:.2f} at the start (waited for < {report.get('quiet_load', 0.5)}); other processes used at most "
        f"{100 * max(others):.0f}% of the CPU during any run"
        if others
        else f"1-minute load {load:.2f} at the start"
    )
    lines = [
        "# Training benchmark: CPU" + (" (quick smoke run, tiny model)" if quick else ""),
        "",
        f"`{report['command']}` — {m['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {quiet}. "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".",
        "",
        f"Work (the same for every trainer): a random-init Llama ({shape['hidden']} wide, {shape['layers']} layers, "
        f"{shape['heads']} heads, FFN {shape['intermediate']}, vocabulary {shape['vocab']} — "
        f"{shape['params'] / 1e6:.1f}M parameters), LoRA r={s['r']} alpha={s['alpha']} on every linear layer "
        f"(dropout 0), {d['examples']} prompt/completion examples of {d['min']}-{d['max']} tokens "
        f"(median {d['median']}, mean {d['mean']}, p90 {d['p90']}; {d['supervised_tokens']} of "
        f"{d['tokens']} tokens supervised), max length {s['max_length']}, batch {s['batch_size']}, lr {s['lr']} "
        f"cosine without warmup, torch AdamW, one epoch, fp32, {s['threads']} threads, seed {s['seed']}; "
        f"eval loss on {report['data']['eval']['examples']} held-out examples.",
        "",
        main_table(report["groups"]),
        "Epoch = the training loop alone (first to last optimizer step), without model loading and data "
        "preparation; prep = tokenising (and packing) the training data. vs best = against the best run of the "
        "same data layout (1.00× is the best). Peak heap = the most memory malloc held live at once "
        "(glibc `mallinfo2`, sampled every 10 ms): what the trainer needed, without what the allocator kept "
        "after frees. Peak RSS = the child process's `ru_maxrss` (Python, libraries, weights, data and "
        "training): on top of the heap, glibc keeps freed blocks below its dynamic mmap threshold (up to 32 "
        "MiB each) for reuse, which varies from run to run by hundreds of MiB; `MALLOC_MMAP_THRESHOLD_=131072` "
        "brings RSS down to the heap at some speed cost. Padding = padded positions / all positions fed to the model. Final train "
        "loss = mean per-token loss of the last fifth of the steps.",
        "",
        f"MFU = model FLOPs / epoch time / the measured fp32 matmul peak "
        f"({report['matmul_peak_flops'] / 1e9:.1f} GFLOP/s: a 2048² `torch.matmul`, same threads). "
        f"{report['flops_formula']}: {report['flops_per_token'] / 1e6:.1f} MFLOP per token here.",
        "",
        "## Verdict",
        "",
        *[f"- {v}" for v in report["verdict"]],
        "",
        "## What each trainer does",
        "",
        "- **peftcli**: `peftcli train` on the recipe in `bench_trainers.peftcli_recipe`. Packing: first-fit "
        "rows of up to max length, position ids restarting per example (transformers derives the "
        "block-diagonal causal mask from them), batches of rows padded to the longest row.",
        "- **TRL SFTTrainer**: prompt/completion data (completion-only loss), `peft_config=LoraConfig(...)`. "
        "TRL's defaults `gradient_checkpointing=True` and `bf16=True` are turned off so every trainer does the "
        "same work. `packing=True` uses TRL's default `bfd` strategy: best-fit-decreasing rows of max length, "
        "then *padding-free* batches — each batch's rows are concatenated into one sequence with restarting "
        "position ids and no attention mask (no padding at all). Without FlashAttention (CPU: SDPA) the whole "
        "flattened batch is one attention problem with a block-diagonal mask, so attention costs grow with "
        "(batch × max length)² rather than batch × max length². TRL also computes the loss with its chunked "
        "`log_probs` LM head (logits are recomputed in backward) and logs entropy and token accuracy.",
        "- **transformers Trainer**: the hand-written script (`bench_trainers.run_trainer`): tokenise "
        "prompt + completion + EOS, label the prompt -100, truncate, `DataCollatorForSeq2Seq` padding to the "
        "longest in the batch. It has no packing (n/a).",
        "",
        "All three train the same weights from the same LoRA initialisation (`set_seed` before wrapping), and "
        "without packing they see the same batches in the same order, so their per-step losses agree to float "
        "noise: the same math.",
    ]
    if report["scaling"]:
        lines += [
            "",
            "## Scaling",
            "",
            "Sequence length: every example exactly that long, the same number of tokens per epoch at each length "
            f"({s['scaling_tokens']}), batch {s['batch_size']}, max length = the length. Width: the mixed data "
            f"({report['data']['widths']['examples']} examples), {shape['layers']} layers, heads of 64, FFN ≈ 2.75× "
            "width. Each trainer in its fastest layout from the table above.",
            "",
            scaling_table(report["scaling"]),
        ]
    lines += ["", f"Total benchmark time {report['total_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- GPU


def partial_rows(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The rows so far, in `gpu-partial.json`: what a run cut short by its time limit leaves."""
    if not args.no_write:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        text = json.dumps({"rows": rows}, indent=2, default=str) + "\n"
        (Path(args.out) / "gpu-partial.json").write_text(text, encoding="utf-8")


def plain_row(settings: Settings, model: Path, folder: Path, log: Any) -> dict[str, Any]:
    """The plain loop's ceiling on the same shape: dense batches of batch × max length."""
    cfg = trainer_config(settings, "plain", model, folder / "train.jsonl", False, plain_steps=20)
    return run_trainer(cfg, folder / "runs" / "plain-lora-dense", log)


def qlora_8b_rows(
    settings: Settings, tok_dir: Path, folder: Path, peak: float, log: Any
) -> list[dict[str, Any]]:
    """QLoRA on a Llama-3.1-8B shape, peftcli against TRL, packed (each one's fastest layout)."""
    import torch

    shape = work.LLAMA_8B
    log(f"bench: writing {shape.name} ({work.total_params(shape) / 1e9:.2f}B parameters, bf16)")
    model = work.build_model(folder / shape.name, shape, tok_dir, device="cuda", dtype="bfloat16")
    torch.cuda.empty_cache()
    big = replace(settings, shape=shape, batch_size=4)
    rows = []
    for trainer in ("peftcli", "trl"):
        cfg = trainer_config(big, trainer, model, folder / "train-8b.jsonl", True, quantization="4bit")
        r = run_trainer(cfg, folder / "runs" / f"{trainer}-qlora-8b-packed", log)
        rows.append({"method": "qlora", "shape": "8B", **derive(r, shape, big.r, peak)})
    return rows


def run_gpu(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        print("bench --gpu: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "bench --gpu: no CUDA GPU found (torch.cuda.is_available() is False); run it on a machine with an "
            "NVIDIA GPU and a CUDA build of torch (`make setup TORCH_SPEC=torch`), or drop --gpu for the CPU benchmark",
            file=sys.stderr,
        )
        return 2
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    name = torch.cuda.get_device_name(0)
    settings = Settings(
        shape=work.LLAMA_1B,
        data=work.DataSpec(examples=args.examples or 512, median=200, max_len=1024),
        eval_examples=32,
        max_length=1024,
        batch_size=8,
        lr=2e-4,
        precision="bf16",
        threads=os.cpu_count() or 1,
    )
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="peftcli-bench-gpu-"))
    started = time.perf_counter()
    tok_dir = folder / "tokenizer"
    tokenizer = work.build_tokenizer(tok_dir, settings.tokenizer_vocab)
    log(
        f"bench: writing {settings.shape.name} ({work.total_params(settings.shape) / 1e9:.2f}B parameters, bf16)"
    )
    model = work.build_model(
        folder / settings.shape.name, settings.shape, tok_dir, device="cuda", dtype="bfloat16"
    )
    torch.cuda.empty_cache()
    spec = replace(settings.data, max_len=settings.max_length)
    stats = {"train": work.write_data(folder / "train.jsonl", spec, tokenizer)}
    stats["eval"] = work.write_data(
        folder / "eval.jsonl", replace(spec, examples=settings.eval_examples, seed=1), tokenizer
    )
    stats["train-8b"] = work.write_data(
        folder / "train-8b.jsonl", replace(spec, examples=128, seed=2), tokenizer
    )
    measured = measure_matmul_peak(settings.threads, folder / "peak", dtype="bfloat16", size=8192)
    known = next((v for k, v in GPU_BF16_PEAK_TFLOPS.items() if k.lower() in name.lower()), None)
    peak = known * 1e12 if known else measured
    log(f"bench: {name}: bf16 matmul {measured / 1e12:.0f} TFLOP/s measured, {known or '?'} TFLOP/s spec")

    rows = [
        {"method": "lora", "shape": "1B", **derive(r, settings.shape, settings.r, peak)}
        for r in [plain_row(settings, model, folder, log)]
    ]
    for quant in ("none", "4bit"):
        for trainer in TRAINERS:
            for packing in (False, True):
                if trainer == "trainer" and packing:
                    continue
                cfg = trainer_config(
                    settings,
                    trainer,
                    model,
                    folder / "train.jsonl",
                    packing,
                    quantization=quant,
                    eval=str(folder / "eval.jsonl"),
                )
                tag = (
                    f"{trainer}-{'qlora' if quant == '4bit' else 'lora'}-{'packed' if packing else 'padded'}"
                )
                r = run_trainer(cfg, folder / "runs" / tag, log)
                rows.append(
                    {
                        "method": "qlora" if quant == "4bit" else "lora",
                        "shape": "1B",
                        **derive(r, settings.shape, settings.r, peak),
                    }
                )
                partial_rows(args, rows)
    if not args.no_8b:
        rows += qlora_8b_rows(settings, tok_dir, folder, peak, log)
    lines = [
        "# Training benchmark: GPU",
        "",
        f"`{args.command}` — {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        f"{name}; bf16 peak {peak / 1e12:.0f} TFLOP/s ({'spec sheet' if known else 'measured'}; "
        f"measured bf16 matmul {measured / 1e12:.0f} TFLOP/s). "
        + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        f"Model: random-init {settings.shape.name} (Llama-3.2-1B shape, {work.total_params(settings.shape) / 1e9:.2f}B "
        f"parameters); LoRA r={settings.r} on every linear layer; bf16 autocast; QLoRA = NF4 + double quant, "
        f"bf16 compute. {stats['train']['examples']} examples of {stats['train']['min']}-{stats['train']['max']} tokens "
        f"(median {stats['train']['median']}), max length {settings.max_length}, batch {settings.batch_size}, one epoch.",
        "",
        "| shape | method | data | trainer | epoch (s) | supervised tok/s | tok/s | peak GPU memory (GiB) | padding | MFU | eval loss |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        data = "dense" if r["trainer"] == "plain" else "packed" if r["packing"] else "padded"
        if "error" in r:
            lines.append(
                f"| {r['shape']} | {r['method']} | {data} | {LABELS[r['trainer']]} | failed: {r['error'][:60]} | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['shape']} | {r['method']} | {data} | {LABELS[r['trainer']]} | {r['train_s']:.1f} | {r['supervised_tok_s']:.0f} | "
            f"{r['tok_s']:.0f} | {r.get('cuda_peak_bytes', 0) / 2**30:.2f} | {100 * r['padding_fraction']:.1f}% | "
            f"{100 * r['mfu']:.1f}% | {fmt(r.get('eval_loss'), '.4f')} |"
        )
    lines += [
        "",
        "Plain loop: `get_peft_model` + LoRA, bf16 autocast, dense random batches of batch × max length, "
        "the model's own loss over every position, AdamW (`bench_trainers.run_plain`): the ceiling. 8B: "
        "a random-init Llama-3.1-8B shape, QLoRA, packed, batch 4, each trainer's fastest layout.",
        f"MFU: {work.FLOPS_FORMULA}; peak GPU memory = `torch.cuda.max_memory_allocated`.",
        "",
    ]
    text = "\n".join(lines)
    out_dir = Path(args.out)
    if not args.no_write:
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {
            "device": name,
            "peak_flops": peak,
            "measured_flops": measured,
            "settings": asdict(settings),
            "data": stats,
            "rows": rows,
            "total_s": time.perf_counter() - started,
        }
        (out_dir / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        (out_dir / "gpu.md").write_text(text, encoding="utf-8")
    print(text)
    if not args.workdir and not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- CLI


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--gpu", action="store_true", help="bf16 LoRA and 4-bit QLoRA on a 1B Llama shape (needs CUDA)"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run on a tiny model (seconds per trainer)")
    p.add_argument("--no-8b", action="store_true", help="--gpu: skip the Llama-3.1-8B-shape QLoRA rows")
    p.add_argument(
        "--examples", type=int, default=None, help="training examples (default 160 on CPU, 512 on GPU)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads in every child (default 2)")
    p.add_argument("--no-scaling", action="store_true", help="skip the sequence-length and width sweeps")
    p.add_argument(
        "--no-scaling-peer", action="store_true", help="sweep peftcli only, not also the fastest peer"
    )
    p.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine first")
    p.add_argument("--quiet-load", type=float, default=0.5, help="1-minute load average counted as quiet")
    p.add_argument("--out", default=str(RESULTS), help="where results go (default bench/results)")
    p.add_argument("--workdir", default=None, help="keep the model, data and runs here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    given = " ".join(argv if argv is not None else sys.argv[1:])
    # Allocator settings reach every child (and change its RSS): part of the command.
    env = "".join(f"{k}={v} " for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    if os.environ.get("MAKELEVEL"):  # run by `make bench`
        args.command = env + "make bench" + (f" BENCH_ARGS='{given}'" if given else "")
    else:
        args.command = f"{env}HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train.py {given}".rstrip()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return run_gpu(args) if args.gpu else run_cpu(args)


if __name__ == "__main__":
    sys.exit(main())
