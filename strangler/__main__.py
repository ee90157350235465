"""`python -m strangler`: the same command line as the `strangler` script."""

import sys

from strangler.cli import main

sys.exit(main())
