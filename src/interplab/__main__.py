"""`python -m interplab ...`, which is also how torchrun starts it: `torchrun --nproc_per_node 2 -m interplab ...`."""

import sys

from interplab.cli import main

sys.exit(main())
