"""Convert a microscope layout into WebDataset shards + manifest.parquet.

  phenoscale shards rxrx1 SRC OUT           SRC holds metadata.csv and {experiment}/Plate{n}/{well}_s{site}_w{1..6}.png
  phenoscale shards rxrx3 SRC OUT           the same layout with 16-bit PNGs and the RxRx3 metadata.csv
  phenoscale shards jump SRC OUT            a folder of Opera Phenix TIFFs; channel map from --load-data,
                                            a single load_data table in SRC, or --channel-map
  phenoscale shards folder TABLE OUT        a CSV with one row per site and FileName_<Stain> columns

Examples:
  phenoscale shards jump /data/BR00143976 shards/ --workers 8
  phenoscale shards jump /data/BR00117006 shards/ --channel-map 2=AGP,3=RNA,5=DNA
  phenoscale shards rxrx1 /data/rxrx1 shards/ --max-shard-mb 1024 --workers 16
"""
from __future__ import annotations

import argparse
import os
import sys

from datamodules.config import DataConfig
from datamodules.converters import folder_sites, jump_sites, parse_channel_map, rxrx1_sites, rxrx3_sites, write_sites

HELP = "convert rxrx1 | rxrx3 | jump | folder images into shards + manifest.parquet"
LAYOUTS = ("rxrx1", "rxrx3", "jump", "folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("layout", choices=LAYOUTS, help="source layout")
    parser.add_argument("src", help="source folder (folder layout: the CSV/parquet site table)")
    parser.add_argument("out", help="output folder for shard-*.tar and manifest.parquet (must be empty)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="keep the channels present when a site misses some files (named in the JSON)")
    parser.add_argument("--channel-map", help="file channel index to stain, e.g. 1=Brightfield,2=ER (rxrx*, jump)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="reader processes")
    parser.add_argument("--max-shard-mb", type=float, default=DataConfig.max_shard_mb,
                        help=f"size limit of one shard (default {DataConfig.max_shard_mb})")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    jump = parser.add_argument_group("jump")
    jump.add_argument("--load-data", help="CellProfiler load_data table giving FileName_Orig<Stain> per channel")
    jump.add_argument("--plate", help="plate name (default: the load_data table's Metadata_Plate, else SRC's name)")
    jump.add_argument("--experiment", help="experiment / batch name (default: the plate)")
    jump.add_argument("--well-metadata",
                      help="table with 'well' + perturbation, perturbation_type, is_control, cell_type")


def run(args: argparse.Namespace) -> int:
    try:
        return convert(args)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"phenoscale shards: error: {err}", file=sys.stderr)
        return 2


def convert(args: argparse.Namespace) -> int:
    channel_map = parse_channel_map(args.channel_map) if args.channel_map else None
    if args.layout == "folder" and channel_map:
        raise ValueError("--channel-map does not apply to the folder layout: stains are its FileName_<Stain> columns")
    if args.layout == "rxrx1":
        sites = rxrx1_sites(args.src, channel_map)
    elif args.layout == "rxrx3":
        sites = rxrx3_sites(args.src, channel_map)
    elif args.layout == "jump":
        sites = jump_sites(args.src, channel_map, load_data=args.load_data, plate=args.plate,
                           experiment=args.experiment, well_metadata=args.well_metadata)
    else:
        sites = folder_sites(args.src)
    manifest = write_sites(sites, args.out, allow_missing=args.allow_missing, workers=args.workers,
                           max_shard_mb=args.max_shard_mb, source=f"{args.layout} {args.src}", overwrite=args.overwrite)
    print(f"wrote {manifest.height} sites in {manifest['shard'].n_unique()} shards to {args.out}")
    return 0
