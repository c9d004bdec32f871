"""`hf://org/repo[@revision]`: models on the Hugging Face Hub, through huggingface_hub's own cache.

Downloads go to huggingface_hub's cache, so HF_HOME / HF_HUB_CACHE choose where and
HF_HUB_OFFLINE=1 serves a cached repo without a network. Both kinds of repo share their file
names: a phenoscale export (lightning_modules.export) and OpenPhenom's (config.json + a
model.safetensors that is a torch pickle); load_pretrained tells them apart by config.json.
"""

from __future__ import annotations

import re
from pathlib import Path

PREFIX = "hf://"
FILES = ("config.json", "model.safetensors")
OPTIONAL_FILES = ("README.md",)
_URI = re.compile(r"hf://([\w.-]+/[\w.-]+)(?:@([\w./-]+))?")


class HubError(FileNotFoundError):
    """A Hub repository, revision or file that cannot be had (online or from the cache)."""


def is_hub_uri(source: object) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_hub_uri(uri: str) -> tuple[str, str | None]:
    """'hf://org/repo@rev' -> ('org/repo', 'rev'); revision None means the default branch."""
    match = _URI.fullmatch(uri)
    if not match:
        raise ValueError(f"{uri!r} is not a Hub address; expected hf://org/repo or hf://org/repo@revision")
    return match.group(1), match.group(2)


def _download(repo_id: str, filename: str, revision: str | None, required: bool = True) -> Path | None:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError:
        if not required:
            return None
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise HubError(
            f"{where}: {filename} is not in the Hub cache {constants.HF_HUB_CACHE} and cannot be "
            f"downloaded{offline}; download it once online, or set HF_HOME to the cache that has it"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{where}: no such repository on the Hub (a private or gated one needs `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: the repository has no revision {revision!r}") from None
    except EntryNotFoundError:
        if not required:
            return None
        raise HubError(
            f"{where}: the repository has no file {filename} (a model repo holds {', '.join(FILES)})"
        ) from None


def download(uri: str) -> Path:
    """The local snapshot folder holding the model files of `uri` (downloaded if not cached)."""
    repo_id, revision = parse_hub_uri(uri)
    paths = [_download(repo_id, name, revision) for name in FILES]
    for name in OPTIONAL_FILES:
        _download(repo_id, name, revision, required=False)
    return paths[0].parent


def push(folder: str | Path, repo_id: str, *, private: bool = False, message: str = "phenoscale export") -> str:
    """Upload an export folder to `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    parse_hub_uri(f"{PREFIX}{repo_id}")  # the same names hf:// accepts
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    return str(getattr(commit, "commit_url", commit))
