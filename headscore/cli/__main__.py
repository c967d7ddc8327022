"""``python -m headscore.cli`` (e.g. under torchrun): the ``headscore`` command."""

from . import run

run()
