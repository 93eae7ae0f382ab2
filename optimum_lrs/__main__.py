"""`python -m optimum_lrs ...` and `torchrun -m optimum_lrs ...`: the `optimum-lrs` command line."""

import sys

from .integrations.cli import main

sys.exit(main())
