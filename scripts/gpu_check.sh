#!/usr/bin/env bash
# The GPU check of issue 25, in one go on a CUDA machine (within 8 minutes on an H100/H200):
#   1. an environment: the machine's own Python with its torch (a CUDA build), transformers,
#      accelerate, peft and typer, plus the wheels carried in .whl/ (`make gpu-wheels` fetches
#      them on a machine with an index: bitsandbytes with its CUDA 13 libraries only, datasets,
#      trl, pydantic and what they need), in a venv ($GPU_CHECK_VENV, default .venv-gpu) that
#      `make` then uses;
#   2. `make test-gpu`;
#   3. `make bench BENCH_ARGS=--gpu`: LoRA and QLoRA on a Llama-3.2-1B shape (peftcli, TRL, the
#      transformers Trainer, and the plain loop's ceiling), QLoRA on a Llama-3.1-8B shape (peftcli
#      vs TRL); bench/results/gpu.json and gpu.md (copied to $OUT when it is set).
#
#   scripts/gpu_check.sh             # the whole check
#   scripts/gpu_check.sh --dry-run   # steps 1 and the import checks, then stops before the first
#                                    # CUDA call (tested on CPU: tests/test_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY_RUN=0
[[ "${1:-}" == "--dry-run" || -n "${GPU_CHECK_DRY_RUN:-}" ]] && DRY_RUN=1
PYTHON=${PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
EXAMPLES=${GPU_CHECK_EXAMPLES:-256}
RESULTS=${GPU_CHECK_RESULTS:-bench/results}
say() { echo "gpu_check: $*" >&2; }
started=$SECONDS

# 1. The environment. The carried wheels go into a folder of their own, listed before the
# machine's site-packages, so they win over an older copy there.
"$PYTHON" -m venv --without-pip --clear "$VENV"
VENV=$(cd "$VENV" && pwd)
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
carried="$VENV/carried"
mkdir -p "$carried"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$carried" "${wheels[@]}"
  say "installed ${#wheels[@]} carried wheels into $carried"
else
  say "no wheels in $WHEELS: using the packages $PYTHON has"
fi
{
  echo "$carried"
  echo "$ROOT"
  "$PYTHON" -c 'import site, sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))'
} > "$site/gpu-check.pth"
printf '#!%s\nimport sys\nfrom peftcli.cli import main\nsys.exit(main())\n' "$VENV/bin/python" > "$VENV/bin/peftcli"
chmod +x "$VENV/bin/peftcli"
touch "$VENV/.peftcli-installed"  # newer than the lock: `make` takes this venv as set up
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# Everything the check imports, with versions; none of it initialises CUDA.
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import peftcli, torch, transformers, peft, accelerate, bitsandbytes, datasets, trl, pydantic  # noqa: F401
names = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "trl", "pydantic", "typer"]
print("gpu_check: " + ", ".join(f"{n} {md.version(n)}" for n in names) + f"; peftcli from {peftcli.__file__}")
print(f"gpu_check: torch built for CUDA {torch.version.cuda}")
EOF
if ((DRY_RUN)); then
  say "dry run: the environment is ready in $VENV; stopping before the first CUDA call"
  say "would run: make test-gpu VENV=$VENV; make bench VENV=$VENV BENCH_ARGS='--gpu --examples $EXAMPLES --out $RESULTS'"
  exit 0
fi

# 2. and 3. On the GPU.
"$VENV/bin/python" -c 'import torch, sys; ok = torch.cuda.is_available(); print(f"gpu_check: {torch.cuda.get_device_name(0) if ok else \"no CUDA device\"}"); sys.exit(0 if ok else 3)'
status=0
bench_args=(--gpu --examples "$EXAMPLES" --out "$RESULTS")
if command -v make > /dev/null; then
  timeout 120 make test-gpu VENV="$VENV" || status=$?
else  # what `make test-gpu` runs (exit status 5, no test selected, is a pass)
  timeout 120 "$VENV/bin/python" -m pytest -q -m gpu || { rc=$?; ((rc == 5)) || status=$rc; }
fi
say "test-gpu: exit $status ($((SECONDS - started)) s so far)"
left=$((470 - (SECONDS - started)))
((left > 60)) || left=60
if command -v make > /dev/null; then
  timeout "$left" make bench VENV="$VENV" BENCH_ARGS="${bench_args[*]}" || status=$?
else
  timeout "$left" "$VENV/bin/python" bench/bench_train.py "${bench_args[@]}" || status=$?
fi
say "bench: exit $status ($((SECONDS - started)) s in all)"
if [[ -n "${OUT:-}" && -d "$RESULTS" ]]; then
  cp "$RESULTS"/gpu.json "$RESULTS"/gpu.md "$RESULTS"/gpu-partial.json "$OUT"/ 2>/dev/null || true
fi
exit $status
