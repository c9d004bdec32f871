"""Evaluate an embeddings parquet (evaluation.write_embeddings layout) with the EFAAR benchmarks.

Writes OUT/metrics.json, OUT/report.md and figures: recall per source against random, a
clustered cosine map of the most related genes, and (with --truth) model against oracle recall.

  phenoscale evaluate runs/x/embeddings.parquet --annotations CORUM HuMAP --alignment tvn none --out runs/x/eval
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.annotations import SOURCES
from evaluation.benchmarks import benchmark_names
from evaluation.config import EvalConfig
from evaluation.embeddings_io import read_embeddings
from evaluation.pipeline import run_efaar
from evaluation.report import write_outputs

HELP = "evaluate embeddings: EFAAR recall, consistency, clusters, mAP, generalisation -> metrics.json, report.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("embeddings", type=Path, help="embeddings parquet (metadata + embedding Array column)")
    parser.add_argument(
        "--annotations",
        nargs="+",
        default=list(SOURCES),
        help="relationship files (entity1,entity2) or source names in $PHENOSCALE_SHARED/data/annotations",
    )
    parser.add_argument(
        "--alignment", nargs="+", default=["tvn"], help="first is primary: none centerscale pca_centerscale tvn"
    )
    parser.add_argument("--truth", type=Path, default=None, help="synthetic screen truth/ dir: adds the oracle recall")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--batch-column", default="experiment", help="alignment batches ('' for one batch)")
    parser.add_argument("--perturbation-column", default="perturbation")
    parser.add_argument("--control-column", default="is_control")
    parser.add_argument("--control-label", default=None, help="controls are rows whose perturbation equals this")
    parser.add_argument("--aggregation", default="mean", choices=["mean", "median"])
    parser.add_argument(
        "--benchmarks", nargs="+", default=list(benchmark_names(default_only=True)), choices=list(benchmark_names())
    )
    parser.add_argument("--clusters", default="CORUM_clusters.tsv", help="cluster file ('' to skip)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    cfg = EvalConfig(
        annotations=list(args.annotations),
        alignment=list(args.alignment),
        batch_column=args.batch_column or None,
        perturbation_column=args.perturbation_column,
        control_column=args.control_column,
        control_label=args.control_label,
        aggregation=args.aggregation,
        benchmarks=list(args.benchmarks),
        clusters=args.clusters or None,
        truth_dir=str(args.truth) if args.truth else None,
        seed=args.seed,
    )
    result = run_efaar(read_embeddings(args.embeddings), cfg)
    report = write_outputs(result, args.out, str(args.embeddings))
    for name, value in result.summary().items():
        if not name.count("/"):
            print(f"{name}: {'not computable' if value is None else f'{value:.4f}'}")
    print(f"wrote {args.out / 'metrics.json'} and {report}")
    return 0
