"""The registry of model families: the one list of what `model.family` may name.

A family is a LightningModule class plus the dataclass of its own config section
(`model.<name>` in YAML) and how tables and plots name it. Everything that enumerates families
(config validation, `build_module`, checkpoint loading, the demo, CLI choices, plot colours)
reads this registry, so a new family is one module that calls `register_family` - from inside
the package or from a user's own code (docs/ARCHITECTURE.md, "Add a model family").

This module imports nothing of the package (only the shared, pure-Python `registry`), so configs
and modules can both depend on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from registry import Registry

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Family:
    """One model family and everything the framework needs to know about it."""

    name: str
    module: type  # a lightning_modules.PhenoModule subclass; built as module(model_cfg, optim_cfg, in_chans=...)
    config: type  # dataclass of the model.<name> section, validated when a config is loaded
    label: str  # how tables and plots name the family ("CA-MAE")
    colour: str = "#555555"  # its line colour in plots
    # trained without labels: its untrained (random-init) twin is the baseline it must beat
    self_supervised: bool = False
    # flat model.<key> names from before the per-family sections -> field of `config`
    legacy_keys: Mapping[str, str] = field(default_factory=dict)


_FAMILIES: Registry[Family] = Registry(
    "model.family",
    origin=lambda f: f"{f.module.__module__}.{f.module.__qualname__}",
    # the same class again (a module reloaded, a plugin imported twice) is not a collision
    same=lambda old, new: (
        (old.module.__module__, old.module.__qualname__) == (new.module.__module__, new.module.__qualname__)
    ),
)


def register_family(
    name: str,
    *,
    config: type,
    label: str,
    colour: str = "#555555",
    self_supervised: bool = False,
    legacy_keys: Mapping[str, str] | None = None,
) -> Callable[[T], T]:
    """Class decorator: register the decorated LightningModule as model family `name`.

    Registering a second class under a taken name is an error (two plugins that collide must
    not silently replace each other); re-registering the same class is a no-op.
    """

    def register(module: T) -> T:
        _FAMILIES.register(name, Family(name, module, config, label, colour, self_supervised, dict(legacy_keys or {})))
        module.family = name
        return module

    return register


def get_family(name: Any) -> Family:
    """The registered family `name`, or a ValueError that lists the registered ones."""
    return _FAMILIES.get(name)


def family_names() -> tuple[str, ...]:
    """Registered family names, in registration order (the built-in mae, camae, wsl first)."""
    return _FAMILIES.names()
