"""``python -m dmdx ...`` (also what ``torchrun -m dmdx`` and ``dmdx distill --nproc N`` run)."""

import sys

from .cli import main

sys.exit(main())
