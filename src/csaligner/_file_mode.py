"""The permission bits a written file should end with: what `open(path, "w")` gives, 0o666 & ~umask.

`tempfile.mkstemp` creates owner-only files (0600), `tempfile.mkdtemp` owner-only folders (0700), and
safetensors' `save_file` writes 0600 too, whatever the umask. A file written through one of them and
renamed into place would keep that mode, so on a shared cluster other users could not read a feature
cache or an adapter although every other file of the run is readable. Writers here end with
`apply_default_mode`, which gives the mode the user's umask asks for.
"""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask, read without leaving it changed.

    Linux (4.7+) shows it in /proc/self/status, read without touching it. Elsewhere the only way is to
    set a umask and put the old one back; 0o077 is set for that instant, not 0, so a file another thread
    creates meanwhile is at worst too private, never world-writable.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """0o666 & ~umask for a file, 0o777 & ~umask for a folder: what `open` / `os.mkdir` create."""
    return (0o777 if directory else 0o666) & ~current_umask()


def apply_default_mode(target: str | os.PathLike[str] | int, directory: bool = False) -> None:
    """chmod a file (path or open file descriptor) or a folder to `default_mode`.

    Args:
        target: a path, or the descriptor of a file still open for writing (`os.fchmod`).
        directory: the target is a folder (mode 0o777 & ~umask).

    Best effort: where the filesystem refuses chmod, the file keeps the mode it was written with.
    """
    mode = default_mode(directory)
    try:
        if isinstance(target, int):
            os.fchmod(target, mode)
        else:
            os.chmod(target, mode)
    except OSError:  # a filesystem without modes (some FUSE / object-store mounts): the file is written all the same
        pass
