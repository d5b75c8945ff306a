"""Writing a file so that a reader never sees half of it: the one atomic writer of the project.

The content goes to a temporary file beside the target, which then replaces the target in one
`os.replace`. The temporary file is created like any other file (mode 0666 less the umask, usually
0644), not with `tempfile.mkstemp`'s private 0600, so results and metrics stay readable by the
group and by other tools exactly as a plain `open(path, "w")` would leave them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` when the block succeeds, else is removed.

    `suffix` ends the temporary name, for writers that choose a format by extension (".xlsx").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` (UTF-8) through a temporary file forced to disk, then `os.replace`."""
    # "x" creates a new file, with the mode a plain open() would give it (0666 less the umask).
    with atomic_output(path) as temporary, open(temporary, "x", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


__all__ = ["atomic_output", "atomic_write_text"]
