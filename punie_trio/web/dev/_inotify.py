"""The Linux watcher: inotify read on Trio's event loop, no thread and no polling step.

Why: watchfiles' notifier (the fallback, see :mod:`._watch`) hands changes over in steps: it
sleeps ``step`` (10 ms) between looks and returns a batch once a step passed without news, so a
save reached the build loop 10-20 ms after it happened. Here the inotify descriptor is
non-blocking and Trio waits on it (:func:`trio.lowlevel.wait_readable`), so the watcher runs the
moment the kernel queues an event.

**When a change counts (settling).** Reacting to the first event of a save would announce
half-written output: ``open(O_TRUNC)`` already reports ``IN_MODIFY`` on an empty file, and an
editor that saves by renaming the old file away reports the name as gone before the new one
exists. So events are sorted by what they prove:

* *complete*: ``IN_CLOSE_WRITE`` (the writer closed the file), ``IN_MOVED_TO`` (an atomic
  save: the name now points at a finished file), ``IN_ATTRIB`` on a file not being written
  (``touch``, ``chmod``);
* *in progress*: ``IN_MODIFY`` and ``IN_CREATE`` of a file (until its close), ``IN_DELETE`` and
  ``IN_MOVED_FROM`` (the name may come back at once: rename-and-rewrite saves), a directory
  created or moved in (a copy of a tree is under way), a queue overflow.

Once everything read so far is complete, the batch goes to :class:`~._watch.PendingChanges` at
once: a save is seen within a millisecond of its ``close()``. While anything is in progress the
whole batch waits, so a build never starts on a file known to be half-written; it is handed over
anyway once :data:`~._watch.STEP_MS` passed without a new event, or :data:`~._watch.MAX_BATCH_MS`
after the first event in progress (what the watchfiles notifier's batching gave every change: a
writer that keeps a file open is not held forever). Nothing is dropped: every path seen goes
into the next batch, and a queue overflow (events the kernel could not keep) counts as "something
changed" (the build runs; without one the output comparison decides).

Directories: every directory under a watched root is watched, except ignored ones (``.git``,
``node_modules``, the site directory when there is a build, ...): nothing under them can count,
so they cost no watch at all. Directories created or moved in are added, and their contents
reported (files written before the watch existed are not missed); directories deleted or moved
away are dropped. A watched *file* is watched through its parent directory (filtered to its
name), so an editor that replaces it by rename keeps being seen; a watched root directory's
parent is watched for its name too, so a root wiped and made again is seen at once.

Resource handling: one inotify descriptor per :func:`open_watches` call (closed there if the
registration fails), closed by :func:`run` (after :func:`trio.lowlevel.notify_closing`) when it
returns or is cancelled. Directory scans (the initial registration and new trees) run in a
worker thread: a large tree never blocks the loop.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._watch import IgnoreRules, PendingChanges

log = logging.getLogger("punie_trio.dev")

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000

#: What a watched directory reports.
DIR_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_EXCL_UNLINK
)

#: What the parent of a watched root directory reports: the root's name going and coming
#: back. Added to what the parent reports anyway (``IN_MASK_ADD``), when it is watched too.
PARENT_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR | IN_MASK_ADD

#: Files tracked as being written (see :meth:`Inotify.closed_after_write`).
MAX_WRITTEN = 4096

_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
_READ_SIZE = 256 * 1024


class InotifyUnavailable(OSError):
    """No inotify here (not Linux, no libc symbol, or the kernel refused an instance)."""


_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is not None:
        return _libc
    if not sys.platform.startswith("linux"):
        raise InotifyUnavailable("inotify is Linux only")
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc: no lookup
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError) as exc:
        raise InotifyUnavailable(f"no inotify in libc: {exc}") from exc
    _libc = libc
    return libc


def available() -> bool:
    """Whether this platform has inotify (the kernel may still refuse an instance)."""
    try:
        _load_libc()
    except InotifyUnavailable:
        return False
    return True


class Inotify:
    """One inotify descriptor and the directories it watches (watch descriptor <-> path)."""

    def __init__(self, rules: IgnoreRules) -> None:
        self._libc = _load_libc()
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise InotifyUnavailable(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        self.rules = rules
        self.dirs: dict[int, str] = {}  # wd -> directory
        self.wds: dict[str, int] = {}  # directory -> wd
        #: Per watched directory: None (a tree: every entry counts, subdirectories are added)
        #: or the names that count (the parent of a watched file).
        self.names: dict[int, set[str] | None] = {}
        self.roots: set[str] = set()
        #: Roots named by a symlink (absolute, as named) -> the directory watched for it.
        self.links: dict[str, str] = {}
        #: Files written (or created, or truncated) since their last close: only their
        #: close is a change (see :meth:`closed_after_write`).
        self.written: set[str] = set()

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    # -- watches (these run in a worker thread during scans; the loop waits for them) ------

    def _add(self, directory: str, names: set[str] | None, mask: int = DIR_MASK) -> int | None:
        wd = int(self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask))
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM):
                return None  # gone already, or not ours to read: skipped, as watchfiles does
            if err == errno.ENOSPC:
                raise OSError(err, "inotify watch limit reached (fs.inotify.max_user_watches)")
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        known = self.dirs.get(wd)
        if known is not None and known != directory and self.names.get(wd) is None:
            return wd  # the same directory by another path (a symlink): first path wins
        old = self.names.get(wd, set())
        if names is None or old is None:
            merged: set[str] | None = None
        else:
            merged = old | names
        self.dirs[wd] = directory
        self.wds[directory] = wd
        self.names[wd] = merged
        return wd

    def add_tree(self, top: str) -> list[str]:
        """Watch ``top`` and every directory under it that is not ignored; return the files
        found (a new tree's contents are changes nobody was watching for)."""
        found: list[str] = []
        seen: set[tuple[int, int]] = set()
        for directory, subdirs, files in os.walk(top, followlinks=True):
            try:
                st = os.stat(directory)
            except OSError:
                subdirs[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen:  # a symlink loop
                subdirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            if self._add(directory, None) is None:
                subdirs[:] = []
                continue
            subdirs[:] = [d for d in subdirs if not self.rules.ignored(os.path.join(directory, d))]
            found.extend(os.path.join(directory, f) for f in files)
        return found

    def add_roots(self, paths: Sequence[str]) -> None:
        # Real paths: the ignore rules hold resolved paths (the site directory above all).
        for named in paths:
            root = os.path.realpath(named)
            if os.path.islink(named):
                # A root named by a symlink (a site a build re-points, ``nix build``'s
                # ``./result``): its parent is watched for the link's name, and a re-point
                # watches the new target (:meth:`follow_link`). Only its target at start was
                # watched, so edits in a new target went unseen.
                link = os.path.abspath(named)
                self.links[link] = root
                self.watch_for(link)
            self._add_root(root)

    def follow_link(self, link: str) -> list[str]:
        """A root's symlink was (re)created: watch where it leads now, as a root, and return
        the files found there (changes nobody was watching for)."""
        root = os.path.realpath(link)
        if self.links.get(link) == root or root in self.roots:
            return []
        self.links[link] = root
        return self._add_root(root)

    def _add_root(self, root: str) -> list[str]:
        found: list[str] = []
        self.roots.add(root)
        if os.path.isdir(root):
            found = self.add_tree(root)
            # Its parent too, for its name: a root wiped and made again is seen at once.
            # The root's own IN_DELETE_SELF comes only once nothing refers to it any
            # more, which a shell cd'ed into it (or an open descriptor) postpones: the
            # new directory was never watched, and live reload stopped for good.
            parent, name = os.path.split(root)
            if name:
                self._add(parent, {name}, PARENT_MASK)
        else:  # a file: through its directory, so a replacement by rename is seen
            self.watch_for(root)
        return found

    def watch_for(self, root: str) -> None:
        """Watch ``root``'s parent for ``root``'s name: a file root replaced by rename, or a
        directory root that went away and may come back (tools that wipe and recreate
        their output directory: its return was once never seen, and reloads stopped)."""
        parent, name = os.path.split(root)
        self._add(parent or ".", {name})

    def remove_tree(self, top: str) -> None:
        """Stop watching ``top`` and everything under it (deleted or moved away)."""
        prefix = top + os.sep
        self.written = {p for p in self.written if not p.startswith(prefix)}
        for directory in [d for d in self.wds if d == top or d.startswith(prefix)]:
            wd = self.wds.pop(directory)
            if self.dirs.get(wd) == directory:
                del self.dirs[wd]
                self.names.pop(wd, None)
                self._libc.inotify_rm_watch(self.fd, wd)  # IN_IGNORED follows; harmless

    def wrote(self, path: str) -> None:
        if len(self.written) < MAX_WRITTEN:
            self.written.add(path)

    def closed_after_write(self, path: str) -> bool:
        """Whether a writer's close (``IN_CLOSE_WRITE``) of ``path`` ends a change: only if
        it wrote, created or truncated the file since the last close. A file opened for
        writing and closed unchanged (Hugo's ``.hugo_build.lock``, on every build) is no
        change: counting it made a build start itself again and again. When more files are
        being written at once than are tracked, a close counts (as it always did)."""
        if path in self.written:
            self.written.discard(path)
            return True
        return len(self.written) >= MAX_WRITTEN

    def forget(self, wd: int) -> None:
        """The kernel dropped ``wd`` (``IN_IGNORED``: the directory is gone)."""
        directory = self.dirs.pop(wd, None)
        self.names.pop(wd, None)
        if directory is not None and self.wds.get(directory) == wd:
            del self.wds[directory]

    # -- reading ----------------------------------------------------------------------------

    def read(self) -> list[tuple[int, int, int, bytes]]:
        """Every event queued now, as (wd, mask, cookie, name), without blocking."""
        events: list[tuple[int, int, int, bytes]] = []
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return events
            at, size = 0, len(data)
            while at < size:
                wd, mask, cookie, length = _HEADER.unpack_from(data, at)
                at += _HEADER.size
                name = data[at : at + length].rstrip(b"\0")
                at += length
                events.append((wd, mask, cookie, name))
            if size < _READ_SIZE // 2:  # a short read: the queue is empty (save a syscall)
                return events


class Settler:
    """Sorts events into complete and in-progress changes (see the module docstring); pure
    bookkeeping, so the rules are unit-tested without a file system."""

    def __init__(self) -> None:
        self.complete: set[str] = set()
        self.in_progress: set[str] = set()
        self.overflow = False
        self.first_in_progress = 0.0

    def __bool__(self) -> bool:
        return bool(self.complete or self.in_progress or self.overflow)

    @property
    def settled(self) -> bool:
        """Everything seen is complete: hand it over now."""
        return not self.in_progress and not self.overflow

    def _start(self, now: float) -> None:
        if not self.in_progress and not self.overflow:
            self.first_in_progress = now

    def completed(self, path: str) -> None:
        self.in_progress.discard(path)
        self.complete.add(path)

    def touched(self, path: str) -> None:
        """A metadata change: complete, unless the file is being written."""
        if path not in self.in_progress:
            self.complete.add(path)

    def started(self, path: str, now: float) -> None:
        self._start(now)
        self.complete.discard(path)
        self.in_progress.add(path)

    def overflowed(self, now: float) -> None:
        self._start(now)
        self.overflow = True

    def take(self) -> tuple[list[str], bool]:
        paths = sorted(self.complete | self.in_progress)
        overflow = self.overflow
        self.complete, self.in_progress, self.overflow = set(), set(), False
        return paths, overflow


async def open_watches(paths: Sequence[Path], rules: IgnoreRules) -> Inotify:
    """An inotify descriptor watching ``paths`` (every directory registered on return, so
    events from then on queue in it and none is missed). Raises :class:`InotifyUnavailable`,
    or ``OSError`` at the watch limit, with nothing left open: the caller can fall back."""
    notify = Inotify(rules)
    try:
        await trio.to_thread.run_sync(notify.add_roots, [str(p) for p in paths])
    except BaseException:
        notify.close()
        raise
    return notify


async def run(notify: Inotify, pending: PendingChanges, *, step: float, max_batch: float) -> None:
    """Add every change not ignored to ``pending``, until cancelled; closes ``notify``.

    While it runs, ``pending.flush()`` hands over at once every change the kernel has
    queued (see :class:`_Reader`)."""
    reader = _Reader(notify, pending)
    pending.flusher = reader.flush
    try:
        await reader.loop(step, max_batch)
    finally:
        pending.flusher = None
        notify.close()


class _Reader:
    """Reads the descriptor into a :class:`Settler` and hands batches to ``pending``.

    :meth:`flush` is for the build loop, right after a build's command exited: every event
    the build caused is queued by then (the kernel queues an event in the system call that
    causes it), so reading the descriptor at once tells exactly which changes came while the
    build ran, which the loop guard needs (see :mod:`._builder`). The two share a lock, so a
    read is never sorted while the other is halfway through one (a scan of a new directory
    runs in a thread).
    """

    def __init__(self, notify: Inotify, pending: PendingChanges) -> None:
        self.notify = notify
        self.pending = pending
        self.settler = Settler()
        self.last_event = 0.0
        self.lock = trio.Lock()

    async def loop(self, step: float, max_batch: float) -> None:
        settler = self.settler
        while True:
            timed_out = False
            if settler and not settler.settled:
                deadline = min(self.last_event + step, settler.first_in_progress + max_batch)
                with trio.move_on_at(deadline) as scope:
                    await trio.lowlevel.wait_readable(self.notify.fd)
                timed_out = scope.cancelled_caught
            else:
                await trio.lowlevel.wait_readable(self.notify.fd)
            async with self.lock:
                await self._read()
                if settler and (settler.settled or timed_out):
                    self._hand_over()

    async def flush(self) -> None:
        """Read what is queued now and hand everything over, complete or not."""
        async with self.lock:
            await self._read()
            if self.settler:
                self._hand_over()

    async def _read(self) -> None:
        notify, settler = self.notify, self.settler
        events = notify.read()
        if not events:
            return
        now = self.last_event = trio.current_time()
        scans = _sort(notify, events, settler, now)
        for top in scans:
            files = await trio.to_thread.run_sync(_scan, notify, top)
            for path in files:
                if not notify.rules.ignored(path):
                    settler.touched(path)

    def _hand_over(self) -> None:
        paths, overflow = self.settler.take()
        if paths:
            log.debug("changed: %s", paths)
            self.pending.add(paths)
        if overflow:
            log.info("inotify queue overflowed: some changes were not itemised")
            self.pending.add_overflow()


def _scan(notify: Inotify, top: str) -> list[str]:
    try:
        if top in notify.links:
            return notify.follow_link(top)
        return notify.add_tree(top)
    except OSError as exc:  # the watch limit: that subtree stays unwatched
        log.warning("cannot watch %s: %s", top, exc)
        return []


def _sort(
    notify: Inotify, events: list[tuple[int, int, int, bytes]], s: Settler, now: float
) -> list[str]:
    """Feed a read's events to the settler; returns directories to scan (created/moved in)."""
    scans: list[str] = []
    ignored: Callable[[str], bool] = functools.lru_cache(maxsize=256)(notify.rules.ignored)
    # Renames whose destination counts (a watched name, not ignored): their source is gone
    # for good (an atomic save's temporary file), not about to come back (an editor moving
    # the file to its backup name and writing it anew: the backup name is ignored).
    renamed_into: set[int] = set()
    for wd, mask, cookie, raw in events:
        if mask & IN_MOVED_TO and not mask & IN_ISDIR:
            path = _event_path(notify, wd, raw)
            if path is not None and not ignored(path):
                renamed_into.add(cookie)
    for wd, mask, cookie, raw in events:
        if mask & IN_Q_OVERFLOW:
            s.overflowed(now)
            scans.extend(r for r in notify.roots if os.path.isdir(r))  # re-add what we lost
            continue
        if mask & IN_IGNORED:
            notify.forget(wd)
            continue
        directory = notify.dirs.get(wd)
        if directory is None:
            continue  # a directory we stopped watching: its late events mean nothing
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT):
            if directory in notify.roots:  # a root went away: its parent reports its return
                s.started(directory, now)
                notify.remove_tree(directory)
                notify.watch_for(directory)
                if os.path.isdir(directory):  # back already, before its parent was watched
                    scans.append(directory)
            continue
        path = _event_path(notify, wd, raw)
        if path is None or ignored(path):
            continue
        if mask & IN_ISDIR:
            if notify.names.get(wd) is not None:  # a watched name's directory
                if path in notify.roots and mask & (IN_CREATE | IN_MOVED_TO):
                    s.started(path, now)  # a root came back: watched, its files reported
                    scans.append(path)
                elif path in notify.roots and mask & (IN_DELETE | IN_MOVED_FROM):
                    s.started(path, now)  # a root went: its watches with it (the kernel
                    notify.remove_tree(path)  # may report that only much later)
                continue
            if mask & (IN_CREATE | IN_MOVED_TO):
                s.started(path, now)
                scans.append(path)
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                s.started(path, now)
                notify.remove_tree(path)
            continue
        if path in notify.links and mask & (IN_CREATE | IN_MOVED_TO):
            scans.append(path)  # a root's symlink re-pointed: follow it (and report it)
        if mask & (IN_MODIFY | IN_CREATE):
            notify.wrote(path)
        elif mask & (IN_DELETE | IN_MOVED_FROM):
            notify.written.discard(path)
        if mask & IN_CLOSE_WRITE:
            if notify.closed_after_write(path):
                s.completed(path)
        elif mask & IN_MOVED_TO or (mask & IN_MOVED_FROM and cookie in renamed_into):
            s.completed(path)
        elif mask & (IN_MODIFY | IN_CREATE | IN_DELETE | IN_MOVED_FROM):
            s.started(path, now)
        elif mask & IN_ATTRIB:
            s.touched(path)
    return scans


def _event_path(notify: Inotify, wd: int, raw: bytes) -> str | None:
    """The path an event names, or None (a directory no longer watched, or another file of
    a watched file's directory)."""
    directory = notify.dirs.get(wd)
    if directory is None:
        return None
    name = os.fsdecode(raw)
    names = notify.names.get(wd)
    if names is not None and name not in names:
        return None
    return os.path.join(directory, name) if name else directory
