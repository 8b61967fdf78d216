"""The tree's private runtime directory, where every ipc:// endpoint lives.

Derived from the config file's absolute path, so two trees on one host never collide and
`supervise status CONFIG` finds the tree that `supervise CONFIG` started. Mode 0700 and owned by the
user, so no other user can reach a socket inside it.
"""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path


class RuntimeDirError(Exception):
    """The runtime directory exists but is not private to this user."""


def base_runtime_dir() -> Path:
    # XDG_RUNTIME_DIR is per user and 0700 already; /tmp is the fallback with a per-uid folder.
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "leasetree"
    return Path("/tmp") / f"leasetree-{os.getuid()}"


def runtime_dir(config_path: str | os.PathLike[str], create: bool = True) -> Path:
    """The folder for this config's tree: ``<base>/<stem>-<8 hex of the path's crc32>``.

    With ``create`` it makes the folders (0700) and checks they belong to this user and are
    private; raises RuntimeDirError otherwise.
    """
    resolved = str(Path(config_path).resolve())
    # crc32, not hashlib: hashlib loads OpenSSL (MBs resident in every process) for a name
    digest = f"{zlib.crc32(resolved.encode()):08x}"
    stem = Path(resolved).stem[:24] or "tree"
    path = base_runtime_dir() / f"{stem}-{digest}"
    if create:
        for folder in (path.parent, path):
            folder.mkdir(mode=0o700, exist_ok=True)
            check_private(folder)
    return path


def check_private(folder: Path) -> None:
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"runtime dir {folder} is not a directory")
    if info.st_uid != os.getuid():
        raise RuntimeDirError(f"runtime dir {folder} belongs to uid {info.st_uid}, not {os.getuid()}")
    if info.st_mode & 0o077:
        os.chmod(folder, 0o700)


def endpoint(folder: Path, name: str) -> str:
    """The ipc:// address of socket ``name`` in the runtime dir."""
    return f"ipc://{folder / (name + '.ipc')}"
