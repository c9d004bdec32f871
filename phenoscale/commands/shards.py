"""Convert a microscope layout into WebDataset shards + manifest.parquet.

One sub-command per registered converter (datamodules.converters; `phenoscale shards LAYOUT -h`
lists its options); a converter registered by your own code appears here too.

Examples:
  phenoscale shards jump /data/BR00143976 shards/ --workers 8
  phenoscale shards jump /data/BR00117006 shards/ --channel-map 2=AGP,3=RNA,5=DNA
  phenoscale shards rxrx1 /data/rxrx1 shards/ --max-shard-mb 1024 --workers 16
  phenoscale shards folder sites.csv shards/
"""

from __future__ import annotations

import argparse
import os
import sys

from datamodules.config import DataConfig
from datamodules.converters import converter_names, get_converter, parse_channel_map, write_sites

HELP = "convert a microscope layout (" + " | ".join(sorted(converter_names())) + ") into shards + manifest.parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    layouts = parser.add_subparsers(dest="layout", metavar="LAYOUT", required=True)
    for name in sorted(converter_names()):
        converter = get_converter(name)
        p = layouts.add_parser(name, help=converter.summary, description=converter.summary)
        p.add_argument("src", help=converter.src_help)
        p.add_argument("out", help="output folder for shard-*.tar and manifest.parquet (must be empty)")
        p.add_argument(
            "--allow-missing",
            action="store_true",
            help="keep the channels present when a site misses some files (named in the JSON)",
        )
        if converter.channel_map:
            p.add_argument("--channel-map", help="file channel index to stain, e.g. 1=Brightfield,2=ER")
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="reader processes")
        p.add_argument(
            "--max-shard-mb",
            type=float,
            default=DataConfig.max_shard_mb,
            help=f"size limit of one shard (default {DataConfig.max_shard_mb})",
        )
        p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
        for option in converter.options:
            p.add_argument("--" + option.name.replace("_", "-"), dest=option.name, help=option.help)


def run(args: argparse.Namespace) -> int:
    try:
        return convert(args)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"phenoscale shards: error: {err}", file=sys.stderr)
        return 2


def convert(args: argparse.Namespace) -> int:
    converter = get_converter(args.layout)
    channel_map = parse_channel_map(args.channel_map) if getattr(args, "channel_map", None) else None
    options = {option.name: getattr(args, option.name) for option in converter.options}
    sites = converter.site_table(args.src, channel_map, **options)
    manifest = write_sites(
        sites,
        args.out,
        allow_missing=args.allow_missing,
        workers=args.workers,
        max_shard_mb=args.max_shard_mb,
        source=f"{args.layout} {args.src}",
        overwrite=args.overwrite,
    )
    print(f"wrote {manifest.height} sites in {manifest['shard'].n_unique()} shards to {args.out}")
    return 0
