"""Dropping root: ``[supervisor] user`` and ``group``, applied once by the root process, early.

A tree started as root runs its children as ``user``:``group``. The root process itself drops, so
every child it forks afterwards inherits the lower ids and nothing of the tree can get root back.
Order matters (each step needs the privilege the next one removes): supplementary groups, then the
gid, then the uid. Call ``drop_privileges`` *before* the runtime dir is created: its path is derived
from the uid, so the dropped user gets a folder of its own (``/tmp/leasetree-<uid>/...``) rather
than one inside root's 0700 folder it could not enter. Files made as root before the drop (a new
SQLite database, a log file) can be handed over with ``chown_for``.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path


class PrivilegeError(Exception):
    """The user or group cannot be used, or we are not allowed to switch; one line for the operator."""


def resolve_ids(user: str, group: str) -> tuple[int | None, int | None, list[int]]:
    """(uid, gid, supplementary gids) for ``user`` and ``group`` (names or numeric ids).

    ``user`` "" keeps the uid (None); ``group`` "" means the user's primary group, or keeps the gid
    (None) when no user is given either. A user's supplementary groups are the ones the group
    database lists for it. Raises PrivilegeError naming the key for an unknown name.
    """
    uid = gid = None
    user_name = ""
    if user:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise PrivilegeError(f"supervisor.user = {user!r}: no such user on this host") from None
        uid, gid, user_name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"supervisor.group = {group!r}: no such group on this host") from None
    if gid is None:
        return uid, None, []
    groups = os.getgrouplist(user_name, gid) if user_name else [gid]
    return uid, gid, sorted(set(groups))


def drop_privileges(user: str, group: str) -> None:
    """Become ``user``:``group`` for good (see ``resolve_ids`` for what "" means).

    No-op when both are "", or when the process already runs as exactly those ids. Otherwise it
    needs root: as any other user it raises PrivilegeError (one line) rather than pretending. After
    the switch it checks that root cannot be regained, and points ``HOME``/``USER``/``LOGNAME`` at
    the new user and drops ``XDG_RUNTIME_DIR`` (root's, which the new user cannot use).
    """
    if not user and not group:
        return
    uid, gid, groups = resolve_ids(user, group)
    if (uid is None or uid == os.getuid() == os.geteuid()) and \
            (gid is None or gid == os.getgid() == os.getegid()):
        return
    if os.geteuid() != 0:
        what = f"supervisor.user = {user!r}" if user else f"supervisor.group = {group!r}"
        raise PrivilegeError(f"{what}: switching user or group needs root, and this runs as uid "
                             f"{os.geteuid()}; start as root or leave it empty")
    if gid is not None:
        os.setgroups(groups)
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - a kernel that lets this happen is not one to run on
            raise PrivilegeError(f"supervisor.user = {user!r}: root could be regained after the drop")
        entry = pwd.getpwuid(uid)
        os.environ.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    os.environ.pop("XDG_RUNTIME_DIR", None)


def chown_for(path: str | os.PathLike[str], user: str, group: str) -> None:
    """Give ``path`` (and, for a folder, everything in it) to ``user``:``group``, so the tree can
    still use it after ``drop_privileges(user, group)``. Symlinks are changed, never followed.

    No-op when both are "". Raises PrivilegeError for an unknown name, or when not root.
    """
    if not user and not group:
        return
    uid, gid, _ = resolve_ids(user, group)
    if os.geteuid() != 0:
        raise PrivilegeError(f"chown of {path} to {user or '-'}:{group or '-'} needs root")
    owner, members = -1 if uid is None else uid, -1 if gid is None else gid
    root = Path(path)
    os.chown(root, owner, members, follow_symlinks=False)
    if root.is_dir() and not root.is_symlink():
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                os.chown(os.path.join(folder, name), owner, members, follow_symlinks=False)
