"""Snapshots of the built output, and the reload decision that compares two of them.

The decision compares *outputs*, not the source changes that caused a build: a build that
rewrites every file with the same bytes triggers nothing, and a build that only touched CSS
gets a ``reload-css`` (stylesheets swapped in place, no page reload).

A snapshot maps each servable file (no dot-segment: those are never served) to its size,
``mtime_ns`` and a content digest. Digests are carried over from the previous snapshot when
size and mtime did not change, so only touched files are re-read.

:func:`take_snapshot` does blocking I/O: call it in a thread (``trio.to_thread.run_sync``).
:func:`small_snapshot` may run on the event loop: it gives up (``None``) past a small budget.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import attrs

from ._events import Action
from ._static import _inside


@attrs.frozen
class FileSig:
    size: int
    mtime_ns: int
    digest: bytes


Snapshot = Mapping[str, FileSig]

_CSS_SUFFIXES = (".css",)


def _digest(path: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


#: :func:`small_snapshot`'s budget: at most this many files and directories walked, and this
#: many bytes read for digests. Walking that little takes well under a millisecond here,
#: less than handing the walk to a worker thread and back (about 0.3-0.5 ms).
SMALL_ENTRIES = 256
SMALL_DIGEST_BYTES = 256 * 1024


class _OverBudget(Exception):
    pass


def take_snapshot(root: Path, previous: Snapshot | None = None) -> dict[str, FileSig]:
    """Walk ``root`` (blocking). A missing root is an empty snapshot."""
    return _walk(root, previous or {}, None, None)


def small_snapshot(root: Path, previous: Snapshot | None = None) -> dict[str, FileSig] | None:
    """:func:`take_snapshot`, or ``None`` as soon as the walk exceeds :data:`SMALL_ENTRIES`
    entries or :data:`SMALL_DIGEST_BYTES` of changed files to read.

    For the event loop: a typical edit of a small site is snapshotted without a thread hop,
    and anything bigger goes to a thread (``None``: the caller calls :func:`take_snapshot`
    there), so the loop never blocks for more than the budget.
    """
    try:
        return _walk(root, previous or {}, SMALL_ENTRIES, SMALL_DIGEST_BYTES)
    except _OverBudget:
        return None


def _walk(
    root: Path, previous: Snapshot, max_entries: int | None, max_digest: int | None
) -> dict[str, FileSig]:
    """The snapshot of what the site serves under ``root``.

    Symlinks are followed as the static server follows them, and only as far: a link whose
    target is outside the site (resolved, as the server resolves it) is not served, so it is
    neither walked nor read; a directory that is its own ancestor on the way down (``self
    -> .``, ``sub/up -> ..``) is walked once, not until the path is too long; and an entry
    that cannot be looked at (a link loop: ELOOP) is not part of the output. Any of these
    raised out of the walk before, and the dev app's loop took the whole server with it.
    """
    result: dict[str, FileSig] = {}
    entries_left = max_entries
    digest_left = max_digest
    real_root = os.path.realpath(root)
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [(str(root), "", frozenset())]
    while stack:
        directory, prefix, ancestors = stack.pop()
        try:
            st = os.stat(directory)
            here = (st.st_dev, st.st_ino)
            if here in ancestors:
                continue
            ancestors = ancestors | {here}
            entries = list(os.scandir(directory))
        except OSError:  # gone, not a directory, unreadable, a loop: not output now
            continue
        if entries_left is not None:
            entries_left -= len(entries)
            if entries_left < 0:
                raise _OverBudget
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            try:
                if entry.is_symlink() and not _inside(os.path.realpath(entry.path), real_root):
                    continue
                if entry.is_dir():
                    stack.append((entry.path, rel + "/", ancestors))
                    continue
                if not entry.is_file():
                    continue
                st = entry.stat()
                old = previous.get(rel)
                if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
                    result[rel] = old
                    continue
                if digest_left is not None:
                    digest_left -= st.st_size
                    if digest_left < 0:
                        raise _OverBudget
                result[rel] = FileSig(st.st_size, st.st_mtime_ns, _digest(entry.path))
            except OSError:
                continue  # vanished, unreadable or a link loop mid-walk: not output now
    return result


def changed_paths(before: Snapshot, after: Snapshot) -> tuple[set[str], set[str]]:
    """(added or modified, removed) paths, by content."""
    touched = {p for p, sig in after.items() if p not in before or before[p].digest != sig.digest}
    removed = set(before) - set(after)
    return touched, removed


def decide(before: Snapshot, after: Snapshot) -> tuple[Action, tuple[str, ...]] | None:
    """``None`` if the output is the same; ``reload-css`` if only stylesheets were added or
    changed; ``reload`` otherwise (removing a stylesheet reloads: the page still links it)."""
    touched, removed = changed_paths(before, after)
    if not touched and not removed:
        return None
    paths = tuple(sorted(touched | removed))
    if not removed and all(p.lower().endswith(_CSS_SUFFIXES) for p in touched):
        return "reload-css", paths
    return "reload", paths
