"""`python -m fvg ...` is the `fvg` command (also under `accelerate launch -m fvg ...`)."""

import sys

from fvg.cli import main

sys.exit(main())
