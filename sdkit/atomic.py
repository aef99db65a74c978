"""Atomic writes: a file or folder appears complete under its name, or not at all.

    with atomic_file("model.safetensors") as tmp:
        save_file(state, str(tmp))

A run killed mid-write (a checkpoint, a cache, a diffusers folder) leaves the previous version intact instead of
a truncated file that fails to load later. The data is written under a temporary name next to the target, flushed
to disk (fsync), and moved over the target in one rename.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def check_writable(path: Path) -> None:
    """Refuse to replace a read-only file: a rename would replace it anyway (the folder is what is written), and
    for root even ``os.access`` says yes, so the file's own write bits are read."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{str(path)!r} is a folder; give a file name")
    if path.exists() and (not path.stat().st_mode & 0o222 or not os.access(path, os.W_OK)):
        raise PermissionError(errno.EACCES, f"{str(path)!r} is read-only; make it writable (chmod u+w) or "
                                            "write to another name")


def check_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse, before writing, ``needed`` bytes that the file system of ``folder`` does not have free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if needed > free:
        raise OSError(errno.ENOSPC, f"not enough space to write {what}: it needs about {needed / 2**20:,.0f} MB, "
                                    f"{free / 2**20:,.0f} MB are free in {str(folder)!r}; free some space or write "
                                    "elsewhere")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path`` in one step, else delete it.

    A read-only ``path`` is refused (PermissionError); an existing file keeps its permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path)
    mode = (path.stat().st_mode & 0o7777) if path.exists() else 0o666 & ~_umask()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; give the usual (or the replaced file's) permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``folder`` by renames, else it is deleted.

    An existing ``folder`` is replaced whole: the caller decides whether it may be (check before entering)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        for d in [tmp, *[d for d in tmp.rglob("*") if d.is_dir()]]:
            os.chmod(d, 0o777 & ~_umask())
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
