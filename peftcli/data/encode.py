"""Encoding: rows of one format → token ids with labels, for one tokenizer and task.

Labels follow the Hugging Face convention (aligned with `input_ids`, `IGNORE` = no loss); the
training loop shifts them for causal models. Each format renders a row into token ids plus a
mask of the tokens that carry loss; `train_on: all` supervises every token."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from peftcli.data.formats import (
    CHAT_FORMATS,
    MESSAGE_ROLES,
    chat_messages,
    chat_template,
    prompt_and_answer,
    scan,
    string_field,
)
from peftcli.data.images import ImageTokens, image_messages
from peftcli.data.sources import Row, Source, first_line
from peftcli.data.splits import Reference, Split
from peftcli.errors import UserError
from peftcli.tasks import IGNORE, TASKS

if TYPE_CHECKING:
    from peftcli.recipe import DataSection


BATCH_ROWS = 256  # rows per tokenizer call


def new_stats() -> dict[str, int]:
    return dict.fromkeys(("rows", "examples", "tokens", "supervised_tokens", "truncated", "dropped"), 0)


class Encoder:
    """Turns rows of one format into training examples for one tokenizer and task.

    causal_lm: `{"input_ids", "labels"}` of equal length (-100 = no loss);
    seq2seq_lm: `{"input_ids"}` (encoder) and `{"labels"}` (decoder targets);
    seq_cls: `{"input_ids", "labels": class id}`.
    Rows are tokenised in batches (one fast-tokenizer call per field per batch).
    """

    def __init__(
        self,
        tokenizer: Any,
        fmt: str,
        section: DataSection,
        task: str = "causal_lm",
        label_names: list[str] | None = None,
    ):
        self.tok = tokenizer
        self.fmt = fmt
        self.section = section
        self.task = task
        self.label_ids = {name: i for i, name in enumerate(label_names or [])}
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # The special tokens the tokenizer wraps around text (e.g. BOS); EOS is added by us.
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        full = tokenizer("x")["input_ids"]
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        self.prefix = [t for t in full[:start] if t != tokenizer.eos_token_id]
        self._fast = _fast_encoder(tokenizer)
        self.template = chat_template(section, tokenizer) if fmt in CHAT_FORMATS else None
        # Vision-language: each image placeholder the template writes is expanded to the tokens
        # the processor gives that image, so ids and labels are final before any pixel is read.
        self.image = ImageTokens.of(tokenizer.processor) if TASKS[task].vision else None
        if fmt in CHAT_FORMATS and not self.template:
            raise UserError(
                f"data.format: {fmt} needs a chat template, and this tokenizer has none",
                "set data.chat_template (a Jinja string or a .jinja file), or use the completion format",
            )

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._fast is not None:
            return [e.ids for e in self._fast(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    # ---- rows → examples

    def example(self, row: dict[str, Any], where: str, stats: dict[str, int]) -> dict[str, Any] | None:
        """The training example of a row, truncated to max_length; None (and counted as
        dropped) when truncation leaves nothing to learn from."""
        return self.examples([(where, row)], stats)[0]

    def examples(self, rows: Sequence[Row], stats: dict[str, int]) -> list[dict[str, Any] | None]:
        if self.task == "seq_cls":
            ids = self.tok([string_field(r, "text", w) for w, r in rows])["input_ids"]
            return [self._classification(i, r, w, stats) for i, (w, r) in zip(ids, rows, strict=True)]
        if self.task == "seq2seq_lm":
            pairs = [prompt_and_answer(r, self.fmt, w) for w, r in rows]
            sources = self.tok([p for p, _ in pairs])["input_ids"]
            targets = self._ids([a for _, a in pairs])
            return [self._seq2seq(s, t + self.eos, stats) for s, t in zip(sources, targets, strict=True)]
        if self.image is not None:
            return [self._with_images(*example, stats) for example in self._labelled_images(rows)]
        return [self._causal(ids, labels, stats) for ids, labels in self._labelled(rows)]

    def _with_images(
        self, ids: list[int], labels: list[int], files: list[str], stats: dict[str, int]
    ) -> dict[str, Any] | None:
        """A causal example with its image files; a row whose image tokens do not all fit in
        max_length is dropped (a cut image cannot be matched with its pixels)."""
        image_id = self.tok.convert_tokens_to_ids(self.image.token)
        if image_id in ids[self.section.max_length :]:
            stats["rows"] += 1
            stats["dropped"] += 1
            return None
        example = self._causal(ids, labels, stats)
        return None if example is None else example | {"images": files}

    def _labelled_images(self, rows: Sequence[Row]) -> list[tuple[list[int], list[int], list[str]]]:
        """Token ids, labels and image files of image+text rows: the assistant's text carries
        loss (`train_on` is completion: an image token never does)."""
        image_id = self.tok.convert_tokens_to_ids(self.image.token)
        out = []
        for where, row in rows:
            messages, files = image_messages(row, where, MESSAGE_ROLES)
            expansions = self.image.expansions(files)
            text, spans = self._render_spans(messages, where, expansions)
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            if (held := enc["input_ids"].count(image_id)) != self.image.count(expansions):
                raise UserError(
                    f"{where}: {len(files)} image(s), but the rendered conversation holds "
                    f"{self.image.placeholders(held, expansions):g} image placeholders ({self.image.token})",
                    'write an image as a {"type": "image"} part, never as text; a data.chat_template '
                    "must render each image part as the placeholder",
                )
            labels = [
                t if t != image_id and any(s <= a and b <= e for s, e in spans) else IGNORE
                for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
            ]
            lead = self._lead(text)
            out.append((lead + enc["input_ids"], [IGNORE] * len(lead) + labels, files))
        return out

    def _lead(self, text: str) -> list[int]:
        """The special tokens a vision-language processor puts before a rendered conversation, so
        training sees what inference gives: `processor(text=..., images=...)` and TRL's collators
        add the tokenizer's prefix (BOS); `processor.apply_chat_template(..., tokenize=True)` adds
        it unless the template wrote it. Text chat formats add none, as the tokenizer's
        `apply_chat_template` adds none."""
        bos = self.tok.bos_token
        return [] if bos is not None and text.startswith(bos) else self.prefix

    def _causal(self, ids: list[int], labels: list[int], stats: dict[str, int]) -> dict[str, Any] | None:
        stats["rows"] += 1
        max_len = self.section.max_length
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            stats["truncated"] += 1
        # Position 0 is never predicted, so it cannot carry loss.
        supervised = len(labels) - labels.count(IGNORE) - (labels[0] != IGNORE)
        if supervised == 0:
            stats["dropped"] += 1
            return None
        labels[0] = IGNORE
        stats["examples"] += 1
        stats["tokens"] += len(ids)
        stats["supervised_tokens"] += supervised
        return {"input_ids": ids, "labels": labels}

    def _seq2seq(self, source: list[int], target: list[int], stats: dict[str, int]) -> dict[str, Any]:
        stats["rows"] += 1
        max_len = self.section.max_length
        if len(source) > max_len or len(target) > max_len:
            stats["truncated"] += 1
            source, target = source[:max_len], target[:max_len]
        stats["examples"] += 1
        stats["tokens"] += len(source) + len(target)
        stats["supervised_tokens"] += len(target)
        return {"input_ids": source, "labels": target}

    def _classification(
        self, ids: list[int], row: dict[str, Any], where: str, stats: dict[str, int]
    ) -> dict[str, Any]:
        stats["rows"] += 1
        max_len = self.section.max_length
        if len(ids) > max_len:  # keep the closing special token ([SEP])
            ids, stats["truncated"] = ids[: max_len - 1] + ids[-1:], stats["truncated"] + 1
        stats["examples"] += 1
        stats["tokens"] += len(ids)
        stats["supervised_tokens"] += 1
        return {"input_ids": ids, "labels": self.label_id(row, where)}

    def label_id(self, row: dict[str, Any], where: str) -> int:
        label = row.get("label")
        if str(label) not in self.label_ids:
            known = ", ".join(self.label_ids)
            raise UserError(f"{where}: label {label!r} is not one of the training labels ({known})")
        return self.label_ids[str(label)]

    # ---- causal LM: token ids and which of them carry loss

    def encode(self, row: dict[str, Any], where: str) -> tuple[list[int], list[bool]]:
        labelled = self._labelled_images if self.image is not None else self._labelled
        ids, labels = labelled([(where, row)])[0][:2]
        return ids, [y != IGNORE for y in labels]

    def _labelled(self, rows: Sequence[Row]) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels (the token where it carries loss, else IGNORE), untruncated."""
        everything = self.section.train_on == "all"
        if self.fmt == "text":
            texts = self._ids([string_field(r, "text", w) for w, r in rows])
            return [(ids, ids[:]) for ids in (self.prefix + t + self.eos for t in texts)]
        if self.fmt in ("completion", "alpaca"):
            pairs = [prompt_and_answer(r, self.fmt, w) for w, r in rows]
            out = []
            prompts, answers = self._ids([p for p, _ in pairs]), self._ids([a for _, a in pairs])
            for p, a in zip(prompts, answers, strict=True):
                p, a = self.prefix + p, a + self.eos
                out.append((p + a, (p if everything else [IGNORE] * len(p)) + a))
            return out
        rendered = [self._render_spans(chat_messages(r, self.fmt, w), w) for w, r in rows]
        enc = self.tok([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
            labels = [
                t if everything or any(s <= a and b <= e for s, e in spans) else IGNORE
                for t, (a, b) in zip(ids, offsets, strict=True)
            ]
            out.append((ids, labels))
        return out

    def _render(
        self,
        messages: list[dict[str, str]],
        generation_prompt: bool,
        where: str,
        expansions: list[str] | None = None,
    ) -> str:
        """The conversation as the chat template writes it; `expansions`: the texts of its images,
        in place of their placeholders."""
        from jinja2 import TemplateError

        try:
            text = self.tok.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
            return text if expansions is None else self.image.expand(text, expansions)
        except TemplateError as exc:
            raise UserError(
                f"{where}: the chat template cannot render this conversation: {first_line(exc)}",
                "check the conversation's roles, or data.chat_template",
            ) from None

    def _render_spans(
        self, messages: list[dict[str, str]], where: str, expansions: list[str] | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant answers, each
        with its end-of-turn token (found by rendering the conversation up to each turn)."""
        text = self._render(messages, False, where, expansions)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], True, where, expansions)
            through = self._render(messages[: i + 1], False, where, expansions)
            if not (text.startswith(before) and text.startswith(through)):
                raise UserError(
                    f"{where}: the chat template does not render conversations incrementally, "
                    "so answers cannot be located; use train_on: all"
                )
            spans.append((len(before), len(through.rstrip())))
        return text, spans

    def reference(self, row: dict[str, Any], where: str) -> Reference | None:
        """The prompt to generate from and the expected answer, where the row has one."""
        if self.fmt in ("completion", "alpaca"):
            prompt, answer = prompt_and_answer(row, self.fmt, where)
            ids = (
                self.tok(prompt)["input_ids"]
                if self.task == "seq2seq_lm"
                else self.prefix + self._ids([prompt])[0]
            )
            return Reference(ids, answer)
        if self.image is not None:
            messages, files = image_messages(row, where, MESSAGE_ROLES)
            if messages[-1]["role"] == "assistant":
                prompt = self._render(messages[:-1], True, where, self.image.expansions(files))
                answer = "".join(p["text"] for p in messages[-1]["content"] if p["type"] == "text")
                shown = sum(p["type"] == "image" for m in messages[:-1] for p in m["content"])
                return Reference(self._lead(prompt) + self._ids([prompt])[0], answer, files[:shown])
        elif self.fmt in CHAT_FORMATS:
            messages = chat_messages(row, self.fmt, where)
            if messages[-1]["role"] == "assistant":
                prompt = self._render(messages[:-1], True, where)
                return Reference(self._ids([prompt])[0], messages[-1]["content"])
        return None


def _fast_encoder(tokenizer: Any) -> Any:
    """The Rust tokenizer's `encode_batch_fast` (ids without offsets: about 1.5x faster than the
    transformers call), where it gives the same ids as the transformers call; else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None or backend.truncation is not None or backend.padding is not None:
        return None
    probe = [f"Hello  world\n\t{tokenizer.eos_token or ''} é 1234 {tokenizer.pad_token or ''}x"]
    same = [e.ids for e in fast(probe, add_special_tokens=False)] == tokenizer(
        probe, add_special_tokens=False
    )["input_ids"]
    return fast if same else None


def batches(rows: Iterable[Row], size: int = BATCH_ROWS) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_rows(
    rows: Iterable[Row], encoder: Encoder, stats: dict[str, int], with_references: bool = False
) -> Split:
    """Rows → an in-memory split (for small data: `eval --data`, tests)."""
    split = Split([])
    for batch in batches(rows):
        for (where, row), example in zip(batch, encoder.examples(batch, stats), strict=True):
            if example is None:
                continue
            split.examples.append(example)
            if with_references and (ref := encoder.reference(row, where)) is not None:
                split.references.append(ref)
    return split


def prepare_file(
    path: str, section: DataSection, tokenizer: Any, task: str = "causal_lm", labels: list[str] | None = None
) -> Split:
    """A whole file as one evaluation split, with reference answers where the format has them."""
    source = Source(path, "--data")
    fmt = scan(source, section.format, task, "--data").format
    encoder = Encoder(tokenizer, fmt, section, task, labels)
    return encode_rows(source.rows(), encoder, new_stats(), with_references=True)
