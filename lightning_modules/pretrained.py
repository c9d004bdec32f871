"""load_pretrained: public OpenPhenom checkpoints, phenoscale's own checkpoints and exports, the Hub.

OpenPhenom ('MAEModel') ships `config.json` and a `model.safetensors` that is really a
`torch.save({"state_dict": sd})` pickle. Its 765 keys map 1:1 onto CAMAEModule, so loading is
strict: every key used, every shape checked, and a mismatch names the keys.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lightning_modules.base import PhenoModule
from lightning_modules.build import as_plain_dict
from lightning_modules.config import OptimConfig, model_config_dict
from lightning_modules.export import WEIGHTS, module_from_export, read_export_config
from lightning_modules.families import get_family
from lightning_modules.hub import download, is_hub_uri

#: The settings of the public OpenPhenom (CA-MAE ViT-S/16) when no config.json is at hand.
OPENPHENOM_CONFIG: dict[str, Any] = {
    "mask_ratio": 0.0,
    "norm_pix_loss": False,
    "fourier_loss_weight": 0.0,
    "encoder": {
        "channel_agnostic": True,
        "max_in_chans": 11,
        "vit_backbone": {"vit_backbone": {"_target_": "vit.vit_small_patch16_256"}},
    },
    "decoder": {
        "_target_": "mae_modules.CAMAEDecoder",
        "depth": 8,
        "embed_dim": 512,
        "num_heads": 16,
        "num_modalities": 6,
        "tokens_per_modality": 256,
    },
    "optimizer": {"_target_": "timm.optim.lion.Lion", "lr": 1e-4, "weight_decay": 0.05, "betas": [0.9, 0.95]},
    "lr_scheduler": {"pct_start": 0.1},
}

MAX_KEYS_LISTED = 25


def reference_config_to_phenoscale(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """An OpenPhenom/maes_microscopy config dict -> (ModelConfig dict, OptimConfig dict, in_chans)."""
    try:
        encoder, decoder = config["encoder"], config["decoder"]
        vit_target = encoder["vit_backbone"]["vit_backbone"]["_target_"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"not an OpenPhenom/maes_microscopy config: missing {err}") from err
    channel_agnostic = bool(encoder.get("channel_agnostic", False))
    backbone = ("ca_" if channel_agnostic else "") + vit_target.rsplit(".", 1)[-1]
    in_chans = int(decoder.get("num_modalities", 6)) if channel_agnostic else 6
    optimizer = config.get("optimizer") or {}
    family = "camae" if channel_agnostic else "mae"
    section = dict(
        mask_ratio=float(config.get("mask_ratio", 0.75)),
        decoder_dim=int(decoder["embed_dim"]),
        decoder_depth=int(decoder["depth"]),
        decoder_heads=int(decoder["num_heads"]),
        fourier_alpha=float(config.get("fourier_loss_weight", 0.0)),
        norm_pix=bool(config.get("norm_pix_loss", False)),
    )
    if channel_agnostic:
        section["max_in_chans"] = int(encoder.get("max_in_chans", 11))
    # every maes_microscopy/OpenPhenom model was trained on a timm from before issue #2653
    model = {"family": family, "backbone": backbone, "mlp_bias_layout": "legacy", family: section}
    optim = OptimConfig(
        name="lion" if "lion" in str(optimizer.get("_target_", "lion")).lower() else "adamw",
        lr=float(optimizer.get("lr", 1e-4)),
        weight_decay=float(optimizer.get("weight_decay", 0.05)),
        betas=list(optimizer.get("betas", [0.9, 0.95])),
        warmup_fraction=float((config.get("lr_scheduler") or {}).get("pct_start", 0.1)),
    )
    return model_config_dict(model), as_plain_dict(optim, OptimConfig), in_chans


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_LISTED])
    return shown + (f", … ({len(keys) - MAX_KEYS_LISTED} more)" if len(keys) > MAX_KEYS_LISTED else "")


def load_state_dict_strictly(module: torch.nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load every key with its exact shape, or raise one error naming all the problems."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} (model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = [
        f"{title} ({len(keys)}): {_listing(keys)}"
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"checkpoint {source} does not fit {type(module).__name__}:\n  " + "\n  ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def checkpoint_format(path: Path) -> str:
    """ "torch" (a zip or legacy torch.save pickle) or "safetensors", from the file's first bytes.

    Sniffed rather than tried in turn, so that a damaged checkpoint or a pickle that weights-only
    loading refuses reports its own error instead of a guess at another format.
    """
    with path.open("rb") as handle:
        head = handle.read(9)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    raise ValueError(f"{path} is neither a torch checkpoint nor a safetensors file (starts with {head!r})")


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """torch pickle (OpenPhenom's '.safetensors', Lightning .ckpt) or a real safetensors file.

    The file is handed to torch.load as a file object: given a path ending in .safetensors,
    torch >= 2.14 parses it as safetensors, which OpenPhenom's pickle is not.
    """
    if checkpoint_format(path) == "safetensors":
        try:
            return {"state_dict": load_file(path)}
        except SafetensorError as err:
            raise ValueError(f"{path}: damaged safetensors file: {err}") from err
    try:
        with path.open("rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: cannot read this torch checkpoint: {err}") from err


def _reference_config(path: Path, config: dict[str, Any] | str | Path | None) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    config_path = Path(config) if config is not None else path.with_name("config.json")
    if config is None and not config_path.exists():
        return OPENPHENOM_CONFIG
    return json.loads(config_path.read_text())


def load_pretrained(source: str | Path, config: dict[str, Any] | str | Path | None = None) -> PhenoModule:
    """Checkpoint, export folder or Hub repo -> module in eval mode, on CPU.

    `source` is one of
    * a phenoscale Lightning checkpoint (has `hyper_parameters`): rebuilds its own module;
    * a folder written by `phenoscale export` (config.json with "format": "phenoscale");
    * `hf://org/repo[@revision]`: either kind of folder, from the Hugging Face Hub (lightning_modules.hub);
    * anything else is OpenPhenom's format, a file or the folder holding it as model.safetensors:
      a `{"state_dict": ...}` with `config` (dict or JSON path; default: `config.json` beside the
      file, else the OpenPhenom settings), always in the legacy MLP-bias layout it was trained in.
    """
    if is_hub_uri(source):
        source = download(str(source))
    path = Path(source)
    if path.is_dir():
        export = read_export_config(path)
        if export is not None:
            module, state_dict = module_from_export(path, export)
            load_state_dict_strictly(module, state_dict, str(path))
            module.channel_names = export.get("channels")
            return module.eval()
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{path} holds neither a phenoscale export nor OpenPhenom's {WEIGHTS} "
                f"(found: {sorted(p.name for p in path.iterdir())[:10]})"
            )
        path = path / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = _read_checkpoint(path)
    if "hyper_parameters" in payload:
        hparams = payload["hyper_parameters"]
        module = get_family(hparams["model_cfg"]["family"]).module(**hparams)
    else:
        model_cfg, optim_cfg, in_chans = reference_config_to_phenoscale(_reference_config(path, config))
        module = get_family(model_cfg["family"]).module(model_cfg, optim_cfg, in_chans=in_chans)
    state_dict = payload.get("state_dict", payload)
    load_state_dict_strictly(module, state_dict, str(path))
    return module.eval()
