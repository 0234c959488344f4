"""``python -m regionmed`` (and ``torchrun -m regionmed``): the ``regionmed`` command."""

import sys

from regionmed.apps.cli import main

sys.exit(main())
