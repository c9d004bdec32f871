"""The registry of converters: the one list of layouts `phenoscale shards <layout>` can read.

A converter only describes a layout's sites as a site table (`converters.common`: one row per
site, the metadata, `channels` and the matching `files`); `write_sites` does the reading and
writing for all of them. Registering one here (from the package or from user code) makes it a
`phenoscale shards` sub-command with its own options (docs/ARCHITECTURE.md, "Add a converter").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from registry import Registry


@dataclass(frozen=True)
class ConverterOption:
    """A text option of one converter: `--name-with-dashes VALUE`, passed as `name=VALUE` (None if unset)."""

    name: str
    help: str


@dataclass(frozen=True)
class Converter:
    """How to turn one microscope layout into a site table."""

    name: str
    sites: Callable[..., pl.DataFrame]  # sites(src, [channel_map=...], **options) -> site table
    summary: str  # one line in `phenoscale shards --help`
    src_help: str = "source folder"
    # takes `channel_map` ({file channel index: stain}) from --channel-map
    channel_map: bool = True
    options: tuple[ConverterOption, ...] = ()

    def site_table(self, src: str, channel_map: dict[int, str] | None = None, **options: Any) -> pl.DataFrame:
        """The layout's sites; refuses a channel map the layout has no use for."""
        if self.channel_map:
            return self.sites(src, channel_map, **options)
        if channel_map:
            raise ValueError(f"--channel-map does not apply to the {self.name} layout")
        return self.sites(src, **options)


_CONVERTERS: Registry[Converter] = Registry("layout", origin=lambda c: c.sites.__module__)


def register_converter(converter: Converter) -> Converter:
    """Add `converter`; a second one under a taken name is an error, the same one again a no-op."""
    return _CONVERTERS.register(converter.name, converter)


def get_converter(name: str) -> Converter:
    return _CONVERTERS.get(name)


def converter_names() -> tuple[str, ...]:
    return _CONVERTERS.names()
