"""Whether a directory lies on a file system that may stop answering (network, FUSE).

Why: the dev app takes two shortcuts on the event loop, for speed: a cached file's
``stat()`` (so a cache hit costs no thread hop) and a small site's snapshot after a build.
On a local disk those take microseconds. On a network mount that stopped answering (NFS,
SMB, sshfs), a ``stat()`` waits in the kernel until the server answers, and on the event
loop that froze every client of the server, ACP sessions included. Where the site lies on
such a file system, those take a thread too (abandoned on cancel).

How: on Linux, the type of the mount the directory's real path lies under, from
``/proc/self/mountinfo`` (the longest mount point that contains it). Where that cannot be
read (macOS, a ``/proc`` not mounted), the answer is "may hang": the shortcut is a speed-up,
and a thread hop costs tens of microseconds, where a frozen loop costs the whole server.
"""

from __future__ import annotations

import os
import re

#: File system types whose calls can wait on another machine (or on a user-space daemon,
#: for FUSE: sshfs, rclone, gvfs). Local ones (ext4, xfs, btrfs, tmpfs, overlay, ...) answer.
NETWORK_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "ocfs2",
        "gfs2",
        "davfs",
        "coda",
        "fuse",
        "fuseblk",
    }
)

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """A mountinfo path field: the kernel writes space, tab, newline and backslash as
    octal escapes (``\\040``)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_type(path: str, mountinfo: str) -> str | None:
    """The type of the file system that the absolute, resolved ``path`` lies on, by the
    longest mount point in ``mountinfo`` (the text of ``/proc/self/mountinfo``) that
    contains it; ``None`` if no line names one. Pure: no I/O."""
    best, best_type = -1, None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            point = _unescape(fields[4])
            fs_type = fields[fields.index("-", 6) + 1]
        except (IndexError, ValueError):
            continue  # not a mount line
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # later lines mount over earlier ones
            best, best_type = len(point), fs_type
    return best_type


def may_hang(directory: str | os.PathLike[str]) -> bool:
    """Whether calls on ``directory``'s files can wait on another machine or daemon (see
    the module docstring). Blocking (it resolves the path): call it in a thread."""
    real = os.path.realpath(directory)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            fs_type = mount_type(real, f.read())
    except OSError:
        return True
    if fs_type is None:
        return True
    return fs_type in NETWORK_TYPES or fs_type.startswith("fuse.")
