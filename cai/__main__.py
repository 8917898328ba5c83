"""`python -m cai ...`, which is what `accelerate launch -m cai ...` runs in each process."""

import sys

from cai.cli import main

sys.exit(main())
