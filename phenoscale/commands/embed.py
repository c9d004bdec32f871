"""Embed every site of a shard set with a trained model; write the embeddings parquet.

CHECKPOINT is a phenoscale checkpoint (runs/<name>/checkpoints/last.ckpt) or a public
OpenPhenom file (its config.json beside it). Each site is tiled into non-overlapping crops,
each crop embedded, and the crop embeddings averaged per site. The parquet holds the
manifest's metadata columns plus `embedding` (Array(Float32, D)), ready for
`phenoscale evaluate`.

Data settings (crop size, channels, batch size) come from --config, else from the run's
config.yaml when CHECKPOINT lives in a run directory, else the defaults with the model's crop
size. Runs in one process with a progress bar, or under torchrun/srun with the sites split
over ranks: each rank writes its part to OUT.parts/ and rank 0 concatenates them into OUT
(`--merge` redoes only that step, e.g. after rank 0 was interrupted while merging).

With --images instead of SHARDS, raw images are embedded without writing shards: a site table
(CSV/TSV/parquet with FileName_<Stain> columns), a folder of Opera Phenix TIFFs (stains from
--channel-map or its load_data table) or a folder of multi-channel TIFF / OME-TIFF stacks (one
per site). Tiles, standardisation and averaging are those of the shard path.

CHECKPOINT may also be a `phenoscale export` folder or hf://org/repo[@revision] (Hugging Face
Hub; HF_HOME and HF_HUB_OFFLINE=1 are honoured).

Examples:
  phenoscale embed runs/tiny/checkpoints/last.ckpt screen/shards runs/tiny/embeddings/screen.parquet
  phenoscale embed hf://recursionpharma/OpenPhenom --images plate1/ emb.parquet --channel-map 1=Brightfield,2=ER
  phenoscale embed exports/camae --images sites.csv emb.parquet --channels DNA,RNA,AGP
  phenoscale embed openphenom/model.safetensors jump_shards/ emb.parquet --pooling channelwise
  torchrun --nproc_per_node 8 -m phenoscale.cli embed last.ckpt shards/ emb.parquet --block -2
  phenoscale embed last.ckpt shards/ emb.parquet --merge
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from phenoscale.commands import add_checkpoint, stain_list
from phenoscale.config import ConfigError, load_config

HELP = "embed every site of SHARDS with CHECKPOINT -> embeddings parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser)
    parser.add_argument(
        "shards",
        nargs="?",
        help="shard directory (with manifest.parquet) or a glob of its .tar files (not with --images)",
    )
    parser.add_argument("out", help="output parquet path, e.g. runs/<name>/embeddings/<shards>.parquet")
    parser.add_argument("--config", help="experiment YAML for the data settings (default: the run's config.yaml)")
    parser.add_argument("--pooling", choices=("mean", "cls", "channelwise"), help="default: the model's")
    parser.add_argument("--block", type=int, help="encoder block to embed from (negative counts from the end)")
    parser.add_argument("--batch-size", type=int, help="crops per batch (default: data.batch_size)")
    parser.add_argument("--num-workers", type=int, help="loader processes (default: data.num_workers)")
    parser.add_argument(
        "--images", help="embed raw images instead of shards: a site table, a Phenix folder or TIFF stacks"
    )
    parser.add_argument("--channel-map", help="--images: file channel number to stain, e.g. 1=Brightfield,2=ER")
    parser.add_argument(
        "--channels",
        type=stain_list,
        help="stains to embed, in order, comma-separated (default: the model's, else all)",
    )
    parser.add_argument("--allow-missing", action="store_true", help="--images: embed the channels present")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="only concatenate the ranks' parts already in OUT.parts/ into OUT (CHECKPOINT is not loaded)",
    )
    parser.add_argument(
        "--precision",
        default="32",
        help="32 (default), bf16 (bfloat16 autocast: faster only where the hardware has native bf16; "
        "TVN can amplify its rounding) or auto (bf16 where native, else 32)",
    )


def data_config(args: argparse.Namespace, crop_size: int):
    """The data section: --config, else <run>/config.yaml next to checkpoints/, else defaults."""
    run_config = Path(args.checkpoint).resolve().parent.parent / "config.yaml"
    source = args.config or (str(run_config) if run_config.is_file() else None)
    overrides = [f"data.train_shards={args.shards}", f"data.eval_shards={args.shards}"]
    if source is None:
        overrides.append(f"data.crop_size={crop_size}")
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.num_workers is not None:
        overrides.append(f"data.num_workers={args.num_workers}")
    cfg = load_config(source, overrides)
    return OmegaConf.to_object(cfg.data), cfg.run.seed


def run(args: argparse.Namespace) -> int:
    import lightning_modules
    from lightning_modules.hardware import check_embed_precision
    from phenoscale.embedding import embed_model, merge_parts

    if args.merge:
        from datamodules.streaming import resolve_shards

        try:
            written = merge_parts(args.out, resolve_shards(args.shards, verify=False)[1])
        except (ValueError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"[phenoscale] embeddings written to {written}")
        return 0
    try:
        if (args.images is None) == (args.shards is None):
            raise ValueError("give either SHARDS or --images SRC (not both)")
        check_embed_precision(args.precision)  # before the checkpoint load, which can take minutes
        model = lightning_modules.load_pretrained(args.checkpoint)
        if args.images is not None:
            written = embed_raw_images(model, args, args.channels)
        else:
            data_cfg, seed = data_config(args, model.model_cfg.img_size)
            data_cfg.channels = args.channels or data_cfg.channels or model.channel_names
            written = embed_model(model, data_cfg, args.out, args.pooling, args.block, seed, args.precision)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if written is not None:
        print(f"[phenoscale] embeddings written to {written}")
    return 0


def embed_raw_images(model, args: argparse.Namespace, channels: list[str] | None) -> Path:
    """--images: embed_images on the images, written as the embeddings parquet."""
    from datamodules.converters import parse_channel_map
    from evaluation.embeddings_io import write_embeddings
    from phenoscale.images import embed_images

    channel_map = parse_channel_map(args.channel_map) if args.channel_map else None
    frame = embed_images(
        model,
        args.images,
        channel_map=channel_map,
        channels=channels,
        pooling=args.pooling,
        block=args.block,
        batch_size=args.batch_size or 64,
        workers=args.num_workers or 4,
        precision=args.precision,
        allow_missing=args.allow_missing,
    )
    return write_embeddings(frame, args.out)
