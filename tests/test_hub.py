"""hf://org/repo[@revision] without a network: a Hub cache laid out as huggingface_hub writes it,
offline mode, and a mocked Hub for the errors only an online Hub gives and for --push."""

from __future__ import annotations

import shutil
from pathlib import Path
from unittest.mock import MagicMock

import huggingface_hub
import lightning as L
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

from lightning_modules import load_pretrained
from lightning_modules.hub import HubError, parse_hub_uri
from phenoscale.cli import main as cli
from tiny_models import real_crops, tiny_module

REPO_ID = "phenoscale-test/tiny-camae"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hub_cache: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Put `folder`'s files into a Hub cache as huggingface_hub lays it out (refs -> snapshot)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        shutil.copy(path, snapshot / path.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, its export folder) of a tiny CA-MAE."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(1)
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(tiny_module("camae"))
    trainer.save_checkpoint(root / "tiny.ckpt")
    assert cli(["export", str(root / "tiny.ckpt"), str(root / "export")]) == 0
    return root / "tiny.ckpt", root / "export"


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache in offline mode (what HF_HOME=<dir> HF_HUB_OFFLINE=1 give a new process)."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_uris_parse():
    assert parse_hub_uri("hf://recursionpharma/OpenPhenom") == ("recursionpharma/OpenPhenom", None)
    assert parse_hub_uri("hf://org/repo@v1.0") == ("org/repo", "v1.0")
    with pytest.raises(ValueError, match="hf://org/repo or hf://org/repo@revision"):
        parse_hub_uri("hf://just-a-name")


def test_cached_repo_loads_offline_with_the_checkpoints_embeddings(exported, offline_cache, shared_data):
    checkpoint, folder = exported
    cache_repo(offline_cache, REPO_ID, folder)
    cache_repo(offline_cache, REPO_ID, folder, revision="v1")
    images = real_crops(shared_data, 2)
    expected = load_pretrained(checkpoint).embed(images)
    for uri in (f"hf://{REPO_ID}", f"hf://{REPO_ID}@v1"):
        assert torch.equal(load_pretrained(uri).embed(images), expected)


def test_missing_repo_and_file_offline_are_clear(exported, offline_cache):
    with pytest.raises(
        HubError, match=rf"hf://{REPO_ID}: config.json is not in the Hub cache .* \(HF_HUB_OFFLINE is set\)"
    ):
        load_pretrained(f"hf://{REPO_ID}")
    snapshot = cache_repo(offline_cache, REPO_ID, exported[1])
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(HubError, match="model.safetensors is not in the Hub cache"):
        load_pretrained(f"hf://{REPO_ID}")


def test_a_repo_in_another_format_is_a_clear_error(exported, offline_cache, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"architectures": ["BertModel"]}')
    (foreign / "model.safetensors").write_bytes(b"not weights")
    cache_repo(offline_cache, REPO_ID, foreign)
    with pytest.raises(ValueError, match="neither a torch checkpoint nor a safetensors file"):
        load_pretrained(f"hf://{REPO_ID}")


def test_online_hub_errors_are_clear(monkeypatch):
    def missing_repo(repo_id, filename, revision=None):
        raise RepositoryNotFoundError("404", response=MagicMock())

    def missing_file(repo_id, filename, revision=None):
        raise EntryNotFoundError("404")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing_repo)
    with pytest.raises(HubError, match="no such repository on the Hub"):
        load_pretrained("hf://nobody/nothing")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing_file)
    with pytest.raises(HubError, match="the repository has no file config.json"):
        load_pretrained("hf://nobody/nothing")


def test_export_push_uploads_the_folder(exported, tmp_path, monkeypatch):
    api = MagicMock()
    api.upload_folder.return_value.commit_url = "https://huggingface.co/org/tiny/commit/abc"
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    assert cli(["export", str(exported[0]), str(tmp_path / "out"), "--push", "org/tiny"]) == 0
    api.create_repo.assert_called_once_with("org/tiny", private=False, exist_ok=True)
    uploaded = Path(api.upload_folder.call_args.kwargs["folder_path"])
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
