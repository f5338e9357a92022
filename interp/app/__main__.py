"""`python -m interp.app` is the `interp` command."""

import sys

from interp.app.cli import main

sys.exit(main())
