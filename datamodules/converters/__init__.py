"""Converters from microscope layouts to shards: each describes its sites as a polars frame and
`common.write_sites` does the reading and writing, so all layouts behave alike. Each registers
itself (`registry`); importing the package registers the built-in layouts."""

from datamodules.converters.common import parse_channel_map, read_site, write_sites
from datamodules.converters.folder import folder_sites
from datamodules.converters.jump import jump_sites
from datamodules.converters.registry import (
    Converter,
    ConverterOption,
    converter_names,
    get_converter,
    register_converter,
)
from datamodules.converters.rxrx import rxrx1_sites, rxrx3_sites
from datamodules.converters.stacks import stack_sites

__all__ = [
    "parse_channel_map",
    "read_site",
    "write_sites",
    "folder_sites",
    "jump_sites",
    "rxrx1_sites",
    "rxrx3_sites",
    "stack_sites",
    "Converter",
    "ConverterOption",
    "converter_names",
    "get_converter",
    "register_converter",
]
