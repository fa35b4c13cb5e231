"""``python -m dinov3geo`` runs the command line."""

import sys

from dinov3geo.cli import main

sys.exit(main())
