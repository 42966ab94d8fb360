"""Whether a directory lies on a file system that may stop answering (network, FUSE).

Why: the dev app takes two shortcuts on the event loop, for speed: a cached file's
``stat()`` (so a cache hit costs no thread hop) and a small site's snapshot after a build.
On a local disk those take microseconds. On a network mount that stopped answering (NFS,
SMB, sshfs), a ``stat()`` waits in the kernel until the server answers, and on the event
loop that froze every client of the server, ACP sessions included. Where the site lies on
such a file system, those take a thread too (abandoned on cancel).

How: on Linux, the type of the mount the directory's real path lies under, from
``/proc/self/mountinfo`` (the longest mount point that contains it); for an overlay,
the types its layers lie on (:func:`hangs_on`). Where that cannot be read (macOS, a
``/proc`` not mounted), the answer is "may hang": the shortcut is a speed-up, and a
thread hop costs tens of microseconds, where a frozen loop costs the whole server.
"""

from __future__ import annotations

import os
import re

#: File system types whose calls can wait on another machine (or on a user-space daemon,
#: for FUSE: sshfs, rclone, gvfs), on a VM's host (its shared folders: virtiofs, vboxsf,
#: prl_fs, vmhgfs; a site edited on the host and served from the VM lies there), or on
#: an automounter (autofs: the first use of a path mounts it). Local ones (ext4, xfs,
#: btrfs, tmpfs, overlay, ...) answer.
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
        "beegfs",
        "orangefs",
        "virtiofs",
        "vboxsf",
        "prl_fs",
        "vmhgfs",
        "autofs",
    }
)

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """A mountinfo path field: the kernel writes space, tab, newline and backslash as
    octal escapes (``\\040``)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def _mount_of(path: str, mountinfo: str) -> list[str] | None:
    """The fields after the separator (type, source, super options) of the mount that the
    absolute, resolved ``path`` lies on: the longest mount point in ``mountinfo`` that
    contains it (a later line mounts over an earlier one). ``None`` if no line names one."""
    best, found = -1, None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        try:
            point = _unescape(fields[4])
            after = fields[fields.index("-", 6) + 1 :]
        except (IndexError, ValueError):
            continue  # not a mount line
        if not after:
            continue
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # later lines mount over earlier ones
            best, found = len(point), after
    return found


def mount_type(path: str, mountinfo: str) -> str | None:
    """The type of the file system that the absolute, resolved ``path`` lies on, by the
    longest mount point in ``mountinfo`` (the text of ``/proc/self/mountinfo``) that
    contains it; ``None`` if no line names one. Pure: no I/O."""
    found = _mount_of(path, mountinfo)
    return None if found is None else found[0]


def _layers(path: str, mountinfo: str) -> list[str]:
    """The directories of the overlay ``path`` lies on (``lowerdir``, ``upperdir``,
    ``datadir``, from its super options); ``[]`` if there is none to be read."""
    found = _mount_of(path, mountinfo)
    if found is None or len(found) < 3:
        return []
    layers = []
    for option in _unescape(found[2]).split(","):
        name, _, value = option.partition("=")
        if name in ("lowerdir", "lowerdir+", "upperdir", "datadir+"):
            layers += [d for d in value.split(":") if d.startswith("/")]
    return layers


#: How many overlays deep :func:`hangs_on` follows layers (an overlay over an overlay).
_OVERLAY_DEPTH = 4


def hangs_on(path: str, mountinfo: str, depth: int = 0) -> bool:
    """Whether calls on the absolute, resolved ``path`` can wait on another machine or
    daemon, by ``mountinfo``. Pure: no I/O.

    An overlay (a container's root, a build sandbox) answers only as fast as its layers:
    one with a layer on NFS waits on NFS, so its layers are looked up too (those not in
    this mount namespace, as a container's host paths, fall under the mounts it sees)."""
    fs_type = mount_type(path, mountinfo)
    if fs_type is None:
        return True
    if fs_type in NETWORK_TYPES or fs_type.startswith("fuse."):
        return True
    if fs_type == "overlay" and depth < _OVERLAY_DEPTH:
        return any(hangs_on(layer, mountinfo, depth + 1) for layer in _layers(path, mountinfo))
    return False


def may_hang(directory: str | os.PathLike[str]) -> bool:
    """Whether calls on ``directory``'s files can wait on another machine or daemon (see
    the module docstring and :func:`hangs_on`). Blocking (it resolves the path): call it
    in a thread."""
    real = os.path.realpath(directory)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return hangs_on(real, f.read())
    except OSError:
        return True
