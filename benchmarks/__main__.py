"""`python -m benchmarks [name ...]`: run bench_*.py modules and write the results table."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from benchmarks.harness import write_results, write_table
from lightning_modules.hardware import numerics


def main(argv: list[str]) -> None:
    here = Path(__file__).resolve().parent
    names = argv or sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    print(f"== numerics: {numerics('cpu').describe()}", flush=True)
    for name in names:
        print(f"== benchmark {name}", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        measurements = module.run()
        for m in measurements:
            ratio = f"  ratio {m.ratio:.2f}x" if m.ratio is not None else ""
            print(f"   {m.name}: {m.value:.4g} {m.unit}{ratio}  target: {m.target or '-'}  met: {m.met}")
        write_results(name, measurements)
    print(f"table: {write_table()}")


if __name__ == "__main__":
    main(sys.argv[1:])
