"""The per-site metadata contract (docs/ARCHITECTURE.md), checked in exactly one place.

Every writer (converters, the synthetic screen) and every reader (manifest checks) goes through
`validate_metadata`, so a sample that reaches a shard is known to carry the keys the models and
the evaluation rely on, with the types they expect.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# key -> python type it must have in the JSON (bool is checked before int: bool is an int subclass)
REQUIRED_KEYS: dict[str, type] = {
    "key": str,
    "experiment": str,
    "plate": str,
    "well": str,
    "site": int,
    "perturbation": str,
    "perturbation_type": str,
    "is_control": bool,
    "cell_type": str,
    "channels": list,
}
ALLOWED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
# extra metadata keys are allowed if their values are JSON scalars (they become manifest columns)
_SCALARS = (str, int, float, bool, type(None))
MAX_KEY_LENGTH = 90  # tar (USTAR) member names hold 100 characters, including ".json"
# columns the writer adds to the manifest beside the metadata
SHARD_COLUMNS = ("shard", "height", "width", "dtype")


def validate_image(image: np.ndarray, key: str = "?") -> None:
    """A site image must be C x H x W at its acquired integer depth (never rescaled floats)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"sample {key!r}: image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3:
        raise ValueError(f"sample {key!r}: image must be C x H x W, got shape {image.shape}")
    if image.dtype not in ALLOWED_DTYPES:
        raise ValueError(f"sample {key!r}: image dtype {image.dtype} not allowed; use uint8 or uint16")


def validate_metadata(meta: dict[str, Any], n_channels: int | None = None) -> dict[str, Any]:
    """Check `meta` against REQUIRED_KEYS; return a copy with numpy scalars turned into python ones.

    Raises ValueError naming the sample key and the offending metadata key.
    """
    if not isinstance(meta, dict):
        raise ValueError(f"metadata must be a dict, got {type(meta).__name__}")
    key = meta.get("key", "?")
    out: dict[str, Any] = {}
    for name, value in meta.items():
        if isinstance(value, np.generic):
            value = value.item()
        out[name] = value
    for name, kind in REQUIRED_KEYS.items():
        if name not in out:
            raise ValueError(
                f"sample {key!r}: metadata key {name!r} is missing; required keys: {sorted(REQUIRED_KEYS)}"
            )
        value = out[name]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise ValueError(
                f"sample {key!r}: metadata key {name!r} must be {kind.__name__}, got {type(value).__name__} ({value!r})"
            )
    if not out["key"] or any(c in out["key"] for c in "./\\ ") or len(out["key"]) > MAX_KEY_LENGTH:
        raise ValueError(
            f"sample {key!r}: metadata key 'key' must be 1-{MAX_KEY_LENGTH} characters without '.', '/', '\\' or spaces"
        )
    channels = out["channels"]
    if not channels or not all(isinstance(c, str) and c for c in channels):
        raise ValueError(f"sample {key!r}: metadata key 'channels' must be a non-empty list of stain names")
    if n_channels is not None and len(channels) != n_channels:
        raise ValueError(
            f"sample {key!r}: metadata key 'channels' names {len(channels)} channels but the image has {n_channels}"
        )
    for name, value in out.items():
        if name in SHARD_COLUMNS:
            raise ValueError(f"sample {key!r}: metadata key {name!r} is reserved for the manifest")
        if name not in REQUIRED_KEYS and not isinstance(value, _SCALARS):
            raise ValueError(
                f"sample {key!r}: extra metadata key {name!r} must be a str/int/float/bool/None, "
                f"got {type(value).__name__}"
            )
    return out
