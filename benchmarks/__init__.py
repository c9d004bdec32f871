"""Speed and memory benchmarks (`make bench`).

Each `benchmarks/bench_*.py` exposes `run() -> list[Measurement]`. Every figure is reported as a
ratio against a baseline measured in the same run on the same machine, because absolute seconds
on a shared 2-core box say little; the machine description is written beside the numbers.
"""
