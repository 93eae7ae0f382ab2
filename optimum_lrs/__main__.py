"""`python -m optimum_lrs ...` and `torchrun -m optimum_lrs ...`: the `optimum-lrs` command line."""

import sys

from .cli import main

sys.exit(main())
