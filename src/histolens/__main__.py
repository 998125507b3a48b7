"""``python -m histolens`` runs the ``histolens`` command."""

import sys

from .cli import main

sys.exit(main())
