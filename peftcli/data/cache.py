"""The on-disk cache of prepared data, and `prepare`, which fills and reads it.

Preparation streams: rows are read one at a time, tokenised in batches and appended to flat
token files under `$PEFTCLI_HOME/cache/data/<key>/`, which training memory-maps. The key hashes
everything that changes the result (data bytes, tokenizer, format, settings), so a second run
with the same inputs skips preparation, and memory does not grow with the size of the data."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftcli.console import is_main_process, say
from peftcli.data.encode import BATCH_ROWS, Encoder, batches, new_stats
from peftcli.data.formats import (
    CHAT_FORMATS,
    FORMAT_COLUMNS,
    MESSAGE_ROLES,
    chat_template,
    choose_format,
    scan,
)
from peftcli.data.images import ImageTokens, image_messages
from peftcli.data.packing import pack_split
from peftcli.data.sources import Row, Source
from peftcli.data.splits import Prepared, Reference, Split, TokenArrays, Writer
from peftcli.errors import UserError
from peftcli.tasks import TASKS

if TYPE_CHECKING:
    from peftcli.recipe import DataSection


CACHE_VERSION = 2  # bump when encoding changes, so old caches are not reused (2: labels by value)
# Image+text encodings only, so text caches stay valid (2: the processor's BOS before the conversation)
VISION_VERSION = 2


def encoding(task: str) -> dict[str, int]:
    """The versions of how rows become token ids for `task`: a checkpoint records them, so a run
    is never resumed on an encoding it did not start with."""
    return {"cache": CACHE_VERSION, **({"vision": VISION_VERSION} if TASKS[task].vision else {})}


def _image_tokens_key(image: ImageTokens, *sources: Source | None) -> Any:
    """What the cached image tokens depend on: for counts by the image's size, every image's size
    too (read from the headers), so a picture replaced by one of another shape is re-encoded."""
    if image.fixed is not None:
        return image.key()
    present = [s for s in sources if s is not None]
    files = [f for s in present for w, r in s.rows() for f in image_messages(r, w, MESSAGE_ROLES)[1]]
    return [*image.key(), hashlib.sha256(json.dumps(image.sizes(files)).encode()).hexdigest()]


def _say(message: str) -> None:
    """Progress on stderr, from the main process only (every process prepares the data)."""
    if is_main_process():
        say(f"peftcli: {message}")


def cache_root() -> Path:
    from peftcli.home import home

    return home() / "cache" / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Changes with anything about the tokenizer that changes token ids: its vocabulary, merges,
    normalisation and post-processing, special tokens and chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(json.dumps(tokenizer.chat_template, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def prepare(
    section: DataSection, tokenizer: Any, seed: int, task: str = "causal_lm", objective: str = "sft"
) -> Prepared:
    """Training (and held-out) examples for a data section, from the cache when the same inputs
    were prepared before. A `data.chat_template` is set on the tokenizer, so it is saved with
    the adapter and generation uses it too. Preference objectives read pairs (or KTO's unpaired
    answers), see `data.preference`."""
    from peftcli.data import preference
    from peftcli.objectives import OBJECTIVES

    on_task_data = OBJECTIVES[objective].task_loss  # SFT: the task's formats; else pairs or answers
    if section.chat_template is not None:
        tokenizer.chat_template = chat_template(section, tokenizer)
        if hasattr(tokenizer, "processor"):  # saved with the adapter, whose template it carries
            tokenizer.processor.chat_template = tokenizer.chat_template
    train = Source(section.train, "data.train")
    held_out = Source(section.eval, "data.eval") if isinstance(section.eval, str) else None
    if OBJECTIVES[objective].generates:  # prompts, answered in training: no tokens to cache
        from peftcli.data.prompts import prepare_prompts

        held = [] if held_out is not None else _held_out_rows(section, sum(1 for _ in train.rows()), seed)
        return prepare_prompts(section, tokenizer, train, held_out, held)
    if not on_task_data:
        fmt = preference.detect(train.first()[1], section.format, objective)
        if held_out is not None:
            preference.detect(held_out.first()[1], fmt, objective, "data.eval")
    else:
        fmt = choose_format(train.first()[1], section.format, "data.format", task)
        if section.format == "auto":
            _say(f"data: format {fmt} (detected from the columns {', '.join(FORMAT_COLUMNS[fmt])})")
        if held_out is not None:
            choose_format(held_out.first()[1], fmt, "data.eval", task)
    if fmt in CHAT_FORMATS and not tokenizer.chat_template:
        Encoder(tokenizer, fmt, section, task)  # raises the missing-template error
    fraction = None if held_out is not None or not section.eval else float(section.eval)
    inputs = {
        "version": CACHE_VERSION,
        "objective": None if on_task_data else objective,
        "train": train.fingerprint(),
        "eval": held_out.fingerprint() if held_out is not None else fraction,
        "seed": seed if fraction or section.packing else None,
        "format": fmt,
        "task": task,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": section.max_length,
        "train_on": section.train_on,
        "packing": section.packing,
    }
    if TASKS[task].vision:  # the tokens an image expands to come from the processor; image
        # paths are relative to the data files, and the cache holds them resolved
        inputs["image_tokens"] = _image_tokens_key(ImageTokens.of(tokenizer.processor), train, held_out)
        inputs["vision_version"] = VISION_VERSION
        inputs["data_files"] = [str(f.resolve()) for s in (train, held_out) if s is not None for f in s.files]
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_root() / key
    hit = (folder / "meta.json").is_file()
    if not hit:
        started = time.perf_counter()
        build = _build if on_task_data else partial(_build_preference, objective=objective)
        _build_atomically(
            folder, lambda tmp: build(tmp, section, tokenizer, fmt, task, seed, train, held_out)
        )
    prepared = _load(folder, section)
    n = f"{prepared.stats['examples']} examples"
    if section.packing:
        n += f" in {prepared.stats['sequences']} packed rows"
    if hit:
        _say(f"data: loaded {n} from cache ({folder})")
    else:
        _say(f"data: prepared {n} in {time.perf_counter() - started:.1f}s (cached in {folder})")
    prepared.from_cache = hit
    return prepared


def _build_atomically(folder: Path, build: Any) -> None:
    """Build into a temporary folder beside `folder` and rename it into place, so a cache entry
    is complete or absent; when another process got there first, its entry is kept."""
    from peftcli.home import make_dirs, process_alive

    make_dirs(folder.parent)
    host = socket.gethostname()
    for stale in folder.parent.glob(f".{folder.name}.tmp-{host}-*"):  # left by a killed run here
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.tmp-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(
    folder: Path,
    section: DataSection,
    tokenizer: Any,
    fmt: str,
    task: str,
    seed: int,
    train: Source,
    held_out: Source | None,
) -> None:
    """Two streaming passes: check every row (and count them, for the held-out fraction), then
    tokenise in batches and append to the split files."""
    found = scan(train, fmt, task)
    if held_out is not None:
        scan(held_out, fmt, task, "data.eval")
    held = _held_out_rows(section, found.rows, seed) if held_out is None else []
    encoder = Encoder(tokenizer, fmt, section, task, found.labels)
    stats, eval_stats = new_stats(), new_stats()
    has_eval = bool(held) or held_out is not None
    vision = TASKS[task].vision  # each example's image files beside its tokens
    writers = {"train": Writer(folder, "train", images=vision)}
    if has_eval:
        writers["eval"] = Writer(folder, "eval", images=vision)
        references = open(folder / "eval.references.jsonl", "w", encoding="utf-8")

    def write(batch: list[Row], name: str) -> None:
        for (where, row), example in zip(
            batch, encoder.examples(batch, stats if name == "train" else eval_stats), strict=True
        ):
            if example is None:
                continue
            writers[name].add(example)
            if name == "eval" and (ref := encoder.reference(row, where)) is not None:
                saved = {"prompt_ids": ref.prompt_ids, "answer": ref.answer}
                references.write(json.dumps(saved | ({"images": ref.images} if ref.images else {})) + "\n")

    pending: dict[str, list[Row]] = {"train": [], "eval": []}
    for name, row in routed(train.rows(), held):
        pending[name].append(row)
        if len(pending[name]) == BATCH_ROWS:
            write(pending[name], name)
            pending[name] = []
    for name, rows in pending.items():
        if rows:
            write(rows, name)
    if held_out is not None:
        for batch in batches(held_out.rows()):
            write(batch, "eval")
    for writer in writers.values():
        writer.close()
    if has_eval:
        references.close()
    if not writers["train"].count:
        raise UserError(
            f"data.train: no example has a supervised token within max_length={section.max_length}"
        )
    stats["sequences"] = writers["train"].count
    if section.packing:
        stats["sequences"] = pack_split(folder, section.max_length, seed)
    meta = {
        "version": CACHE_VERSION,
        "format": fmt,
        "task": task,
        "labels": found.labels,
        "stats": stats,
        "eval_stats": eval_stats if has_eval else None,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _build_preference(
    folder: Path,
    section: DataSection,
    tokenizer: Any,
    fmt: str,
    task: str,
    seed: int,
    train: Source,
    held_out: Source | None,
    objective: str,
) -> None:
    """Pairs (or unpaired answers) into the split files: a pair is two consecutive sequences,
    chosen then rejected; KTO's labels go beside them. Every row is checked first."""
    from peftcli.data import preference

    count = preference.scan(train, fmt, objective)[1]
    if held_out is not None:
        preference.scan(held_out, fmt, objective, "data.eval")
    held = _held_out_rows(section, count, seed) if held_out is None else []
    encoder = Encoder(tokenizer, "completion", section, task)
    stats, eval_stats = new_stats(), new_stats()
    has_eval = bool(held) or held_out is not None
    writers = {"train": Writer(folder, "train")}
    labels: dict[str, list[bool]] = {"train": [], "eval": []}
    if has_eval:
        writers["eval"] = Writer(folder, "eval")

    def write(where: str, row: dict[str, Any], name: str) -> None:
        counts = stats if name == "train" else eval_stats
        if fmt == "preference":
            sequences = preference.encode_pair(encoder, row, where, counts)
            for sequence in sequences or ():
                writers[name].add(sequence)
            return
        encoded = preference.encode_unpaired(encoder, row, where, counts)
        if encoded is not None:
            writers[name].add(encoded[0])
            labels[name].append(encoded[1])

    for name, (where, row) in routed(train.rows(), held):
        write(where, row, name)
    if held_out is not None:
        for where, row in held_out.rows():
            write(where, row, "eval")
    for writer in writers.values():
        writer.close()
    if not stats["examples"]:
        raise UserError(
            f"data.train: no {'pair' if fmt == 'preference' else 'answer'} keeps an answer token within "
            f"max_length={section.max_length}"
        )
    if fmt == "unpaired":
        if len(set(labels["train"])) < 2:
            raise UserError(
                "data.train: KTO needs both desirable (label: true) and undesirable (label: false) answers"
            )
        (folder / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    stats["sequences"] = writers["train"].count
    meta = {
        "version": CACHE_VERSION,
        "format": fmt,
        "task": task,
        "labels": None,
        "stats": stats,
        "eval_stats": eval_stats if has_eval else None,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def routed(rows: Iterator[Row], held: list[int]) -> Iterator[tuple[str, Row]]:
    """Each training row with the split it goes to: "eval" for the indices in `held` (sorted),
    "train" for the others."""
    next_held = 0
    for i, row in enumerate(rows):
        if next_held < len(held) and held[next_held] == i:
            next_held += 1
            yield "eval", row
        else:
            yield "train", row


def _held_out_rows(section: DataSection, rows: int, seed: int) -> list[int]:
    """Which rows of the training data `data.eval` (a fraction) holds out, in order; seeded."""
    held: list[int] = []
    if section.eval:
        n_eval = max(1, round(float(section.eval) * rows))
        if n_eval >= rows:
            raise UserError(
                f"data.eval: holding out {section.eval} of {rows} rows leaves nothing to train on"
            )
        held = sorted(random.Random(seed).sample(range(rows), n_eval))
    return held


def _load(folder: Path, section: DataSection) -> Prepared:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    classes = meta["task"] == "seq_cls"
    if meta["format"] in ("preference", "unpaired"):
        return _load_preference(folder, section, meta)
    train = Split(TokenArrays(folder, "train", classes))
    held_out = None
    if meta["eval_stats"] is not None:
        with open(folder / "eval.references.jsonl", encoding="utf-8") as f:
            references = [Reference(**json.loads(line)) for line in f]
        held_out = Split(TokenArrays(folder, "eval", classes), references)
    return Prepared(
        meta["format"],
        train,
        held_out,
        meta["stats"],
        meta["labels"],
        group_by_length=section.group_by_length,
        cache_dir=folder,
        max_length=section.max_length,
    )


def _load_preference(folder: Path, section: DataSection, meta: dict[str, Any]) -> Prepared:
    from peftcli.data.preference import Pairs, Unpaired

    labels = (
        json.loads((folder / "labels.json").read_text(encoding="utf-8"))
        if meta["format"] == "unpaired"
        else None
    )

    def split(name: str) -> Split:
        sequences = TokenArrays(folder, name, False)
        return Split(Pairs(sequences) if labels is None else Unpaired(sequences, labels[name]))

    return Prepared(
        meta["format"],
        split("train"),
        split("eval") if meta["eval_stats"] is not None else None,
        meta["stats"],
        None,
        group_by_length=section.group_by_length,
        cache_dir=folder,
        max_length=section.max_length,
    )
