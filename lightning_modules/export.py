"""A model as a folder anyone can load: `model.safetensors` + `config.json` (the phenoscale format).

Lightning checkpoints are pickles of a training state (optimizer, loops, data position) that
only phenoscale's code can rebuild; safetensors holds nothing but tensors and can be read
without running code. `config.json` carries what rebuilding and embedding need: the ModelConfig
(incl. the MLP-bias layout the weights were trained with), the channels in order, the crop size,
how pixels are standardised and the default embedding. The same folder goes to the Hugging Face
Hub unchanged (`lightning_modules.hub`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_modules.base import PhenoModule
from lightning_modules.families import get_family
from lightning_modules.standardize import DTYPE_MAX, INSTANCE_NORM_EPS

FORMAT = "phenoscale"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"


class DroppedSubmodule(nn.Module):
    """Stands in for a part an --encoder-only export left out (an MAE decoder, WSL heads)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"this model was exported with --encoder-only: {self.name!r} is not part of it; only embed() works"
        )


def export_config(module: PhenoModule, *, channels: list[str] | None, encoder_only: bool) -> dict[str, Any]:
    """config.json of `module`: what to rebuild it and what its inputs must be."""
    hparams = dict(module.hparams)
    cfg = module.model_cfg
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": cfg.family,
        "model_cfg": hparams["model_cfg"],
        "optim_cfg": hparams["optim_cfg"],
        "in_chans": module.in_chans,
        "num_classes": module.num_classes,
        "encoder_only": encoder_only,
        "channels": channels,
        "crop_size": cfg.img_size,
        "standardisation": {
            "input": sorted(str(d).removeprefix("torch.") for d in DTYPE_MAX),
            "divide_by": "the dtype's maximum",
            "then": "per-image, per-channel instance norm",
            "eps": INSTANCE_NORM_EPS,
        },
        "mlp_bias_layout": cfg.mlp_bias_layout,
        "embedding": {"pooling": cfg.embed_pooling, "block": cfg.embed_block},
    }


def export_state_dict(module: PhenoModule, encoder_only: bool) -> dict[str, Tensor]:
    """The tensors to write: all, or only those of the submodules embed() uses."""
    state = module.state_dict()
    if encoder_only:
        keep = tuple(f"{name}." for name in module.embedding_submodules)
        state = {k: v for k, v in state.items() if k.startswith(keep)}
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_export(
    module: PhenoModule, out_dir: str | Path, *, channels: list[str] | None = None, encoder_only: bool = False
) -> Path:
    """OUT_DIR/model.safetensors and OUT_DIR/config.json; returns OUT_DIR."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(export_state_dict(module, encoder_only), out / WEIGHTS, metadata={"format": FORMAT})
    config = export_config(module, channels=channels, encoder_only=encoder_only)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_export_config(folder: str | Path) -> dict[str, Any] | None:
    """The folder's config.json if it is a phenoscale export, else None (e.g. an OpenPhenom folder)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        return None
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: phenoscale export format_version {config.get('format_version')!r}; "
            f"this phenoscale reads version {FORMAT_VERSION}"
        )
    return config


def _check_consistent(config: dict[str, Any], module: PhenoModule, path: Path) -> None:
    """The human-readable fields of config.json must say what model_cfg says (no silent edits)."""
    cfg = module.model_cfg
    stated = {
        "crop_size": cfg.img_size,
        "mlp_bias_layout": cfg.mlp_bias_layout,
        "embedding": {"pooling": cfg.embed_pooling, "block": cfg.embed_block},
    }
    wrong = [f"{k}={config.get(k)!r} (model_cfg: {v!r})" for k, v in stated.items() if config.get(k) != v]
    if wrong:
        raise ValueError(f"{path}: config.json contradicts its model_cfg: {', '.join(wrong)}")


def module_from_export(folder: str | Path, config: dict[str, Any]) -> tuple[PhenoModule, dict[str, Tensor]]:
    """The module of a phenoscale export folder (config from read_export_config) and the weights
    to load into it strictly; an --encoder-only export's other parts are DroppedSubmodules."""
    folder = Path(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: phenoscale export without its {WEIGHTS}")
    try:
        family = get_family(config["family"])
        module = family.module(
            config["model_cfg"],
            config["optim_cfg"],
            in_chans=int(config["in_chans"]),
            num_classes=int(config["num_classes"]),
        )
    except KeyError as err:
        raise ValueError(f"{folder / CONFIG}: missing or unknown {err}") from None
    _check_consistent(config, module, folder / CONFIG)
    if config.get("encoder_only"):
        for name, _ in list(module.named_children()):
            if name not in module.embedding_submodules:
                setattr(module, name, DroppedSubmodule(name))
    try:
        return module, load_file(weights)
    except SafetensorError as err:
        raise ValueError(f"{weights} is not a safetensors file: {err}") from None
