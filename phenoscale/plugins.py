"""User code that registers model families, converters or benchmarks, imported before any command runs.

Registries fill when the registering module is imported; for `phenoscale ...`, `train.py` and the
processes a launcher starts, that import must happen before the parser is built. Two ways name
such modules: an installed package's entry point in the group `phenoscale.plugins`, or
`PHENOSCALE_PLUGINS=pkg.module,other.module` in the environment (handy on a cluster, where the
variable reaches every rank).
"""

from __future__ import annotations

import functools
import importlib
import os
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "phenoscale.plugins"
ENV_VAR = "PHENOSCALE_PLUGINS"


@functools.cache
def load_plugins() -> tuple[str, ...]:
    """Import every plugin module once; returns their names. A plugin that fails to import is an error."""
    names = [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    names += [n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name.split(":", 1)[0])
        except ImportError as err:
            raise ImportError(
                f"phenoscale plugin {name!r} (from {ENTRY_POINT_GROUP} or ${ENV_VAR}) does not import: {err}"
            ) from err
    return tuple(names)
