"""File watching: ignore rules (pure), the coalescing change set, and the watcher task.

The watcher uses watchfiles' Rust notifier, the engine behind ``watchfiles.awatch``, driven
the way ``awatch`` drives it (one blocking ``watch()`` call at a time in a worker thread, a stop
event checked by that thread), with two things ``awatch`` cannot give us:

* a **readiness point**: the notifier registers its watches when it is constructed, and we
  report ``started`` right after, so a change made as soon as ``DevApp.run`` has started is
  never missed (tests rely on this instead of sleeping);
* **prompt cancellation** on Trio: the thread call is not abandoned (the notifier must not be
  closed under it); a sibling task sets the stop event when the watcher is cancelled, and the
  thread notices within one ``step`` (10 ms).

Changes go into a :class:`PendingChanges`, which coalesces them: the build loop takes them all
at once after the quiet period.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio
from watchfiles._rust_notify import RustNotify

log = logging.getLogger("punie_trio.dev")

#: Ignored by default, matched against every path component: VCS and tool directories and
#: editor droppings, so neither a build nor an editor's swap file triggers a build.
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

#: The notifier's own batching of raw events (not a debounce: the quiet period is ours).
STEP_MS = 10
MAX_BATCH_MS = 50


@attrs.frozen
class IgnoreRules:
    """Which changed paths to drop.

    ``globs`` are matched (fnmatch) against each path component, each leading part of the path
    relative to a watched root (so ``docs/generated`` ignores that directory), and the whole
    path. ``dirs`` are absolute directories ignored with everything under them.
    """

    roots: tuple[str, ...]
    globs: tuple[str, ...]
    dirs: tuple[str, ...]

    @classmethod
    def build(
        cls,
        roots: Sequence[Path],
        extra_globs: Sequence[str] = (),
        ignored_dirs: Sequence[Path] = (),
    ) -> IgnoreRules:
        return cls(
            roots=tuple(str(p.resolve()) for p in roots),
            globs=DEFAULT_IGNORES + tuple(g.rstrip("/") for g in extra_globs if g.strip()),
            dirs=tuple(str(d.resolve()) for d in ignored_dirs),
        )

    def ignored(self, path: str) -> bool:
        path = os.path.normpath(path)
        for directory in self.dirs:
            if path == directory or path.startswith(directory + os.sep):
                return True
        candidates = [path]
        for root in self.roots:
            if path.startswith(root + os.sep):
                parts = path[len(root) + 1 :].split(os.sep)
                candidates.extend("/".join(parts[: i + 1]) for i in range(len(parts)))
                candidates.extend(parts)
                break
        else:
            candidates.extend(path.split(os.sep))
        return any(fnmatch.fnmatchcase(c, g) for c in candidates for g in self.globs)


@attrs.define(eq=False)
class PendingChanges:
    """Changed paths not yet built, coalesced; bounded by :data:`MAX_PENDING_PATHS`."""

    paths: set[str] = attrs.field(factory=set)
    overflow: bool = False
    last_change: float = -math.inf
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
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Watch ``paths`` recursively and add every change not ignored to ``pending``.

    Reports started once the watches are registered. Runs until cancelled.

    Error handling: a path that does not exist is skipped with a warning (it cannot be watched
    until it exists); with none left the task reports started and just waits.
    """
    existing = [str(p) for p in paths if p.exists()]
    for p in paths:
        if not p.exists():
            log.warning("not watching %s: it does not exist", p)
    if not existing:
        task_status.started()
        await trio.sleep_forever()
    notifier = RustNotify(existing, False, False, 300, True, True)
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
