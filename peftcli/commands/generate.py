"""`peftcli generate`: one prompt through a run, an adapter or a (merged) model folder.

The prompt is built the way training built it: `--chat` renders it through the chat template
the run trained with (saved with its tokenizer in adapter/), otherwise it is tokenised as a
`completion` prompt (the tokenizer's BOS prefix, no EOS). The same data.Encoder does both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.console import say
from peftcli.data.images import image_inputs
from peftcli.errors import UserError
from peftcli.model.parts import LANGUAGE, part_of
from peftcli.recipe import DataSection
from peftcli.target import Target, labels_of, open_target, saved_tokenizer, target_tokenizer


def check_template(target: Target, tokenizer: Any) -> str | None:
    """A warning when the base model's chat template is no longer the one the run recorded
    (not when the recipe chose its own with data.chat_template)."""
    from peftcli.model.load import load_tokenizer

    if not saved_tokenizer(target):
        return None
    if target.recipe is not None and target.recipe.data.chat_template is not None:
        return None
    if load_tokenizer(target.model).chat_template == tokenizer.chat_template:
        return None
    return (
        f"peftcli: warning: the chat template of {target.model.name_or_path} differs from the one "
        f"recorded in {target.adapter} at training; using the recorded one"
    )


def prompt_ids(
    tokenizer: Any,
    prompt: str,
    task: str,
    chat: bool,
    system: str | None,
    section: DataSection | None = None,
    images: list[str] | None = None,
) -> list[int]:
    """Token ids of the prompt exactly as training rendered the prompt part of an example (the
    images, as absolute paths, before the prompt's text)."""
    from peftcli.data import Encoder

    # The tokenizer carries the template to use (the run saved its own with the adapter).
    section = (section or DataSection(train="--prompt")).model_copy(update={"chat_template": None})
    if task == "seq_cls":
        ids = tokenizer(prompt)["input_ids"]
        if not ids:  # an empty text, and a tokenizer that adds no [CLS]/[SEP]
            raise UserError(
                "--prompt is empty, and this classifier's tokenizer adds no tokens to it", "give a text"
            )
        return ids[: section.max_length - 1] + ids[-1:] if len(ids) > section.max_length else ids
    if chat:
        if not tokenizer.chat_template:
            raise UserError(
                "--chat needs a chat template, and this model's tokenizer has none", "drop --chat"
            )
        messages = [{"role": "system", "content": system}] if system is not None else []
        # The prompt part of a conversation whose (empty) answer is to be generated.
        content: Any = prompt
        if images:
            content = [*({"type": "image", "image": f} for f in images), {"type": "text", "text": prompt}]
        row = {
            "messages": [
                *messages,
                {"role": "user", "content": content},
                {"role": "assistant", "content": ""},
            ]
        }
        reference = Encoder(tokenizer, "messages", section, task).reference(row, "--prompt")
    else:
        row = {"prompt": prompt, "completion": ""}
        reference = Encoder(tokenizer, "completion", section, task).reference(row, "--prompt")
    assert reference is not None
    if not reference.prompt_ids:  # an empty prompt, and a tokenizer that adds no BOS (GPT-2)
        if tokenizer.bos_token_id is None:
            raise UserError(
                "--prompt is empty, and this model's tokenizer has no BOS token to start from",
                "give a prompt",
            )
        return [tokenizer.bos_token_id]  # what transformers' generate starts from without input
    return reference.prompt_ids


def load_target_model(target: Target, labels: list[str] | None) -> Any:
    """The base as the run loaded it (quantized if it was), with the adapter on top."""
    import torch

    from peftcli.model.load import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(target.model, device=device, labels=labels)
    if target.model.quantization == "none":
        model.to(device)
    if target.adapter is not None:
        from peftcli.methods.load import load_adapter

        model = load_adapter(model, target.adapter)
    return model.eval()


def learned_positions(model: Any) -> int | None:
    """How many positions a model with a learned absolute position table (GPT-2, BERT) has;
    None for rotary or relative positions (Llama, T5), which have no table to run off."""
    import torch

    limit = getattr(model.config, "max_position_embeddings", None)
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if part_of(name) != LANGUAGE:  # a vision tower's patch positions are not the text's
            continue
        if isinstance(module, torch.nn.Embedding) and ("pos" in last or last == "wpe"):
            if limit is None or module.num_embeddings == limit:
                return module.num_embeddings
    return None


def check_positions(model: Any, prompt_tokens: int, new_tokens: int, name: str) -> None:
    """Refuse a prompt (plus the tokens to generate, plus a prompt method's virtual tokens) that
    runs past the model's learned positions, where it would end in an IndexError."""
    limit = learned_positions(model)
    if limit is None:
        return
    config = getattr(model, "active_peft_config", None)
    virtual = config.num_virtual_tokens if getattr(config, "is_prompt_learning", False) else 0
    if prompt_tokens + virtual + new_tokens <= limit:
        return
    room = limit - virtual
    prefix = f" and {virtual} virtual tokens" if virtual else ""
    if prompt_tokens >= room or new_tokens == 0:
        raise UserError(
            f"--prompt is {prompt_tokens} tokens{prefix}, and {name} has {limit} positions",
            f"shorten the prompt to fewer than {room} tokens",
        )
    raise UserError(
        f"--prompt is {prompt_tokens} tokens{prefix}; with --max-new-tokens {new_tokens} that runs past "
        f"the {limit} positions of {name}",
        f"lower --max-new-tokens to {room - prompt_tokens} or shorten the prompt",
    )


def run_generate(
    path: Path,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
    system: str | None = None,
    trust_remote_code: bool = False,
    raw: bool = False,
    image: list[Path] | None = None,
) -> dict[str, Any]:
    """`{"prompt", "output", "template", "empty"}`; for classifiers `{"prompt", "label",
    "probabilities"}`. A run trained on chat data renders the prompt with its chat template
    unless `raw`; `chat` asks for the template on any model that has one."""
    import torch

    from peftcli.console import quiet_libraries
    from peftcli.training.evaluate import generate_answers

    if chat and raw:
        raise UserError("--chat and --raw contradict each other", "pick one")
    if system is not None and raw:
        raise UserError("--system needs the chat template, and --raw turns it off", "drop one of them")
    target = open_target(path, trust_remote_code)  # a wrong path is refused before the heavy libraries load
    task = target.model.task
    if chat and task == "seq_cls":
        raise UserError("--chat does not apply to a classifier: drop it to classify the raw text")
    images = check_images(image or [], task, raw)
    chat, why = prompt_style(target, chat, raw) if not images else (True, "--image")
    if system is not None and not chat:
        raise UserError("--system needs --chat (the system message goes into the chat template)")
    quiet_libraries()
    tokenizer = target_tokenizer(target)
    if task != "seq_cls":
        say(f"peftcli: prompt {'rendered with the chat template' if chat else 'used as plain text'} ({why})")
    if chat and (warning := check_template(target, tokenizer)):
        say(warning)
    section = target.recipe.data if target.recipe else None
    ids = prompt_ids(tokenizer, prompt, task, chat, system, section, images)
    labels = labels_of(target)
    model = load_target_model(target, labels)
    check_positions(model, len(ids), 0 if task == "seq_cls" else max_new_tokens, target.model.name_or_path)
    device = next(model.parameters()).device

    if task == "seq_cls":
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        probs = torch.softmax(logits, -1).tolist()
        names = labels or [str(i) for i in range(len(probs))]
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"prompt": prompt, "label": names[best], "probabilities": dict(zip(names, probs, strict=True))}

    if temperature == 0:
        output = generate_answers(model, tokenizer, [ids], max_new_tokens, images=[images])[0]
    else:
        from transformers import set_seed

        from peftcli.methods.generation import generate

        set_seed(seed)
        extra = image_inputs(tokenizer.processor, images, device) if images else {}
        with torch.no_grad():
            out = generate(
                model,
                torch.tensor([ids], device=device),
                torch.ones((1, len(ids)), dtype=torch.long, device=device),
                max_new_tokens,
                tokenizer.pad_token_id,
                model_inputs=extra,
                do_sample=True,
                temperature=temperature,
            )
        new = out[0] if getattr(model.config, "is_encoder_decoder", False) else out[0, len(ids) :]
        output = tokenizer.decode(new, skip_special_tokens=True)
    if not output:
        say("peftcli: the generation is empty: the model ended it (end-of-sequence) before any text")
    return {"prompt": prompt, "output": output, "template": "chat" if chat else "raw", "empty": not output}


def check_images(paths: list[Path], task: str, raw: bool) -> list[str]:
    """--image files as absolute paths, each checked to open as an image."""
    from peftcli.data.images import check_image
    from peftcli.tasks import TASKS

    if paths and not TASKS[task].vision:
        raise UserError(
            f"--image needs a vision-language model (model.task: image_text_to_text); this one is {task}"
        )
    if paths and raw:
        raise UserError("--image needs the chat template, and --raw turns it off", "drop one of them")
    for path in paths:
        check_image(str(path), "--image")
    return [str(p.expanduser().resolve()) for p in paths]


def prompt_style(target: Target, chat: bool, raw: bool) -> tuple[bool, str]:
    """Whether to render the prompt with the chat template, and why (said on stderr)."""
    from peftcli.rendering import run_is_chat

    if chat:
        return True, "--chat"
    if raw:
        return False, "--raw"
    if target.model.task != "seq_cls" and run_is_chat(target):
        return True, "the run trained on chat data; --raw for plain text"
    return False, "the run did not train on chat data" if target.recipe else "no run recorded a chat template"


def format_result(result: dict[str, Any]) -> str:
    if "label" not in result:
        return result["output"]
    width = max(len(n) for n in result["probabilities"])
    rows = [f"{name:<{width}}  {p:.4f}" for name, p in result["probabilities"].items()]
    return "\n".join([result["label"], *rows])
