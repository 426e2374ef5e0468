"""Writing directories so that no reader ever sees half of one, and several processes can share
them: build in a temporary sibling, sync, rename into place, under an advisory lock.

Used for everything facert writes that another process may read: converted model directories
and exported engine directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def directory_lock(target: Path) -> Iterator[None]:
    """Hold the lock of a directory facert writes: flock on `.NAME.lock` beside it. The holder
    removes the file before unlocking, so the directory is left clean; a waiter that then wins
    the removed file's lock sees that and locks the current file instead."""
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A temporary sibling directory to build `target` in. When the block succeeds its files are
    synced and it is renamed into place; otherwise it is removed. Hold directory_lock(target):
    any other sibling temporary directory then belongs to a killed export and is removed."""
    for leftover in [*target.parent.glob(f".{target.name}.tmp-*"),
                     *target.parent.glob(f".{target.name}.old-*")]:  # fmt: skip
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.mkdir()  # not mkdtemp: its mode 0700 would stay on the finished directory
    try:
        yield tmp
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        _replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there once renamed


def _replace(new: Path, target: Path) -> None:
    """Rename `new` to `target`. An existing `target` is renamed aside first and removed after:
    a process reading it keeps its open files, and the new directory appears whole."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
