"""`python -m mmeff` runs the command line."""

import sys

from mmeff.cli import main

sys.exit(main())
