"""Atomic file writes: whoever reads the file (a resumed job, a server) sees the old content or
the new, never half of either, even after kill -9 or a power cut.

The data goes to `NAME.tmp` beside the file, is fsynced, then renamed over the file, and the
directory is fsynced so that the rename itself is on disk. Without the first fsync a crash soon
after the rename can leave the new name pointing at an empty or partial file (ext4, xfs).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write (and close) `path`'s new content to; it replaces `path`
    when the block ends without an error, and is removed when it raises."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root`, then `root` itself: before a job deletes what it
    could resume from (its checkpoint), what replaces it (a model directory that a library wrote
    with plain writes) must be on disk."""
    root = Path(root)
    for path in sorted(root.rglob("*"), reverse=True):  # files before the folders that hold them
        if path.is_symlink():
            continue
        _fsync(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    _fsync(root, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
