"""``python -m grpo ...`` and ``torchrun --nproc_per_node=N -m grpo train ...``."""

import sys

from grpo.cli import main

sys.exit(main())
