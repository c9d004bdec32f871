"""`python -m phenoscale ...`: the same command line as the `phenoscale` script, for launchers that
take a module (`torchrun -m phenoscale embed ...`) and environments where the script is not on PATH."""

import sys

from phenoscale.cli import main

sys.exit(main())
