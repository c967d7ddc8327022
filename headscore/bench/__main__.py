"""``python -m headscore.bench --memory-worker NAME --worker-args JSON``: the worker process in which
``headscore bench`` measures one method's peak memory (:func:`.memory.worker_main`). Not a user command:
the bench itself is ``headscore bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .memory import worker_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the memory worker named by the two hidden options; without them, point to ``headscore bench``."""
    p = argparse.ArgumentParser(prog="python -m headscore.bench", description=__doc__.splitlines()[0])
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-args", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.memory_worker or args.worker_args is None:
        print("python -m headscore.bench: error: this is the memory worker of `headscore bench`; "
              "run `headscore bench` (see headscore bench --help)", file=sys.stderr)
        return 2
    worker_main(args.memory_worker, json.loads(args.worker_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
