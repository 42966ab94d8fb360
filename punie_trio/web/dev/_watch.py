"""File watching: ignore rules (pure), the coalescing change set, and the watcher task.

Two watchers, one contract (see :func:`watch`):

* on Linux, :mod:`._inotify`: inotify read on Trio's event loop. A save is handed over as soon
  as it is complete (the writer closed the file, or renamed a finished file into place), within
  a millisecond or two, with no polling step; changes still in progress hold the batch (bounded
  by :data:`STEP_MS`/:data:`MAX_BATCH_MS`), so a half-written file does not start a build;
* elsewhere (or when the kernel refuses inotify), watchfiles' Rust notifier, the engine behind
  ``watchfiles.awatch``, driven the way ``awatch`` drives it (one blocking ``watch()`` call at a
  time in a worker thread, a stop event checked by that thread). It hands changes over in
  steps: a batch once :data:`STEP_MS` passed without news.

Both give two things ``awatch`` cannot:

* a **readiness point**: the watches are registered before we report ``started``, so a change
  made as soon as ``DevApp.run`` has started is never missed (tests rely on this instead of
  sleeping);
* **prompt cancellation** on Trio. (watchfiles: the thread call is not abandoned, the notifier
  must not be closed under it; a sibling task sets the stop event when the watcher is
  cancelled, and the thread notices within one ``step``.)

Changes go into a :class:`PendingChanges`, which coalesces them: the build loop takes them all
at once after the quiet period.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

import attrs
import trio
from watchfiles._rust_notify import RustNotify

from . import _inotify

log = logging.getLogger("punie_trio.dev")

#: Ignored by default, matched against every path component: VCS and tool directories, build
#: tools' caches, and editor droppings, so neither a build nor an editor's swap file triggers
#: a build.
DEFAULT_IGNORES: tuple[str, ...] = (
    ".git",
    ".hg",
    ".svn",
    ".venv",
    "venv",
    "node_modules",
    "__pycache__",
    ".nox",
    ".tox",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".cache",
    ".idea",
    ".DS_Store",
    # Site generators' and bundlers' caches and locks, written by the build itself in the
    # project (outside the site directory): with them watched a build started the next.
    ".hugo_build.lock",
    ".jekyll-cache",
    ".jekyll-metadata",
    ".sass-cache",
    "doctrees",  # Sphinx's pickled environment (_build/doctrees)
    ".docusaurus",
    ".parcel-cache",
    ".svelte-kit",
    ".astro",
    ".quarto",
    ".turbo",
    "*.pyc",
    "*.swp",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "4913",  # vim's write-permission probe
)

#: Bound on the paths kept between builds; beyond it only the fact that something changed
#: is kept (the build runs regardless, and the reload decision compares outputs anyway).
MAX_PENDING_PATHS = 1000

#: The watchers' own batching of raw events (not a debounce: the quiet period is ours). The
#: watchfiles notifier hands over a batch once a step passed without news (at most
#: MAX_BATCH_MS after its first event); the inotify watcher hands over a batch at once when
#: every change in it is complete, and uses these only while a change is in progress.
STEP_MS = 10
MAX_BATCH_MS = 50

Backend = Literal["auto", "inotify", "watchfiles"]


def _parts(path: str) -> tuple[str, ...]:
    return tuple(part for part in path.split(os.sep) if part)


def _match_leading(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether the first components of ``parts`` match ``pattern``, component by component
    (``*`` stays within one component, ``**`` spans any number of them)."""
    if not pattern:
        return True
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match_leading(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _match_leading(parts[1:], rest)


@attrs.frozen
class IgnoreRules:
    """Which changed paths to drop.

    Patterns are read as a user reads them on the command line (``--ignore``), not as one
    kind of glob matched every which way (``--watch src --ignore src/gen`` once ignored
    nothing: patterns were matched relative to each watched root only, so were ``./src/gen``
    and absolute directories):

    * ``names``: a pattern without ``/`` (``*.log``, ``node_modules``, the defaults) matches
      any path component (below the project root or watched root the path is under);
    * ``paths``: a pattern with ``/`` is a path, and ignores what it names and everything
      under it. A relative one (``src/gen``, ``./src/gen``, ``docs/*/generated``) is taken
      from the project root and, as before, from each watched root; an absolute one as it
      is (and, when it names a directory without wildcards, through its symlinks too). They
      are matched component by component: ``*`` does not cross a ``/``, ``**`` does;
    * ``dirs``: absolute directories ignored with everything under them (the site and data
      directories).
    """

    roots: tuple[str, ...]
    names: tuple[str, ...]
    paths: tuple[tuple[str, ...], ...]
    dirs: tuple[str, ...]

    @classmethod
    def build(
        cls,
        roots: Sequence[Path],
        extra_globs: Sequence[str] = (),
        ignored_dirs: Sequence[Path] = (),
        *,
        project_root: Path | None = None,
    ) -> IgnoreRules:
        bases = [str(p.resolve()) for p in roots]
        if project_root is not None:
            bases.insert(0, str(project_root.resolve()))
        bases = list(dict.fromkeys(bases))
        names: list[str] = list(DEFAULT_IGNORES)
        paths: list[tuple[str, ...]] = []
        # Each as named and resolved: a site directory that is a symlink a build re-points
        # (``nix build``'s ``./result``) is ignored by its name too, so re-pointing it is no
        # source change (it started another build).
        dirs = [str(d.resolve()) for d in ignored_dirs]
        dirs += [os.path.abspath(d) for d in ignored_dirs]
        for glob in extra_globs:
            glob = glob.strip()
            if not glob or glob in (".", "./"):
                continue
            if "/" not in glob.rstrip("/"):
                names.append(glob.rstrip("/"))
                continue
            if os.path.isabs(glob):
                absolute = [os.path.normpath(glob)]
            else:
                absolute = [os.path.normpath(os.path.join(base, glob)) for base in bases]
            for pattern in absolute:
                paths.append(_parts(pattern))
                if not _glob_magic(pattern):
                    dirs.append(os.path.realpath(pattern))
        return cls(
            roots=tuple(bases),
            names=tuple(names),
            paths=tuple(dict.fromkeys(paths)),
            dirs=tuple(dict.fromkeys(dirs)),
        )

    def ignored(self, path: str) -> bool:
        path = os.path.normpath(path)
        for directory in self.dirs:
            if path == directory or path.startswith(directory + os.sep):
                return True
        parts = _parts(path)
        if any(_match_leading(parts, pattern) for pattern in self.paths):
            return True
        components = parts
        for root in self.roots:
            if path.startswith(root + os.sep):
                components = _parts(path[len(root) + 1 :])
                break
        return any(fnmatch.fnmatchcase(c, g) for c in components for g in self.names)


def _glob_magic(pattern: str) -> bool:
    """Whether ``pattern`` has wildcards (else it names one path)."""
    return any(c in pattern for c in "*?[")


@attrs.define(eq=False)
class PendingChanges:
    """Changed paths not yet built, coalesced; bounded by :data:`MAX_PENDING_PATHS`."""

    paths: set[str] = attrs.field(factory=set)
    overflow: bool = False
    last_change: float = -math.inf
    #: Set by a watcher that can hand over what it has seen so far on request (inotify).
    flusher: Callable[[], Awaitable[None]] | None = None
    _event: trio.Event = attrs.field(factory=trio.Event)

    def __bool__(self) -> bool:
        return bool(self.paths) or self.overflow

    def add(self, paths: Sequence[str]) -> None:
        if not paths:
            return
        for path in paths:
            if len(self.paths) >= MAX_PENDING_PATHS:
                self.overflow = True
                break
            self.paths.add(path)
        self.last_change = trio.current_time()
        self._event.set()

    def add_overflow(self) -> None:
        """Something changed that the watcher could not name (its queue overflowed)."""
        self.overflow = True
        self.last_change = trio.current_time()
        self._event.set()

    def discard(self, paths: Iterable[str]) -> None:
        """Drop ``paths`` (changes the loop guard found to be the build's own)."""
        self.paths.difference_update(paths)
        if not self:
            self._event = trio.Event()

    async def flush(self) -> None:
        """Let the watcher hand over every change that happened before this call (the
        inotify watcher can: the kernel queued them; the watchfiles one cannot, and its
        changes come in their own time)."""
        if self.flusher is not None:
            await self.flusher()

    async def wait(self) -> None:
        """Block until there is something pending."""
        while not self:
            await self._event.wait()

    async def wait_quiet(self, period: float) -> None:
        """Block until ``period`` seconds passed without a new change (the debounce)."""
        # Each change moves the deadline; sleep until the latest one holds.
        deadline = self.last_change + period
        while trio.current_time() < deadline:
            await trio.sleep_until(deadline)
            deadline = self.last_change + period

    def take(self) -> tuple[frozenset[str], bool]:
        taken = (frozenset(self.paths), self.overflow)
        self.paths = set()
        self.overflow = False
        self._event = trio.Event()
        return taken


async def _stop_when_cancelled(stop: threading.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        stop.set()


async def watch(
    paths: Sequence[Path],
    rules: IgnoreRules,
    pending: PendingChanges,
    *,
    backend: Backend = "auto",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Watch ``paths`` recursively and add every change not ignored to ``pending``.

    Reports started once the watches are registered. Runs until cancelled. ``backend``:
    ``"inotify"`` (Linux, :mod:`._inotify`), ``"watchfiles"`` (its Rust notifier, anywhere), or
    ``"auto"``: inotify where the kernel gives an instance and the watches fit its limit, else
    watchfiles (with a warning when inotify was expected to work).

    Error handling: a path that does not exist is skipped with a warning (it cannot be watched
    until it exists); with none left the task reports started and just waits.
    """
    existing = [p for p in paths if p.exists()]
    for p in paths:
        if not p.exists():
            log.warning("not watching %s: it does not exist", p)
    if not existing:
        task_status.started()
        await trio.sleep_forever()
    if backend != "watchfiles" and (backend == "inotify" or _inotify.available()):
        try:
            notify = await _inotify.open_watches(existing, rules)
        except OSError as exc:
            if backend == "inotify":
                raise
            log.warning("inotify unavailable (%s); watching with watchfiles", exc)
        else:
            task_status.started()
            await _inotify.run(notify, pending, step=STEP_MS / 1000, max_batch=MAX_BATCH_MS / 1000)
            return
    await _watch_watchfiles(existing, rules, pending, task_status=task_status)


async def _watch_watchfiles(
    paths: Sequence[Path],
    rules: IgnoreRules,
    pending: PendingChanges,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """The fallback: watchfiles' Rust notifier in a worker thread, one batch per call."""
    notifier = RustNotify([str(p) for p in paths], False, False, 300, True, True)
    stop = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_when_cancelled, stop)
            task_status.started()
            while True:
                raw = await trio.to_thread.run_sync(notifier.watch, MAX_BATCH_MS, STEP_MS, 0, stop)
                if raw == "stop":
                    return
                if isinstance(raw, str):
                    continue  # "timeout" or "signal": nothing changed
                changed = sorted({p for _, p in raw if not rules.ignored(p)})
                if changed:
                    log.debug("changed: %s", changed)
                    pending.add(changed)
    finally:
        notifier.close()
