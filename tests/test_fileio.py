"""atomic_write and atomic_directory: whatever step a crash interrupts, the complete old version or the complete new
one is left, every byte of the new one reached the disk before it took the name, and no staging is left behind."""
import os
from pathlib import Path

import pytest

from dsv2.fileio import ASIDE, STAGING, atomic_directory, atomic_write, recover_directory


def _record_fsyncs(monkeypatch) -> set:
    """(device, inode) of everything fsynced from now on; inodes survive renames, so this names the final files."""
    seen, real = set(), os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        seen.add((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _inode(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _tree(d) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def test_atomic_write_replaces_the_file_durably(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_text("old")
    seen = _record_fsyncs(monkeypatch)
    with atomic_write(target) as f:
        f.write("new")
        assert target.read_text() == "old"  # nothing shows under the name until the block ends
    assert target.read_text() == "new"
    assert _inode(target) in seen and _inode(tmp_path) in seen  # the bytes, then the rename, reached the disk
    assert os.listdir(tmp_path) == ["a.json"]


def test_a_crash_inside_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(target, "wb") as f:
            f.write(b"half")
            raise OSError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def _old_model(target: Path) -> None:
    (target / "sub").mkdir(parents=True)
    (target / "weights-1-of-2.bin").write_bytes(b"old 1")
    (target / "weights-2-of-2.bin").write_bytes(b"old 2")
    (target / "notes.txt").write_text("mine")
    (target / "sub" / "x").write_text("x")


OLD = {"notes.txt": b"mine", "sub/x": b"x", "weights-1-of-2.bin": b"old 1", "weights-2-of-2.bin": b"old 2"}
NEW = {"notes.txt": b"mine", "sub/x": b"x", "weights.bin": b"new"}


def _write_new(target: Path) -> None:
    before = _tree(target) if target.exists() else None
    with atomic_directory(target, keep=lambda name: not name.startswith("weights")) as tmp:
        (Path(tmp) / "weights.bin").write_bytes(b"new")
        assert (_tree(target) if target.exists() else None) == before  # untouched while the new one is written


def test_atomic_directory_swaps_in_the_new_version_and_carries_the_kept_files(tmp_path, monkeypatch):
    target = tmp_path / "m"
    _old_model(target)
    seen = _record_fsyncs(monkeypatch)
    _write_new(target)
    assert _tree(target) == NEW
    for p in (target, target / "weights.bin", target / "notes.txt", target / "sub", target / "sub" / "x", tmp_path):
        assert _inode(p) in seen, p
    assert os.listdir(tmp_path) == ["m"]
    _write_new(tmp_path / "fresh")  # no previous version: just the new one
    assert _tree(tmp_path / "fresh") == {"weights.bin": b"new"}


class Crash(BaseException):
    """Stands for a SIGKILL or a power cut at that point (a BaseException: nothing treats it as a recoverable error)."""


@pytest.mark.parametrize("crash_at", ["writing", "carrying", "aside", "swap", "cleanup"])
def test_a_crash_at_any_step_leaves_a_whole_directory(tmp_path, monkeypatch, crash_at):
    target = tmp_path / "m"
    _old_model(target)
    real_rename, real_link = os.rename, os.link

    def rename(src, dst):
        if (crash_at == "aside" and str(dst).endswith(ASIDE)) or (crash_at == "swap" and str(src).endswith(STAGING)):
            raise Crash
        real_rename(src, dst)

    def link(src, dst, **kw):
        if crash_at == "carrying":
            raise Crash
        real_link(src, dst, **kw)

    def rmtree(path, *a, **kw):
        if crash_at == "cleanup":
            raise Crash
        real_rmtree(path, *a, **kw)

    import shutil
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(shutil, "rmtree", rmtree)

    def new_weights(tmp):
        (Path(tmp) / "weights.bin").write_bytes(b"new")
        if crash_at == "writing":
            raise Crash

    with pytest.raises(Crash):
        with atomic_directory(target, keep=lambda name: not name.startswith("weights")) as tmp:
            new_weights(tmp)
    monkeypatch.undo()

    if crash_at == "swap":  # the one moment the name is empty: both versions are whole beside it
        assert not target.exists()
        assert _tree(str(target) + ASIDE) == OLD and _tree(str(target) + STAGING) == NEW
    else:
        assert _tree(target) == (NEW if crash_at == "cleanup" else OLD)
    recover_directory(target)
    assert _tree(target) == (NEW if crash_at in ("swap", "cleanup") else OLD)
    _write_new(target)  # the next save starts from whatever the crash left
    assert _tree(target) == NEW and os.listdir(tmp_path) == ["m"]


def test_atomic_directory_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "m").write_text("a file")
    with pytest.raises(ValueError, match="not a directory"):
        with atomic_directory(tmp_path / "m"):
            pass
    assert (tmp_path / "m").read_text() == "a file"
