"""Writing a GGUF file (llama.cpp, Ollama) from a merged transformers model and its tokenizer.

The `gguf` package (gguf-py, from llama.cpp) does the format: `GGUFWriter` lays out the header,
metadata and aligned tensor data; `get_tensor_name_map` names the tensors; `gguf.quants.quantize`
makes BF16 and Q8_0 blocks. Written here, as gguf-py has no converter from a transformers model
(llama.cpp's `convert_hf_to_gguf.py` is a script in its repository, not in the package): the
per-architecture metadata and tensor layouts (arch.py), the tokenizer metadata (vocab.py), which
tensors keep float32, and the write-beside-and-rename below.

`--type` sets the 2-D weight matrices' type (the file type); 1-D tensors (norms, biases) stay
float32, as llama.cpp's converter keeps them. Q8_0 needs rows of a multiple of 32 values; a
matrix whose rows are not is written float16, as llama.cpp's converter falls back.

OUT appears only once complete: the file is written as a hidden sibling (`.OUT.partial-PID`),
flushed to disk and renamed into place; a failure or Ctrl-C removes the sibling. A file peftcli
wrote carries the metadata key `peftcli.export`, which is what lets `--force` replace it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peftcli import outputs
from peftcli.errors import UserError

TYPES = ("f16", "bf16", "q8_0")
MARKER_KEY = "peftcli.export"
Q8_BLOCK = 32  # values per Q8_0 block (one float16 scale each)


def is_ours(path: Path) -> bool:
    """A GGUF file that peftcli wrote (it carries MARKER_KEY)."""
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader

        return MARKER_KEY in GGUFReader(path).fields
    except (OSError, ValueError, KeyError, IndexError):
        return False


def check_out(out: Path, overwrite: bool) -> None:
    outputs.check_file(out, "-o", overwrite, is_ours, "GGUF file")


def encode(name: str, data: Any, kind: str) -> tuple[Any, Any]:
    """(array, GGML type) of one tensor for `--type kind`."""
    import gguf
    import numpy as np

    types = gguf.GGMLQuantizationType
    if data.ndim < 2:
        return np.ascontiguousarray(data, dtype=np.float32), types.F32
    if kind == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(data, types.Q8_0), types.Q8_0
    if kind == "bf16":
        return gguf.quants.quantize(data, types.BF16), types.BF16
    return np.ascontiguousarray(data, dtype=np.float16), types.F16


def file_type(kind: str) -> int:
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}.get(
        kind, gguf.LlamaFileType.MOSTLY_Q8_0
    )


def fill(writer: Any, model: Any, tokenizer: Any, row: Any, vocab: Any, kind: str, info: dict) -> dict:
    """Metadata and tensors into `writer`; returns how many tensors each GGML type got."""
    import gguf

    from peftcli.export.arch import tensors
    from peftcli.export.vocab import add_tokenizer

    config = model.config
    writer.add_name(str(info.get("name") or row.model_type))
    writer.add_file_type(file_type(kind))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(MARKER_KEY, json.dumps(info, sort_keys=True))
    row.hparams(config, writer)
    eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    n_vocab = model.get_input_embeddings().weight.shape[0]
    add_tokenizer(writer, tokenizer, vocab, n_vocab, eos_ids)
    counts: dict[str, int] = {}
    for name, data in tensors(model, row):
        array, ggml_type = encode(name, data, kind)
        writer.add_tensor(name, array, raw_dtype=ggml_type)
        counts[ggml_type.name] = counts.get(ggml_type.name, 0) + 1
    return counts


def write(
    out: Path, model: Any, tokenizer: Any, row: Any, vocab: Any, kind: str, info: dict, overwrite: bool
) -> dict:
    """Write OUT whole or not at all; returns the tensor counts per GGML type."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = None
    try:
        try:
            writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[row.gguf_arch]])
            counts = fill(writer, model, tokenizer, row, vocab, kind, info)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
        outputs.follow_umask(tmp)
        check_out(out, overwrite)  # again: OUT may have appeared meanwhile
        os.replace(tmp, out)
        return counts
    finally:
        if writer is not None:
            writer.close()  # a no-op once closed; after a failure it lets go of the file
        tmp.unlink(missing_ok=True)
