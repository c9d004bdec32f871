"""How much a command prints: `phenoscale --quiet` / `-v`, and Lightning lines nobody can act on.

Lightning's own messages (device summary, seed, "Trainer.fit stopped") and phenoscale's start-up
lines go through the `lightning.*` loggers; setting their level is the one switch. Lightning's
litlogger advertisement, printed at every Trainer construction whatever the loggers, is dropped.
"""

from __future__ import annotations

import logging

#: loggers whose level the CLI flags set (Lightning's, and this project's packages')
LOGGERS = ("lightning.pytorch", "lightning.fabric", "phenoscale", "datamodules", "lightning_modules", "evaluation")
_RANK_ZERO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropAdvertisement(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


_FILTER = _DropAdvertisement()


def set_verbosity(level: int) -> None:
    """Level of every logger in LOGGERS (logging.WARNING for --quiet, DEBUG for -v)."""
    import lightning.pytorch  # noqa: F401 - importing it sets its loggers to INFO: set ours after

    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in _RANK_ZERO:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def is_quiet() -> bool:
    """True under --quiet: progress bars and progress lines are off too."""
    return not logging.getLogger("lightning.pytorch").isEnabledFor(logging.INFO)
