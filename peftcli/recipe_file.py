"""Reading a recipe: YAML with PyYAML's safe loader (a key given twice is refused, `1e-4` reads
as a number), dotted `key=value` overrides merged into the raw mapping, then validation into
`Recipe` with every error gathered and reported together with its key path; and writing one
back (secrets redacted).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftcli.errors import UserError, did_you_mean
from peftcli.recipe import Recipe, default_name


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last),
    and reading `1e-4` as a number (YAML 1.1, which PyYAML follows, wants `1.0e-4`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base loader says so
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key `{key}` appears twice in one mapping (first on line {first}); keep one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML as recipes are read (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506  a SafeLoader


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["training.lr=1e-4", "peft.r=16"]` → nested mapping; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override `{pair}` is not key=value", "e.g. training.lr=1e-4")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override `{pair}` conflicts with another override of `{part}`")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    if raw is None:
        raise UserError(f"{path}: the recipe is empty", "start from recipes/quickstart.yaml")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections, not a {type(raw).__name__}")
    return raw


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def _shown(value: Any) -> str:
    """A value as YAML writes it (true, null), so a message quotes what the user wrote."""
    if isinstance(value, bool | None):
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) and value.strip().lower() in _YAML_WORDS else str(value)


_YAML_WORDS = {"yes", "no", "on", "off", "true", "false", "y", "n", "null", "~"}
# Strict types: what each expects, and how to write it.
_TYPES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false (unquoted)",
    "string_type": "a string (quote it)",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    loc = tuple(p for p in loc if not (isinstance(p, str) and p in ("float", "str", "int", "list[str]")))
    path = ".".join(str(p) for p in loc)
    kind = err["type"]
    value = err.get("input")
    if kind in _TYPES and not isinstance(value, dict | list):
        what = "null" if value is None else "a boolean" if isinstance(value, bool) else "a string"
        what = "an integer" if type(value) is int else "a number" if type(value) is float else what
        return f"`{path}: {_shown(value)}` is {what}; give {_TYPES[kind]}"
    if kind == "extra_forbidden":
        parent, key = loc[:-1], str(loc[-1])
        return f"unknown key `{path}`{did_you_mean(key, _fields_at(parent))}"
    if kind == "missing":
        return f"`{path}` is required"
    if kind == "literal_error":
        choices = err.get("ctx", {}).get("expected", "")
        names = [c.strip().strip("'") for c in choices.replace(" or ", ", ").split(",")]
        quote = " (quote it: YAML reads yes/no/on/off as booleans)" if isinstance(value, bool) else ""
        return (
            f"`{path}: {_shown(value)}` is not one of {', '.join(names)}{did_you_mean(value, names)}{quote}"
        )
    if kind == "value_error" and (not path or isinstance(value, dict)):
        # A whole-recipe or whole-section check: its message names its keys.
        return str(err["msg"]).removeprefix("Value error, ")
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"`{path}: {value}`: {msg}" if path else msg


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        messages = [_format_error(e) for e in exc.errors()]
        # Unions report each alternative; keep the first message per key path.
        seen: set[str] = set()
        unique = []
        for err, msg in zip(exc.errors(), messages, strict=True):
            key = ".".join(str(p) for p in err["loc"][:2])
            if key in seen and err["type"] != "extra_forbidden":
                continue
            seen.add(key)
            unique.append(msg)
        if len(unique) == 1:
            raise UserError(f"{source}: {unique[0]}") from None
        raise UserError(f"{source}: {len(unique)} problems: " + "; ".join(unique)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None, recorded: bool = False) -> Recipe:
    """Read, override, validate. Relative data paths are resolved against the working
    directory first, then the recipe's own folder, and stored absolute. `recorded`: the recipe
    a finished run wrote, whose `peft.init_from` settings are taken from the adapter as it is."""
    path = Path(path)
    raw = read_yaml(path)
    raw = _merge(raw, parse_overrides(overrides or []))
    raw.setdefault("name", default_name(path.stem))
    recipe = validate_recipe(raw, source=str(path))
    for key in ("train", "eval", "chat_template"):
        value = getattr(recipe.data, key)
        if isinstance(value, str) and not (key == "chat_template" and "{" in value):  # a path
            setattr(recipe.data, key, _resolve_data_path(value, path.parent))
    for reward in recipe.grpo.rewards:  # a user reward's file, as a data path
        where, _, name = (reward.function or "").rpartition(":")
        if where.endswith(".py"):
            reward.function = f"{_resolve_data_path(where, path.parent)}:{name}"
    if recipe.peft.init_from is not None:
        from peftcli.methods.saved import adopt_settings

        recipe.peft.init_from = _resolve_data_path(recipe.peft.init_from, path.parent)
        adopt_settings(recipe.peft, refuse=not recorded)  # the recipe says what the adapter is
    return recipe


def _resolve_data_path(value: str, recipe_dir: Path) -> str:
    for candidate in (Path(value).expanduser(), recipe_dir / value):
        if candidate.exists():
            return str(candidate.resolve())
    return value  # not local: a hub dataset id, checked when the data is read


# Hugging Face / OpenAI-style tokens, and credentials in URLs or query strings.
_SECRET = re.compile(
    r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|(?<=://)[^/@\s]+:[^/@\s]+(?=@)"
    r"|(?<=[?&;])(?:token|api[_-]?key|access[_-]?token|secret|password)=[^&\s]+",
    re.IGNORECASE,
)


def redact(value: Any) -> Any:
    """The same structure with anything that looks like a secret replaced."""
    if isinstance(value, str):
        return _SECRET.sub("<redacted>", value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, secrets redacted (it is written into the run folder)."""
    return yaml.safe_dump(redact(recipe.model_dump(mode="json")), sort_keys=False)
