"""OpenPhenom embeddings against the reference implementation's own numbers.

tests/fixtures/openphenom_reference.npz was written by tests/fixtures/make_openphenom_reference.py
running recursionpharma/maes_microscopy (timm 1.0.11) in its own environment; here phenoscale
loads the same seeded weights as an OpenPhenom-format checkpoint and must agree to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.openphenom_reference import (
    CHANNEL_SUBSET,
    FIXTURE,
    SEED,
    digest,
    reference_images,
    seeded_encoder_weights,
)
from lightning_modules.blocks import set_mlp_bias_layout
from lightning_modules.families import get_family
from lightning_modules.pretrained import load_state_dict_strictly, reference_config_to_phenoscale

TOLERANCE = 1e-5


def relative_error(ours: torch.Tensor, reference: np.ndarray) -> float:
    expected = torch.from_numpy(reference)
    return float((ours - expected).norm() / expected.norm())


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as fixture:
        return {key: fixture[key] for key in fixture.files}


@pytest.fixture(scope="module")
def openphenom(shared_data: Path, reference):
    """The module load_pretrained builds for an OpenPhenom file, with the fixture's seeded encoder."""
    config = json.loads((shared_data / "formats/openphenom_config.json").read_text())
    model_cfg, optim_cfg, in_chans = reference_config_to_phenoscale(config)
    module = get_family(model_cfg["family"]).module(model_cfg, optim_cfg, in_chans=in_chans)
    state = module.state_dict()
    weights = seeded_encoder_weights({k: tuple(v.shape) for k, v in state.items()}, SEED)
    assert digest(weights) == str(reference["weights_digest"]), "seeded weights differ from the reference's"
    load_state_dict_strictly(module, {**state, **weights}, "seeded OpenPhenom")
    return module.eval()


@pytest.fixture(scope="module")
def images(shared_data: Path, reference) -> torch.Tensor:
    crops = reference_images(shared_data)
    assert digest({"images": crops}) == str(reference["images_digest"])
    return crops


@pytest.mark.slow
def test_openphenom_matches_the_reference_in_all_three_cases(openphenom, images, reference):
    assert openphenom.model_cfg.mlp_bias_layout == "legacy"
    assert list(reference["channel_subset"]) == CHANNEL_SUBSET
    errors = {
        "mean_6": relative_error(openphenom.embed(images), reference["mean_6"]),
        "mean_5": relative_error(openphenom.embed(images[:, CHANNEL_SUBSET]), reference["mean_5"]),
        "channelwise_6": relative_error(openphenom.embed(images, pooling="channelwise"), reference["channelwise_6"]),
    }
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.slow
def test_the_fixed_layout_does_not_match(openphenom, images, reference):
    """The fixture can tell the layouts apart: timm's fixed layout is off by far more than 1e-5."""
    set_mlp_bias_layout(openphenom, "fixed")
    try:
        error = relative_error(openphenom.embed(images), reference["mean_6"])
    finally:
        set_mlp_bias_layout(openphenom, "legacy")
    assert error > 1e-3
