"""`python -m app.cli` is the `resa` command."""

import sys

from app.cli import main

sys.exit(main())
