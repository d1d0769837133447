"""`peftcli export RUN_OR_ADAPTER --to gguf -o OUT.gguf`: the fine-tuned model as one file for
llama.cpp and Ollama.

The adapter is merged first, in memory, exactly as `peftcli merge` merges it (peftcli.merging:
float32, a QLoRA/4-bit/8-bit base dequantized first); the merged model and the tokenizer the run
trained with (special tokens, chat template) go through peftcli.export. Everything that can be
refused is refused before the model is loaded: a method that does not merge, a task other than
causal language modelling, an architecture or tokenizer GGUF export does not write, an OUT that
is not peftcli's to replace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.errors import UserError, did_you_mean
from peftcli.tasks import TASKS

FORMATS = ("gguf",)


def export(
    path: Path,
    to: str,
    out: Path,
    kind: str = "f16",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    from peftcli.console import quiet_libraries, say
    from peftcli.export import gguf
    from peftcli.export.arch import arch_of
    from peftcli.export.vocab import check_tokenizer
    from peftcli.merging import load_tokenizer_of, merged_in_memory, open_sources, vllm_note_of
    from peftcli.model.load import load_config

    if to not in FORMATS:
        raise UserError(f"--to: `{to}` is not one of {', '.join(FORMATS)}{did_you_mean(to, FORMATS)}")
    if kind not in gguf.TYPES:
        raise UserError(
            f"--type: `{kind}` is not one of {', '.join(gguf.TYPES)}{did_you_mean(kind, gguf.TYPES)}"
        )
    out = out.expanduser()
    [source] = open_sources(
        [path],
        trust_remote_code,
        hint="a GGUF file holds one plain model; serve this adapter with PEFT instead "
        f"(PeftModel.from_pretrained), or `peftcli generate {path}`",
    )
    section = source.target.model
    if TASKS[section.task].vision:
        raise UserError(
            f"{path}: a vision-language model cannot be exported to GGUF: the file would hold the language "
            "model without its vision tower and projector",
            "use `peftcli merge` for a transformers model folder that loads with its processor",
        )
    if section.task != "causal_lm":
        raise UserError(
            f"{path}: a {section.task} model cannot be exported to GGUF; export writes causal language models",
            "use `peftcli merge` for a transformers model folder",
        )
    gguf.check_out(out, overwrite)
    quiet_libraries()
    row = arch_of(load_config(section), path)
    tokenizer = load_tokenizer_of(source)
    vocab = check_tokenizer(tokenizer, path)
    say(f"peftcli: merging the {source.method} adapter into {section.name_or_path} (float32)")
    model = merged_in_memory(source)
    info = {"source": str(path), "method": source.method, "base": section.name_or_path, "type": kind}
    info["name"] = Path(str(path)).expanduser().resolve().name
    counts = gguf.write(out, model, tokenizer, row, vocab, kind, info, overwrite)
    size = out.stat().st_size
    tensors = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    say(f"peftcli: wrote {out} ({row.gguf_arch.lower()}, {kind}, {size / 2**20:.1f} MiB; tensors: {tensors})")
    if note := vllm_note_of(source):
        say(note)
    return {"out": str(out), "type": kind, "arch": row.gguf_arch.lower(), "bytes": size, "tensors": counts}
