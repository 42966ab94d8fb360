"""Worker threads for file system work, limited per project root.

Why: a path check or a tool's read or write runs in a thread abandoned on cancel (a
network mount that stopped answering no longer freezes the event loop or holds a
cancel). But an abandoned thread keeps its limiter slot until the file system answers,
and every such thread took a slot of Trio's one default limiter (40): about 40 requests
stuck on one hung mount (one project) made every other threaded operation of the server
wait, for every project and the dev app. Work that touches a project root's files now
takes one of that root's own :data:`ROOT_THREADS` slots (:func:`run_sync_under`), so a
hung mount under root A uses up only A's slots; another root, the dev app (its site's
own :data:`SITE_THREADS`: :func:`site_key`) and the session store (a thread of its own,
``store/_thread.py``) go on.

A call waiting for a slot has not started anything: it stays cancellable, and one that
waits :data:`ROOT_WAIT` seconds is refused with :class:`RootNotAnswering` (its request
or tool call fails naming the root) rather than wait for ever behind threads that may
never end.

The limiters live in a :class:`trio.lowlevel.RunVar`, as Trio's default limiter does:
one set per ``trio.run``, shared by the manager's path checks and the project workers'
tools (a worker in a child process would have its own).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TypeVar, TypeVarTuple, cast

import attrs
import trio

T = TypeVar("T")
Args = TypeVarTuple("Args")

#: Threads that the file work of one project root may run at once, and so the most a hung
#: mount under it can hold. Modest: a root's work is a ``stat`` walk or one file's read
#: or write, milliseconds each on a file system that answers.
ROOT_THREADS = 8

#: Seconds a call waits for one of its root's threads before it is refused: all of them
#: busy that long means the root's file system is not answering.
ROOT_WAIT = 30.0

#: The key of paths under no served root (a ``cwd`` outside every root, which the check
#: refuses once resolved): they share one set of slots, apart from every root's.
OUTSIDE = ""


#: Threads of the dev app's site directory (its own slots, apart from every project
#: root's): a page load's misses and large files' reads, each milliseconds.
SITE_THREADS = 16

#: The key of the dev app's site directory in :func:`slots_for` (no path starts with it).
_SITE = "\0site "


def _where(key: str) -> str:
    if key == OUTSIDE:
        return "paths outside the project roots"
    if key.startswith(_SITE):
        return f"the site directory {key[len(_SITE) :]}"
    return f"project root {key}"


class RootNotAnswering(Exception):
    """A call found every thread of its root busy for :data:`ROOT_WAIT` seconds."""

    def __init__(self, root: str, threads: int = ROOT_THREADS) -> None:
        super().__init__(
            f"the file system of {_where(root)} is not answering: all {threads} threads for "
            f"its files have been busy for {ROOT_WAIT:g} s (a network mount that stopped "
            "answering?); nothing was done, try again once it answers"
        )
        self.root = root


@attrs.define(eq=False)
class RootSlots:
    """One root's threads: a :class:`trio.CapacityLimiter` whose wait for a slot is bounded
    by :data:`ROOT_WAIT` (:class:`RootNotAnswering`). Passed to ``trio.to_thread.run_sync``
    as its ``limiter`` (a "CapacityLimiter-like object", as Trio documents it: it holds a
    slot until the thread has really ended, an abandoned one too)."""

    root: str
    threads: int = ROOT_THREADS
    limiter: trio.CapacityLimiter = attrs.field(
        default=attrs.Factory(lambda self: trio.CapacityLimiter(self.threads), takes_self=True)
    )

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        with trio.move_on_after(ROOT_WAIT):
            await self.limiter.acquire_on_behalf_of(borrower)
            return
        raise RootNotAnswering(self.root, self.threads)

    def release_on_behalf_of(self, borrower: object) -> None:
        self.limiter.release_on_behalf_of(borrower)


_SLOTS: trio.lowlevel.RunVar[dict[str, RootSlots]] = trio.lowlevel.RunVar("punie_trio_root_slots")


def slots_for(root: str) -> RootSlots:
    """The threads of ``root`` (a served root, or :data:`OUTSIDE`) in this run."""
    try:
        slots = _SLOTS.get()
    except LookupError:
        slots = {}
        _SLOTS.set(slots)
    found = slots.get(root)
    if found is None:
        threads = SITE_THREADS if root.startswith(_SITE) else ROOT_THREADS
        found = slots[root] = RootSlots(root, threads)
    return found


def site_key(site: str | os.PathLike[str]) -> str:
    """The :func:`slots_for` key of the dev app's site directory ``site``: its file work
    (lookups, reads, snapshots) takes :data:`SITE_THREADS` slots of its own, so a site on
    a mount that stopped answering holds neither Trio's default threads (the build's
    start, the watcher's scans) nor a project root's."""
    return _SITE + os.fspath(site)


def root_of(path: str, roots: Iterable[str], default: str = OUTSIDE) -> str:
    """The most specific of ``roots`` that ``path`` lies under, by its text alone
    (normalised, nothing resolved: this runs on the event loop, before the walk it
    chooses the threads for); ``default`` if none, or if ``path`` starts with ``~``
    (expanding ``~user`` may ask a directory service).

    Why the text: the walk touches the path's components as written first, so a hung
    mount met on the way is under the root the text names. A symlink may lead the walk
    on to another root; the thread still counts against the first. The roots are few
    (the served ones), so the limiters are too."""
    if not os.path.isabs(path) or path.startswith("~"):
        return default
    here = os.path.normpath(path)
    inside = [r for r in roots if here == r or here.startswith(r.rstrip(os.sep) + os.sep)]
    return max(inside, key=len) if inside else default


async def run_sync_under(
    root: str, fn: Callable[[*Args], T], *args: *Args, abandon_on_cancel: bool = True
) -> T:
    """``fn(*args)`` in a thread of ``root``'s (:func:`slots_for`), abandoned on cancel:
    only for work that changes nothing a cancel must wait for (a walk, a read), or that
    says what it may still do (a tool's write). Raises :class:`RootNotAnswering` after
    waiting :data:`ROOT_WAIT` seconds for a thread; the wait is cancellable.
    ``abandon_on_cancel=False`` for work whose result others wait for."""
    limiter = cast(trio.CapacityLimiter, slots_for(root))  # (CapacityLimiter-like: see RootSlots)
    return await trio.to_thread.run_sync(
        fn, *args, abandon_on_cancel=abandon_on_cancel, limiter=limiter
    )
