"""`peftcli push`: a finished run's adapter (or a merged model folder) to the Hugging Face Hub.

Built on huggingface_hub: `create_repo` (private unless `--public`), then one commit
(`create_commit`) holding the model files at the repo's root — the adapter as PEFT saved it, its
tokenizer and model card — and, for a run, its recipe.yaml, eval.json, metrics.jsonl and loss.png
under `peftcli/`. The card is the one peftcli wrote, pointed at the repo id.

The token comes from huggingface_hub's own sources (`HF_TOKEN`, `hf auth login`'s stored token:
`huggingface_hub.get_token()`); peftcli hands it to `HfApi` and nothing else: it is never
printed, logged or written, and a file that contains it is refused before anything is sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli import outputs
from peftcli.errors import UserError
from peftcli.run_folder.layout import ADAPTER, Layout, has_adapter, is_run, is_unfinished


def what_to_push(path: Path, merged: bool) -> tuple[str, Path, list[tuple[str, Path]]]:
    """(kind, model folder, [(path in repo, local file)]); refuses anything but a finished run
    or a folder `peftcli merge` wrote."""
    path = path.expanduser()
    if path.name == ADAPTER and is_run(path.parent):
        path = path.parent
    if is_run(path):
        run = Layout(path)
        if is_unfinished(path) or not has_adapter(run.adapter):
            raise UserError(
                f"{path} is not a finished run (it has no saved adapter yet)", "let it finish, or --resume it"
            )
        if merged:
            raise UserError(
                f"{path} is a run: --merged pushes a merged model folder",
                f"merge it first: `peftcli merge {path} -o OUT`, then `peftcli push OUT REPO_ID`",
            )
        files = _files(run.adapter) + [(f"peftcli/{f.name}", f) for f in run.shared_files() if f.is_file()]
        return "adapter", run.adapter, files
    if path.is_dir() and outputs.kind_of(path) == "merge" and (path / "config.json").is_file():
        return "merged", path, _files(path)
    raise UserError(
        f"{path} is not a finished peftcli run or a merged model folder",
        "push a run folder (runs/NAME) or a folder `peftcli merge` wrote",
    )


def _files(folder: Path) -> list[tuple[str, Path]]:
    """Every file under `folder` but hidden ones (peftcli's marker, temporary files)."""
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append((rel.as_posix(), p))
    return found


def token() -> str:
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise UserError(
            "push needs a Hugging Face token, and none is set",
            "run `hf auth login`, or set HF_TOKEN (write access to the repo)",
        )
    return found


def check_no_token(files: list[tuple[str, Path]], secret: str) -> None:
    """Refuse to upload a file that holds the token (it should never be in one)."""
    needle = secret.encode()
    for _, local in files:
        if needle in local.read_bytes():
            raise UserError(
                f"{local} contains your Hugging Face token; refusing to upload it", "remove it first"
            )


def push(
    path: Path, repo_id: str, private: bool = True, merged: bool = False, api: Any = None
) -> dict[str, Any]:
    """Upload; `api` is an `HfApi` (or a stand-in with create_repo/create_commit, for tests)."""
    from huggingface_hub import CommitOperationAdd, constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from peftcli.cards import point_at, write_run_card
    from peftcli.console import say

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("it needs the form owner/name")
    except HFValidationError as exc:
        raise UserError(f"REPO_ID {repo_id!r} is not a Hub repo id: {str(exc).splitlines()[0]}") from None
    kind, folder, files = what_to_push(path, merged)
    secret = token()
    if api is None and constants.HF_HUB_OFFLINE:
        raise UserError("push needs the network, and HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE")
    if kind == "adapter":
        write_run_card(folder.parent)
    check_no_token(files, secret)
    card = point_at(folder, repo_id)
    operations = [
        CommitOperationAdd(
            path_in_repo=name, path_or_fileobj=card.encode() if name == "README.md" and card else local
        )
        for name, local in files
    ]
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=secret)
    say(
        f"peftcli: pushing {len(files)} files from {folder} to {repo_id} ({'private' if private else 'public'})"
    )
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.create_commit(
            repo_id=repo_id,
            repo_type="model",
            operations=operations,
            commit_message=f"peftcli push: {kind} from {folder.parent.name if kind == 'adapter' else folder.name}",
        )
    except Exception as exc:  # the Hub's answer (401, 403, a network error): one line, no token
        if type(exc).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise UserError(f"the Hub refused the push to {repo_id}: {str(exc).splitlines()[0]}") from None
        raise
    return {
        "repo_id": repo_id,
        "url": str(getattr(url, "url", url)),
        "private": private,
        "kind": kind,
        "files": [name for name, _ in files],
        "commit": str(getattr(commit, "commit_url", commit)),
    }
