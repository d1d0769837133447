"""Where rows come from: local files (JSON Lines, JSON, CSV, TSV, Parquet, text), folders of
them, and hub datasets. Rows are streamed one at a time, each with its location
("data.train: /path/file.jsonl:3", the same shape in every message), so a bad row is reported
where it stands. A key given twice in a JSON object is refused, as a column named twice is."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peftcli.errors import UserError

EXTENSIONS = {  # matched case-insensitively (train.JSONL, DATA.CSV)
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
}


Row = tuple[str, dict[str, Any]]  # (where: "data.train: /path/file:line", row)
Rows = list[Row]


def is_hub_dataset(spec: str) -> bool:
    """`org/name[@config][:split]` that is not a local path."""
    path = Path(spec).expanduser()
    return not path.exists() and not spec.startswith((".", "/", "~")) and _kind(path) is None


def _kind(path: Path) -> str | None:
    """The reader for a file, from its extension in any case; None when unknown."""
    return EXTENSIONS.get(path.suffix.lower())


def hub_spec(spec: str) -> tuple[str, str | None, str]:
    """`org/name@config:split` → (name, config, split); the split defaults to train."""
    base, _, split = spec.partition(":")
    name, _, config = base.partition("@")
    return name, config or None, split or "train"


class Source:
    """One `data.train` / `data.eval` value: a file, a folder of files, or a hub dataset."""

    def __init__(self, spec: str, key: str = "data.train"):
        self.spec, self.key = spec, key
        self.hub = is_hub_dataset(spec)
        self._dataset: Any = None
        self.files: list[Path] = []
        if self.hub:
            return
        path = Path(spec).expanduser()
        if path.is_dir():
            self.files = sorted(p for p in path.rglob("*") if _kind(p) is not None and p.is_file())
            if not self.files:
                raise UserError(f"{key}: folder {path} holds no {', '.join(EXTENSIONS)} files")
            self.root = path
        elif path.is_file():
            self.files, self.root = [path], path.parent
        else:
            raise UserError(f"{key}: file not found: {spec}")

    def rows(self) -> Iterator[Row]:
        if self.hub:
            ds, name = self.dataset(), hub_spec(self.spec)[0]
            n = 0
            for batch in ds.iter(batch_size=1000):
                columns = list(batch)
                for j in range(len(batch[columns[0]]) if columns else 0):
                    n += 1
                    yield f"{self.key}: {name} row {n}", {c: batch[c][j] for c in columns}
            return
        for path in self.files:
            yield from _file_rows(path, self.key)

    def first(self) -> Row:
        for row in self.rows():
            return row
        raise UserError(f"{self.key}: {self.spec} has no rows")

    def fingerprint(self) -> str:
        """Changes whenever the data does: the bytes of local files, the hub dataset's fingerprint."""
        if self.hub:
            return f"hub:{self.spec}:{self.dataset()._fingerprint}"
        digest = hashlib.sha256()
        for path in self.files:
            if len(self.files) > 1:
                digest.update(str(path.relative_to(self.root)).encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()

    def dataset(self) -> Any:
        if self._dataset is None:
            import datasets

            datasets.disable_progress_bars()
            name, config, split = hub_spec(self.spec)
            try:
                self._dataset = datasets.load_dataset(name, config, split=split)
            except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
                raise UserError(
                    f"{self.key}: cannot load hub dataset `{self.spec}`: {first_line(exc)}",
                    "hub ids are org/name, org/name:split or org/name@config:split; offline, use a local file",
                ) from None
        return self._dataset


def read_rows(spec: str, key: str = "data.train") -> Rows:
    """All rows of a local file or folder, or of a hub dataset, each with its location.

    Loads everything: for small files (tests, `eval --data`); preparation streams instead."""
    rows = list(Source(spec, key).rows())
    if not rows:
        raise UserError(f"{key}: {spec} has no rows")
    return rows


def _file_rows(path: Path, key: str) -> Iterator[Row]:
    """Rows of one file, streamed, each with its file:line, so a bad row is reported there.

    JSON Lines, CSV/TSV and text are read line by line; a .json array is parsed whole;
    Parquet goes through pyarrow in record batches."""
    kind = _kind(path)
    if kind is None:
        raise UserError(f"{key}: {path} has an unknown extension; use one of {', '.join(EXTENSIONS)}")
    if kind in ("jsonl", "text"):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"{key}: {path}:{n}: not UTF-8 text (byte {exc.start})") from None
                if not line.strip():
                    continue
                if kind == "text":
                    yield f"{key}: {path}:{n}", {"text": line.rstrip("\r\n")}
                else:
                    yield f"{key}: {path}:{n}", _json_object(line, f"{key}: {path}:{n}")
    elif kind == "json":
        yield from _json_rows(path, key)
    elif kind in ("csv", "tsv"):
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter="," if kind == "csv" else "\t")
                _unique_columns(reader.fieldnames or [], path, key)
                for row in reader:
                    if None in row or None in row.values():
                        raise UserError(
                            f"{key}: {path}:{reader.line_num}: the row does not have the header's columns"
                        )
                    yield f"{key}: {path}:{reader.line_num}", dict(row)
        except UnicodeDecodeError as exc:
            raise UserError(f"{key}: {path} is not UTF-8 text (byte {exc.start})") from None
        except csv.Error as exc:
            raise UserError(f"{key}: {path}: {exc}") from None
    else:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            _unique_columns(parquet.schema_arrow.names, path, key)
            batches = parquet.iter_batches(batch_size=1024)
            n = 0
            for batch in batches:
                for row in batch.to_pylist():
                    n += 1
                    yield f"{key}: {path} row {n}", row
        except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
            raise UserError(f"{key}: cannot read {path}: {first_line(exc)}") from None


def _unique_columns(names: Sequence[str], path: Path, key: str) -> None:
    """A column named twice would silently lose all but one of its values."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(
                f"{key}: {path}: column `{name}` appears twice in the header", "rename or remove one of them"
            )
        seen.add(name)


class _Twice(dict):
    """A JSON object that named a key twice (json keeps the last value; a row must not)."""

    key = ""


def _loads(text: str, where: str) -> tuple[Any, bool]:
    """Parsed JSON, and whether some object in it named a key twice (each such object is a
    `_Twice`, which `_twice` finds)."""
    twice: list[str] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        row = dict(pairs)
        if len(row) == len(pairs):
            return row
        seen: set[str] = set()
        marked = _Twice(row)
        marked.key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        twice.append(marked.key)
        return marked

    try:
        return json.loads(text, object_pairs_hook=hook), bool(twice)
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to read (more than about 1000 levels)") from None


def _twice(value: Any) -> str | None:
    """The key given twice in some object of `value`, if any (walked without recursion)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, _Twice):
            return node.key
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _json_rows(path: Path, key: str) -> Iterator[Row]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{key}: {path} is not UTF-8 text (byte {exc.start})") from None
    try:
        data, twice = _loads(text, f"{key}: {path}")
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield f"{key}: {path}:{n}", _json_object(line, f"{key}: {path}:{n}")
            return
        raise UserError(f"{key}: {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{key}: {path} must hold a list of objects (or use .jsonl, one object per line)")
    for i, row in enumerate(data):
        if twice and (name := _twice(row)) is not None:
            raise UserError(f"{key}: {path}[{i}]: key `{name}` appears twice in one object; keep one")
        yield f"{key}: {path}[{i}]", row


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        row, twice = _loads(line, where)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if twice:
        raise UserError(f"{where}: key `{_twice(row)}` appears twice in one object; keep one")
    return row


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
