"""A named pipe fed once, for tests of commands that must read an input file once (``<(cmd)``)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def fed_pipe(path: Path, text: str) -> Iterator[Path]:
    """A FIFO at ``path`` whose first reader gets ``text``. A second open would wait forever for a writer, so
    after the first, the writer lets any later reader go with an empty pipe (which fails the run) instead of
    hanging; on exit a writer still waiting for its reader goes too."""
    os.mkfifo(path)
    done = threading.Event()

    def writer() -> None:
        with open(path, "w", encoding="utf-8") as fh:  # waits until the command opens the pipe
            fh.write(text)
        while not done.is_set():
            with contextlib.suppress(OSError):  # ENXIO while no one reads
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            time.sleep(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(10)
