"""``python -m headscore.cli`` (e.g. under torchrun): the ``headscore`` command."""

import sys

from . import main

sys.exit(main())
