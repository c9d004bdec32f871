"""`python train.py CONFIG [key=value ...]`: `phenoscale fit` as a script, for launchers.

fabric run, torchrun and srun start a Python file, not a console script, so this file exists:
  fabric run --accelerator cpu --devices 2 train.py configs/experiments/tiny.yaml
  torchrun --nproc_per_node 2 train.py configs/experiments/tiny.yaml
  srun python train.py configs/experiments/demo_mae.yaml
`phenoscale`'s global flags (-q/--quiet, -v/--verbose) may come first: train.py -q CONFIG ...
"""

import sys

from phenoscale.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    flags = [a for a in args if a in ("-q", "--quiet", "-v", "--verbose")]
    sys.exit(main([*flags, "fit", *[a for a in args if a not in flags]]))
