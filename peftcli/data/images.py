"""Images in chat data, as Hugging Face chat data holds them: a message's `content` is a list of
parts, `{"type": "image", "image" | "path" | "url": FILE}` and `{"type": "text", "text": ...}`;
an image part without a file takes the next path of the row's `images` column. Paths are
relative to the data file. Preparation checks that every image opens and decodes, and keeps
only the paths (never pixels); `collate` loads them (`image_inputs`).

How many tokens an image takes is the processor's: a fixed number (LLaVA-1.5 style), or one that
depends on the image's size (Idefics3 with image splitting), computed from the image's size alone
by the processor's own rule. Other size-dependent processors are refused (`ImageTokens.of`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli.errors import UserError

IMAGE_KEYS = ("image", "path", "url")  # where an image part names its file


def data_folder(where: str) -> Path | None:
    """The folder of the file a row comes from (`where` = "data.train: /path/file.jsonl:3");
    None for a hub dataset's row."""
    location = where.split(": ", 1)[-1]
    path, _, line = location.rpartition(":")
    return Path(path).parent if line.isdigit() and Path(path).is_file() else None


def has_images(row: dict[str, Any]) -> bool:
    """Whether a messages row names an image anywhere (its `images` column or an image part)."""
    if row.get("images"):
        return True
    messages = row.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict)
        and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"])
        for m in messages
    )


def _text(part: dict[str, Any], where: str) -> dict[str, str]:
    if not isinstance(part.get("text"), str):
        raise UserError(f"{where}: a text part needs a string `text`")
    return {"type": "text", "text": part["text"]}


def image_messages(
    row: dict[str, Any], where: str, roles: tuple[str, ...]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The conversation with its content as parts (`{"type": "image"}` where an image stands),
    and the image files in the order they appear, as absolute paths (not opened)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    column = row.get("images") or []
    if not isinstance(column, list) or not all(isinstance(p, str) for p in column):
        raise UserError(f"{where}: `images` must be a list of image file paths")
    folder = data_folder(where)
    out, files, from_column = [], [], 0
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in roles:
            raise UserError(f"{where}: each message needs a role ({'/'.join(roles)}) and content")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
            raise UserError(f"{where}: a message's content is a string or a list of image and text parts")
        parts = []
        for part in content:
            if part.get("type") == "text":
                parts.append(_text(part, where))
                continue
            if part.get("type") != "image":
                raise UserError(f"{where}: a content part's type is image or text, not {part.get('type')!r}")
            named = next((part[k] for k in IMAGE_KEYS if part.get(k) is not None), None)
            if named is None:
                if from_column == len(column):
                    raise UserError(
                        f"{where}: more image parts than the {len(column)} path(s) of its `images` column"
                    )
                named, from_column = column[from_column], from_column + 1
            files.append(_resolve(named, folder, where))
            parts.append({"type": "image"})
        out.append({"role": m["role"], "content": parts})
    if from_column < len(column):
        raise UserError(
            f"{where}: its `images` column has {len(column)} path(s) but only {from_column} image "
            'part(s) take one; add a {"type": "image"} part for each'
        )
    return out, files


def _resolve(named: Any, folder: Path | None, where: str) -> str:
    if not isinstance(named, str) or not named:
        raise UserError(f"{where}: an image part names its file as a string (image, path or url)")
    if named.startswith(("http://", "https://")):
        raise UserError(f"{where}: image {named} is a web address; download it and give its path")
    path = Path(named.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        if folder is None:
            raise UserError(f"{where}: image {named} is a relative path, and the row has no data file")
        path = folder / path
    return str(path.resolve())


def check_image(path: str, where: str) -> None:
    """The file exists and decodes as an image (read whole, then dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise UserError(f"{where}: image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(
            f"{where}: cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else 'corrupt'}"
        ) from None


def load_images(paths: list[str]) -> list[Any]:
    """The images as RGB (what image processors expect), in order."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as exc:  # gone or damaged since the data was checked
            raise UserError(
                f"image {path}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
            ) from None
    return images


def image_inputs(processor: Any, paths: list[str], device: Any = None) -> dict[str, Any]:
    """The image processor's model inputs for these files, in order (on `device`): `pixel_values`
    ([images, C, H, W]; Idefics3: [1, tiles, C, H, W] with its `pixel_attention_mask`)."""
    out = processor.image_processor(load_images(paths), return_tensors="pt")
    return {k: v.to(device) for k, v in out.items() if k in processor.image_processor.model_input_names}


def pixel_values(processor: Any, paths: list[str]) -> Any:
    """The image processor's `pixel_values` for these files, in order."""
    return image_inputs(processor, paths)["pixel_values"]


def tokens_per_image(processor: Any, wide: bool = False) -> tuple[str, int]:
    """The image placeholder and how many tokens the processor expands it to, from one blank
    image of its own size (`wide`: twice as wide; a fixed-count processor gives both the same)."""
    from PIL import Image

    token = processor.image_token
    size = getattr(processor.image_processor, "crop_size", None) or {"height": 224, "width": 224}
    blank = Image.new("RGB", (size["width"] * (1 + wide), size["height"]))
    ids = processor(text=token, images=[blank], add_special_tokens=False)["input_ids"][0]
    return token, sum(i == processor.tokenizer.convert_tokens_to_ids(token) for i in ids)


# Processors whose image tokens peftcli does not write (yet): a model of theirs is refused at
# preparation, in one line, rather than trained on tokens its processor would not give.
SIZE_DEPENDENT = "a number of tokens that depends on its size"
REFUSED = {
    "Qwen2VLProcessor": ("Qwen2-VL", SIZE_DEPENDENT),
    "Qwen2_5_VLProcessor": ("Qwen2.5-VL", SIZE_DEPENDENT),
    "LlavaNextProcessor": ("LLaVA-NeXT (anyres)", SIZE_DEPENDENT),
    "LlavaOnevisionProcessor": ("LLaVA-OneVision", SIZE_DEPENDENT),
    "SmolVLMProcessor": ("SmolVLM", SIZE_DEPENDENT),
    "Idefics2Processor": ("Idefics2", "its tokens between marks (<fake_token_around_image>)"),
}
SUPPORTED = "supported: fixed-count processors (LLaVA-1.5 style) and Idefics3"


@dataclass(frozen=True)
class ImageTokens:
    """What an image placeholder (`token`, as the chat template writes it) becomes in the token
    ids: `fixed` copies of it, or (fixed None: Idefics3) the processor's text for the image's
    size — its tiles' rows and columns, each tile `image_seq_len` tokens."""

    token: str
    fixed: int | None
    processor: Any

    @classmethod
    def of(cls, processor: Any) -> ImageTokens:
        kind = type(processor).__name__
        if kind == "Idefics3Processor":
            return cls(processor.image_token, None, processor)
        if kind in REFUSED:
            name, why = REFUSED[kind]
            raise UserError(
                f"{name}'s processor ({kind}) gives an image {why}, which peftcli does not compute for it",
                SUPPORTED,
            )
        token, count = tokens_per_image(processor)
        if tokens_per_image(processor, wide=True)[1] != count:
            raise UserError(
                f"the processor ({kind}) gives an image {SIZE_DEPENDENT}, which peftcli does not compute for it",
                SUPPORTED,
            )
        return cls(token, count, processor)

    def key(self) -> Any:
        """What the cached token ids depend on, beyond the tokenizer (a fixed count: as before)."""
        if self.fixed is not None:
            return [self.token, self.fixed]
        images = self.processor.image_processor.to_json_string()
        return [self.token, type(self.processor).__name__, self.processor.image_seq_len, images]

    def expansions(self, paths: list[str]) -> list[str]:
        """Each image's text, in order (sizes read from the files' headers, no pixels decoded)."""
        if self.fixed is not None:
            return [self.token * self.fixed] * len(paths)
        out = []
        for width, height in self.sizes(paths):
            _, rows, cols = self.processor.image_processor.get_number_of_image_patches(height, width, {})
            out.append(self.processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0))
        return out

    @staticmethod
    def sizes(paths: list[str]) -> list[tuple[int, int]]:
        """(width, height) of each image, from its header."""
        from PIL import Image

        out = []
        for path in paths:
            with Image.open(path) as image:
                out.append(image.size)
        return out

    def expand(self, text: str, expansions: list[str]) -> str:
        """`text` with its placeholders replaced, in order, by the images' texts (a prefix of the
        conversation holds the first few)."""
        parts = text.split(self.token)
        if len(parts) - 1 > len(expansions):  # a placeholder without an image: see `placeholders`
            expansions = expansions + [self.token * (self.fixed or 1)] * (len(parts) - 1 - len(expansions))
        return parts[0] + "".join(e + p for e, p in zip(expansions, parts[1:], strict=False))

    def placeholders(self, count: int, expansions: list[str]) -> float:
        """How many placeholders the rendered conversation held, from the `count` of image tokens
        in its ids (a placeholder without an image counts `fixed` tokens, or 1)."""
        if self.fixed is not None:
            return count / self.fixed
        return len(expansions) + count - self.count(expansions)

    def count(self, expansions: list[str]) -> int:
        return sum(e.count(self.token) for e in expansions)
