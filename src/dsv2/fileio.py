"""Writing files and directories so that a crash or a power cut leaves the complete old version or the complete new
one, never a torn file, a mix of both or nothing.

    with atomic_write(path) as f:                     # one file (json, a checkpoint)
        json.dump(obj, f)
    with atomic_directory(path, keep=...) as tmp:     # a whole directory (a model): written into tmp, swapped in
        save_file(tensors, os.path.join(tmp, "model.safetensors"))

Both write beside the target (the same filesystem, so the final rename is atomic), fsync the data before the rename
and the parent directory after it (without that, a power cut can undo the rename or keep the name with empty data),
and remove their staging when the block raises. One writer per path at a time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from typing import Callable, Iterator

STAGING = ".dsv2-tmp"  # suffix of a file or directory being written
ASIDE = ".dsv2-old"  # suffix of a directory's previous version during the swap


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Yield a file opened for writing ("w": UTF-8 text, "wb": bytes) in place of `path`. When the block ends it is
    flushed, fsynced and renamed over `path`, and the directory is fsynced; when it raises, `path` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode 'w' or 'wb', not {mode!r}")
    path = os.fspath(path)
    tmp = path + STAGING
    try:
        with open(tmp, mode, encoding=None if mode == "wb" else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextmanager
def atomic_directory(path: str | os.PathLike, keep: Callable[[str], bool] = lambda name: False) -> Iterator[str]:
    """Yield an empty staging directory that replaces the directory `path` as a whole when the block ends.

    Entries of the old `path` that the block did not write and for which keep(name) is true (a tokenizer, a README)
    are carried over as hard links. Everything is fsynced, then swapped in by two renames:

        path -> path.dsv2-old,  path.dsv2-tmp -> path,  remove path.dsv2-old

    A crash leaves the complete old version at `path`; or, between the renames, the old one at path.dsv2-old and the
    complete new one at path.dsv2-tmp (`recover_directory` finishes the swap, and the next save calls it); or the
    new one at `path`. When the block raises, `path` is untouched."""
    path = os.path.realpath(os.fspath(path))  # a symlinked model directory is replaced where it really lives
    parent = os.path.dirname(path)
    staging, aside = path + STAGING, path + ASIDE
    recover_directory(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory; a model is saved as a directory: choose another "
                         "path or move the file away")
    os.makedirs(parent, exist_ok=True)
    os.mkdir(staging)
    try:
        yield staging
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if keep(name) and not os.path.lexists(os.path.join(staging, name)):
                    _carry(os.path.join(path, name), os.path.join(staging, name))
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(path):
        os.rename(path, aside)
        os.rename(staging, path)
        fsync_dir(parent)
        shutil.rmtree(aside)
    else:
        os.rename(staging, path)
        fsync_dir(parent)


def recover_directory(path: str | os.PathLike) -> None:
    """Finish the swap of an `atomic_directory` that a crash interrupted, and remove the staging of one that never
    got that far; nothing to do after a clean save."""
    path = os.path.realpath(os.fspath(path))
    staging, aside = path + STAGING, path + ASIDE
    if os.path.lexists(aside):
        if not os.path.lexists(path):  # crashed between the renames: the staging directory is complete
            os.rename(staging if os.path.isdir(staging) else aside, path)
            fsync_dir(os.path.dirname(path))
        if os.path.lexists(aside):
            shutil.rmtree(aside)
    if os.path.lexists(staging):
        shutil.rmtree(staging)


def interrupted_swap(path: str | os.PathLike) -> str | None:
    """What to do about `path` when a crash stopped an `atomic_directory` swap between its renames, else None."""
    path = os.path.realpath(os.fspath(path))
    if os.path.lexists(path) or not os.path.isdir(path + ASIDE):
        return None
    return (f"saving into {path} was interrupted between moving the old version aside and moving the new one in: "
            f"{path + STAGING} holds the complete new version and {path + ASIDE} the previous one. Run "
            f"`mv {path + STAGING} {path}` (and remove {path + ASIDE}), or save again")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the names in `directory` (a rename, a new file) durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # directories cannot be opened on this platform (Windows): renames are durable there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file and directory under `directory`, each directory after its contents."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _carry(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # instant, no extra space; the old directory's link goes when it is removed
    except OSError:  # hard links unsupported here
        shutil.copy2(src, dst)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
