"""Files written through temporary files end with 0o666 & ~umask, like those `open` creates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csaligner import _file_mode
from csaligner._file_mode import apply_default_mode, current_umask, default_mode


@pytest.mark.parametrize("mask", [0o002, 0o027, 0o077])
def test_current_umask_reads_the_umask_and_leaves_it(mask: int) -> None:
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        assert os.umask(mask) == mask  # unchanged by the read
    finally:
        os.umask(old)


def test_current_umask_without_proc_sets_it_back(monkeypatch: pytest.MonkeyPatch, known_umask: int) -> None:
    def no_proc(*args: object, **kwargs: object) -> None:
        raise OSError("no /proc here")

    monkeypatch.setattr(_file_mode, "open", no_proc, raising=False)  # the module's open, not builtins.open
    assert current_umask() == known_umask
    assert os.umask(known_umask) == known_umask


def test_apply_default_mode_to_path_descriptor_and_folder(tmp_path: Path, known_umask: int) -> None:
    assert default_mode() == 0o640 and default_mode(directory=True) == 0o750
    plain = tmp_path / "plain"
    plain.write_text("x")  # what open() gives: the reference the others must match
    by_path, by_fd, folder = tmp_path / "a", tmp_path / "b", tmp_path / "d"
    by_path.touch(mode=0o600)
    by_path.chmod(0o600)
    apply_default_mode(by_path)
    fd = os.open(by_fd, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        apply_default_mode(fd)
    finally:
        os.close(fd)
    folder.mkdir(mode=0o700)
    apply_default_mode(folder, directory=True)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (plain, by_path, by_fd, folder)}
    assert modes == {"plain": 0o640, "a": 0o640, "b": 0o640, "d": 0o750}


def test_a_filesystem_that_refuses_chmod_still_gets_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some FUSE / object-store mounts refuse chmod: the mode is best effort, the write must not fail."""

    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)
    path = tmp_path / "f"
    path.write_text("x")
    apply_default_mode(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        apply_default_mode(fd)
    finally:
        os.close(fd)
    assert path.read_text() == "x"
