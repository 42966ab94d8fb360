"""Broadcast internals: the subscriber's wakeup, and announcing a build only once it is slow.

Time is Trio's MockClock (never advanced unless a test jumps it), so "the build finished
before the delay" is a fact of the test, not a race.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from punie_trio.web.dev._broadcast import Broadcaster, Subscriber
from punie_trio.web.dev._builder import BuildLoop
from punie_trio.web.dev._events import ReloadEvent
from punie_trio.web.dev._snapshot import SMALL_ENTRIES
from punie_trio.web.dev._watch import PendingChanges


async def test_wait_wakes_on_offer_and_survives_cancellation() -> None:
    sub = Subscriber()
    woke = trio.Event()

    async def waiter() -> None:
        await sub.wait()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        sub.offer_reload(ReloadEvent("reload", ("a.html",), 1))
        await woke.wait()
    # Already signalled: returns at once (still a checkpoint), until taken.
    with trio.testing.assert_checkpoints():
        await sub.wait()
    assert [e.generation for e in sub.take()] == [1]  # type: ignore[union-attr]
    # A cancelled wait leaves no parked task behind: a later offer must not touch it.
    with trio.move_on_after(0) as scope:
        await sub.wait()
    assert scope.cancelled_caught
    sub.offer_reload(ReloadEvent("reload", ("b.html",), 2))
    with trio.testing.assert_checkpoints():
        await sub.wait()


async def test_one_broadcast_wakes_every_subscriber() -> None:
    hub = Broadcaster()
    subs = [hub.subscribe(None) for _ in range(50)]
    woken = 0

    async def waiter(sub: Subscriber) -> None:
        nonlocal woken
        await sub.wait()
        woken += 1

    async with trio.open_nursery() as nursery:
        for sub in subs:
            nursery.start_soon(waiter, sub)
        await trio.testing.wait_all_tasks_blocked()
        hub.publish_reload("reload-css", ("s.css",))
    assert woken == 50
    assert all(sub.take() == [ReloadEvent("reload-css", ("s.css",), 1)] for sub in subs)


def test_status_recorded_without_announcing() -> None:
    hub = Broadcaster()
    sub = hub.subscribe(None)
    started = hub.publish_status("build_start", command="make", announce=False)
    assert hub.building and hub.page_state()["building"]
    assert not sub.pending  # open streams were not told
    assert [e.kind for e in hub.subscribe(None).take()] == ["build_start"]  # type: ignore[union-attr]
    hub.publish_status("build_ok", command="make", announce=False)
    hub.announce(started)  # superseded: nothing to announce
    assert not sub.pending


def _project(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "proj"
    (root / "src").mkdir(parents=True)
    (root / "site").mkdir()
    (root / "src" / "index.html").write_text("<p>v1</p>")
    return root, root / "site", tmp_path / "gate"


def _copy_command(gate: Path | None) -> str:
    wait = f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n" if gate else ""
    script = f"import os, shutil, time\n{wait}shutil.copy('src/index.html', 'site/index.html')\n"
    return f'"{sys.executable}" -c "{script}"'


async def test_quick_build_is_not_announced(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    root, site, _ = _project(tmp_path)
    hub = Broadcaster()
    loop = BuildLoop(site, root, hub, PendingChanges(), _copy_command(None), build_start_delay=0.1)
    await loop.prepare()
    sub = hub.subscribe(None)
    await loop.cycle(["src/index.html"])  # Trio's clock never moved: done "within" the delay
    events = sub.take()
    assert [getattr(e, "kind", "reload") for e in events] == ["build_ok", "reload"]
    assert events[1] == ReloadEvent("reload", ("index.html",), 1)


async def test_slow_build_is_announced_after_the_delay(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    root, site, gate = _project(tmp_path)
    hub = Broadcaster()
    loop = BuildLoop(site, root, hub, PendingChanges(), _copy_command(gate), build_start_delay=0.1)
    await loop.prepare()
    sub = hub.subscribe(None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.cycle, ["src/index.html"])
        await trio.testing.wait_all_tasks_blocked()
        assert hub.building and not sub.pending  # recorded, not yet announced
        mock_clock.jump(0.05)
        await trio.testing.wait_all_tasks_blocked()
        assert not sub.pending
        mock_clock.jump(0.05)
        await trio.testing.wait_all_tasks_blocked()
        assert [e.kind for e in sub.take()] == ["build_start"]  # type: ignore[union-attr]
        gate.touch()
    assert [getattr(e, "kind", "reload") for e in sub.take()] == ["build_ok", "reload"]
    assert not hub.building


@pytest.mark.parametrize("step", ["prepare", "cycle"])
async def test_a_site_snapshot_that_hangs_does_not_hold_a_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """The build loop snapshots the site in a thread (at start, and after a build). On a
    site that stopped answering (a network mount) the snapshot was not left to its thread
    on cancel, so the server's shutdown waited until the file system answered (under the
    CLI the watchdog then ended the process, status 1). A snapshot only reads: a cancel
    leaves it now, and its thread ends when the mount answers."""
    import threading

    from punie_trio.web.dev import _builder

    root, site, _ = _project(tmp_path)
    loop = BuildLoop(site, root, Broadcaster(), PendingChanges(), None)
    if step == "cycle":
        await loop.prepare()
        (site / "many").mkdir()  # (past what small_snapshot takes on the event loop)
        for i in range(SMALL_ENTRIES + 1):
            (site / "many" / f"{i}.html").write_text("x")
    entered, release = threading.Event(), threading.Event()
    timed_out: list[bool] = []
    real = _builder.take_snapshot

    def hung(*args: Any) -> Any:
        entered.set()
        timed_out.append(not release.wait(timeout=10))
        return real(*args)

    monkeypatch.setattr(_builder, "take_snapshot", hung)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.prepare if step == "prepare" else loop.cycle)
            await trio.to_thread.run_sync(entered.wait)
            nursery.cancel_scope.cancel()
    assert timed_out == []  # (the cancel ended it while the snapshot still hung)
    release.set()
