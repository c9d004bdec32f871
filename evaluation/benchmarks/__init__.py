"""Biological benchmarks on aligned embeddings: recall (exact streamed null), perturbation
consistency/magnitude, CORUM clusters, copairs mAP, batch generalisation, oracle recall.

Each benchmark module registers itself (`registry`); importing the package registers them all,
in the order `run_efaar` runs them and reports them."""

# registration order is run order: per alignment consistency, magnitude, map, recall, clusters; then generalisation
from evaluation.benchmarks import perturbation, retrieval, recall, clusters, generalisation  # noqa: F401, I001
from evaluation.benchmarks.registry import Benchmark, BenchmarkInput, benchmark_names, get_benchmark, register_benchmark

__all__ = ["Benchmark", "BenchmarkInput", "benchmark_names", "get_benchmark", "register_benchmark"]
