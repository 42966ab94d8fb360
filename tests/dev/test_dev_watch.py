"""The watchers against real files: when a change is handed to the build loop, and that none
is dropped.

No test sleeps for a guessed time. The inotify watcher's batching is driven by Trio's clock,
so the tests run under MockClock (time moves only when a test jumps it) and observe the
watcher with ``wait_all_tasks_blocked``: Trio reports all tasks blocked only once a look at
the descriptors found nothing more to read, so by then the watcher has seen every event the
kernel had queued for the writes made before.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from devsupport import process_running, write

from punie_trio.web.dev import _inotify
from punie_trio.web.dev._builder import Group, direct_argv, group_of, run_build, stop_group
from punie_trio.web.dev._watch import (
    MAX_BATCH_MS,
    STEP_MS,
    Backend,
    IgnoreRules,
    PendingChanges,
    watch,
)

linux_only = pytest.mark.skipif(not _inotify.available(), reason="inotify is Linux only")
DEADLINE = 10


@asynccontextmanager
async def watching(
    root: Path, backend: Backend = "inotify", paths: list[Path] | None = None
) -> AsyncIterator[PendingChanges]:
    pending = PendingChanges()
    rules = IgnoreRules.build([root], (), [root / "site"])
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: watch(
            paths or [root], rules, pending, backend=backend, task_status=task_status
        ))  # fmt: skip
        yield pending
        nursery.cancel_scope.cancel()


def taken(pending: PendingChanges, root: Path) -> set[str]:
    paths, overflow = pending.take()
    assert not overflow
    real = os.path.realpath(root)
    return {os.path.relpath(p, real) for p in paths}


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def until_pending(pending: PendingChanges) -> None:
    """Until the watcher hands something over, where it first scans a new directory in a
    worker thread (Trio counts a task waiting for a thread as blocked, so ``settle`` alone
    does not wait for it): polls the observed state, letting real time pass in between."""
    for _ in range(DEADLINE * 1000):
        await settle()
        if pending:
            return
        await trio.to_thread.run_sync(time.sleep, 0.001)
    raise AssertionError("nothing handed over")


@linux_only
async def test_complete_write_is_handed_over_at_once(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    (tmp_path / "a.html").write_text("v1")
    async with watching(tmp_path) as pending:
        # Right after started: not missed (the readiness guarantee), and with no clock
        # movement at all: a closed file is complete, nothing waits for a step.
        (tmp_path / "a.html").write_text("v2")
        await settle()
        assert taken(pending, tmp_path) == {"a.html"}
        # Ignored names, and the ignored site directory, never count.
        (tmp_path / "a.html.swp").write_text("x")
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "index.html").write_text("x")
        await settle()
        mock_clock.jump(1)
        await settle()
        assert not pending


@linux_only
async def test_a_file_opened_for_writing_but_not_changed_does_not_count(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Hugo opens its lock file for writing on every build and writes nothing: the close
    (IN_CLOSE_WRITE) counted as a change, so the build started itself again and again
    (found by a dev app audit). A close counts only after a write, a creation or a
    truncation; a metadata change (``touch``) still counts on its own."""
    lock = tmp_path / "build.lock"
    lock.write_text("")
    async with watching(tmp_path) as pending:
        os.close(os.open(lock, os.O_RDWR | os.O_CREAT))
        await settle()
        mock_clock.jump(1)
        await settle()
        assert not pending
        with open(lock, "a") as f:  # noqa: ASYNC230 (held open on purpose)
            f.write("x")
            f.flush()
            await settle()
            mock_clock.jump(STEP_MS / 1000)  # handed over while still open...
            await settle()
            assert taken(pending, tmp_path) == {"build.lock"}
        await settle()  # ...and its close counts too (it wrote)
        assert taken(pending, tmp_path) == {"build.lock"}
        os.close(os.open(lock, os.O_WRONLY | os.O_TRUNC))  # truncated: a change
        await settle()
        assert taken(pending, tmp_path) == {"build.lock"}
        os.utime(lock, (1, 1))  # touch
        await settle()
        assert taken(pending, tmp_path) == {"build.lock"}
        os.close(os.open(tmp_path / "new.txt", os.O_WRONLY | os.O_CREAT))  # created
        await settle()
        assert taken(pending, tmp_path) == {"new.txt"}


@linux_only
async def test_a_write_in_progress_holds_the_batch_until_closed(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with watching(tmp_path) as pending:
        with open(tmp_path / "big.html", "w") as f:  # noqa: ASYNC230 (held open on purpose)
            f.write("<p>first half")
            f.flush()
            (tmp_path / "other.css").write_text("a{}")  # complete, but big.html is not
            await settle()
            assert not pending  # no build may start on a half-written file
            f.write(" second half</p>")
        await settle()
        assert taken(pending, tmp_path) == {"big.html", "other.css"}


@linux_only
async def test_a_write_left_open_is_handed_over_after_the_step(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with watching(tmp_path) as pending:
        with open(tmp_path / "log.html", "w") as f:  # noqa: ASYNC230 (held open on purpose)
            f.write("x")
            f.flush()
            await settle()
            assert not pending
            mock_clock.jump(STEP_MS / 1000)  # quiet for a step: never held forever
            await settle()
            assert taken(pending, tmp_path) == {"log.html"}
            # A writer that keeps writing is bounded by the batch limit instead.
            for _ in range(MAX_BATCH_MS // (STEP_MS // 2) + 2):  # (+1: float rounding)
                f.write("y")
                f.flush()
                await settle()
                if pending:
                    break
                mock_clock.jump(STEP_MS / 2 / 1000)
            assert taken(pending, tmp_path) == {"log.html"}


@linux_only
async def test_saves_by_rename(tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    (tmp_path / "page.html").write_text("v1")
    async with watching(tmp_path) as pending:
        # Atomic save: write a temporary file, rename it over the page. Complete at once.
        (tmp_path / "page.html.tmp123").write_text("v2")
        os.replace(tmp_path / "page.html.tmp123", tmp_path / "page.html")
        await settle()
        assert taken(pending, tmp_path) == {"page.html", "page.html.tmp123"}
        # vim without backupcopy: the page is renamed to its (ignored) backup name, then
        # written anew. Between the two the page does not exist: that must not be handed
        # over as complete.
        os.replace(tmp_path / "page.html", tmp_path / "page.html~")
        await settle()
        assert not pending
        (tmp_path / "page.html").write_text("v3")
        (tmp_path / "page.html~").unlink()
        await settle()
        assert taken(pending, tmp_path) == {"page.html"}
        # A plain deletion is handed over after a quiet step.
        (tmp_path / "page.html").unlink()
        await settle()
        assert not pending
        mock_clock.jump(STEP_MS / 1000)
        await settle()
        assert taken(pending, tmp_path) == {"page.html"}


@linux_only
async def test_new_directories_are_watched_and_their_files_reported(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with watching(tmp_path) as pending:
        # Made while nobody watched it yet: found by the scan of the new directory.
        os.makedirs(tmp_path / "docs" / "api")
        (tmp_path / "docs" / "api" / "x.md").write_text("x")
        await settle()
        mock_clock.jump(STEP_MS / 1000)
        await until_pending(pending)
        assert {"docs", "docs/api/x.md"} <= taken(pending, tmp_path)
        # ...and watched from then on.
        (tmp_path / "docs" / "api" / "y.md").write_text("y")
        await settle()
        assert taken(pending, tmp_path) == {"docs/api/y.md"}
        # Moved away: no longer watched, its disappearance reported.
        os.rename(tmp_path / "docs", tmp_path.parent / f"{tmp_path.name}-moved")
        await settle()
        mock_clock.jump(STEP_MS / 1000)
        await settle()
        assert taken(pending, tmp_path) == {"docs"}
        (tmp_path.parent / f"{tmp_path.name}-moved" / "api" / "z.md").write_text("z")
        await settle()
        mock_clock.jump(1)
        await settle()
        assert not pending


@linux_only
async def test_a_root_directory_deleted_and_made_again_is_watched_again(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A build tool that wipes and recreates its output directory (a site outside the
    project, watched as a root of its own): its return was never seen, and no later
    change was reported (live reload stopped for good; found by a dev app audit)."""
    site = tmp_path / "out"
    site.mkdir()
    async with watching(tmp_path, paths=[site]) as pending:
        (site / "index.html").write_text("one")
        await settle()
        assert taken(pending, tmp_path) == {"out/index.html"}
        for round in ("two", "three"):
            await _wipe_and_remake(site, round, pending, mock_clock, tmp_path)


async def _wipe_and_remake(
    site: Path,
    round: str,
    pending: PendingChanges,
    mock_clock: trio.testing.MockClock,
    tmp_path: Path,
) -> None:
    """Remove ``site`` (a directory of files) and make it again with an ``index.html``: the
    new file is reported, and so is one written after it (the new directory is watched)."""
    _remake(site, round)
    await settle()
    mock_clock.jump(STEP_MS / 1000)
    await until_pending(pending)
    assert "out/index.html" in taken(pending, tmp_path), round
    write(site / "later.html", round)  # watched from then on
    await settle()
    mock_clock.jump(STEP_MS / 1000)
    await until_pending(pending)
    assert taken(pending, tmp_path) == {"out/later.html"}, round


def _remake(site: Path, content: str) -> None:
    for child in site.iterdir():
        child.unlink()
    site.rmdir()
    site.mkdir()
    (site / "index.html").write_text(content)


@linux_only
@pytest.mark.parametrize("holder", ["fd", "cwd"])
async def test_a_root_wiped_while_a_process_is_in_it_is_watched_again(
    tmp_path: Path, mock_clock: trio.testing.MockClock, holder: str
) -> None:
    """While anything still refers to the directory (a shell cd'ed into it, an open
    descriptor), the kernel reports its deletion (IN_DELETE_SELF) only once the last
    reference goes: the root's return was not seen, and live reload stopped for good
    (found by a dev app audit). Its parent reports the name going and coming back."""
    site = tmp_path / "out"
    site.mkdir()
    async with watching(tmp_path, paths=[site]) as pending:
        for round in ("one", "two"):
            sleeper: trio.Process | None = None
            if holder == "fd":
                held = os.open(site, os.O_RDONLY | os.O_DIRECTORY)
            else:
                sleeper = await trio.lowlevel.open_process(["sleep", "600"], cwd=site)
            try:
                await _wipe_and_remake(site, round, pending, mock_clock, tmp_path)
            finally:
                if sleeper is None:
                    os.close(held)
                else:
                    sleeper.kill()
                    await sleeper.wait()


def _watched_dirs(tmp_path: Path) -> set[str]:
    notify = _inotify.Inotify(IgnoreRules.build([tmp_path], (), [tmp_path / "site"]))
    try:
        notify.add_roots([str(tmp_path)])
        return {os.path.relpath(d, os.path.realpath(tmp_path)) for d in notify.wds}
    finally:
        notify.close()


@linux_only
async def test_ignored_directories_get_no_watch(tmp_path: Path) -> None:
    (tmp_path / "node_modules" / "pkg").mkdir(parents=True)
    (tmp_path / "site" / "deep").mkdir(parents=True)
    (tmp_path / "src" / "a").mkdir(parents=True)
    # (and the root's parent, for the root's name: a root wiped and made again)
    assert _watched_dirs(tmp_path) == {"..", ".", "src", "src/a"}


@linux_only
async def test_a_watched_file_survives_replacement(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    config = tmp_path / "mkdocs.yml"
    config.write_text("a: 1")
    async with watching(tmp_path, paths=[config]) as pending:
        (tmp_path / "unrelated.txt").write_text("x")  # same directory, not watched
        new = tmp_path / "mkdocs.yml.new"
        new.write_text("a: 2")
        os.replace(new, config)
        await settle()
        assert taken(pending, tmp_path) == {"mkdocs.yml"}
        config.write_text("a: 3")  # the new inode is seen too
        await settle()
        assert taken(pending, tmp_path) == {"mkdocs.yml"}


async def test_watchfiles_backend_still_works(tmp_path: Path) -> None:
    (tmp_path / "a.html").write_text("v1")
    with trio.fail_after(DEADLINE):
        async with watching(tmp_path, backend="watchfiles") as pending:
            (tmp_path / "a.html").write_text("v2")
            await pending.wait()
            assert "a.html" in taken(pending, tmp_path)


@linux_only
def test_settler_rules() -> None:
    s = _inotify.Settler()
    s.started("a", 1.0)
    s.touched("a")  # a chmod during a write does not complete it
    assert not s.settled and s.first_in_progress == 1.0
    s.completed("b")
    s.started("c", 2.0)
    assert s.first_in_progress == 1.0  # the batch's first event in progress
    s.completed("a")
    s.completed("c")
    assert s.settled
    assert s.take() == (["a", "b", "c"], False)
    s.overflowed(3.0)
    assert not s.settled and s.take() == ([], True) and not s


# -- the build command --------------------------------------------------------------------


def test_direct_argv() -> None:
    assert direct_argv("cp src/index.html site/index.html") == [
        "cp",
        "src/index.html",
        "site/index.html",
    ]
    assert direct_argv("  mkdocs\tbuild  -d site ") == ["mkdocs", "build", "-d", "site"]
    assert direct_argv("sphinx-build -b html . _build/html --jobs=2") is not None
    for shell_only in (
        "make html > log",
        "cd docs && make",
        "make; make",
        "echo $HOME",
        "cp *.html out",
        'python -c "print(1)"',
        "FOO=1 make",
        "cd docs",
        "echo hi",
        "cp ~/a b",
        "make html # comment",
        "",
        "   ",
    ):
        assert direct_argv(shell_only) is None, shell_only


async def test_run_build_direct_and_through_the_shell(tmp_path: Path) -> None:
    script = tmp_path / "show.py"
    script.write_text(
        f"#!{sys.executable}\nimport os, sys\nprint(os.environ['PWD'], sys.argv[1:])\n"
    )
    script.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    result = await run_build(f"{script} a  b", work)  # direct: no shell metacharacters
    assert result.ok and result.output == f"{work} ['a', 'b']"
    # Not found: the shell's own status and message, as before.
    missing = await run_build("no-such-build-tool-xyz --flag", work)
    assert missing.exit_status == 127 and "not found" in missing.output
    # A script without a #! line: the shell runs it, as it would have.
    plain = tmp_path / "plain.sh"
    plain.write_text("echo from-sh\n")
    plain.chmod(0o755)
    assert (await run_build(str(plain), work)).output == "from-sh"
    # Anything else still goes through the shell.
    assert (await run_build("echo one && echo two >&2", work)).output == "one\ntwo"


@linux_only
async def test_a_build_that_leaves_a_child_running_completes_when_its_command_exits(
    tmp_path: Path,
) -> None:
    """The build loop read the output until EOF, which a background child holding the pipe
    never gave: the build never finished, and the child outlived the server (found by a dev
    app audit). Now the build ends with its command, and its process group is stopped."""
    with trio.fail_after(DEADLINE):
        result = await run_build("sleep 600 & echo $!; echo built", tmp_path)
    assert result.ok and result.group is not None
    pid_text, built = result.output.splitlines()
    child = int(pid_text)
    assert built == "built" and process_running(child)
    with trio.fail_after(DEADLINE):
        await stop_group(result.group)
    assert not process_running(child)
    await stop_group(result.group)  # nothing left: a no-op


@linux_only
async def test_leftovers_are_signalled_only_while_a_recorded_process_runs(
    tmp_path: Path,
) -> None:
    """Once every process a build left has ended, its group's number may be taken by a
    stranger that makes itself a group leader; the next build's stop sent it SIGTERM and
    SIGKILL (a review). A process is recognised by its pid and start time."""
    stranger = await trio.lowlevel.open_process(["sleep", "600"], start_new_session=True)
    try:
        found = group_of(stranger.pid)
        assert found is not None and {pid for pid, _ in found.members} == {stranger.pid}
        ((pid, start),) = found.members
        # Recorded with another start time: a build's process that had this pid, now gone.
        await stop_group(Group(stranger.pid, frozenset({(pid, start - 1)})))
        assert process_running(stranger.pid)
        with trio.fail_after(DEADLINE):
            await stop_group(found)  # the process recorded: stopped
        assert not process_running(stranger.pid)
    finally:
        stranger.kill()
        await stranger.wait()


@linux_only
async def test_a_cancelled_build_stops_its_whole_process_group(tmp_path: Path) -> None:
    """Cancelled (shutdown), the build's group got SIGTERM and, once the command was gone,
    nothing more: a child that ignores SIGTERM outlived the server. Now what is left of the
    group after the command gets SIGKILL (after :data:`LEFTOVER_GRACE`)."""
    pids = tmp_path / "pids"
    command = f"(trap '' TERM; exec sleep 600) & echo $! > {pids}; exec sleep 600"
    with trio.fail_after(DEADLINE), trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_build, command, tmp_path)
            while not pids.exists() or not pids.read_text().endswith("\n"):
                await trio.to_thread.run_sync(time.sleep, 0.001)
            scope.cancel()
    assert not process_running(int(pids.read_text()))


@linux_only
async def test_a_root_named_by_a_symlink_follows_the_link_when_it_is_re_pointed(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A site that is a symlink a build re-points (``current -> releases/N``, ``nix build``'s
    ``./result``), watched as a root of its own: only its target at start was watched, so
    neither the re-point nor edits in the new target were seen (found by a dev app audit)."""
    releases = tmp_path / "releases"
    for n in ("1", "2"):
        (releases / n).mkdir(parents=True)
        (releases / n / "index.html").write_text(n)
    link = tmp_path / "current"
    link.symlink_to(releases / "1")
    project = tmp_path / "project"
    project.mkdir()
    async with watching(project, paths=[project, link]) as pending:
        (tmp_path / "current.tmp").symlink_to(releases / "2")
        os.replace(tmp_path / "current.tmp", link)  # an atomic switch, as nix build does
        await settle()
        mock_clock.jump(STEP_MS / 1000)
        await until_pending(pending)
        assert "current" in taken(pending, tmp_path)
        (releases / "2" / "index.html").write_text("2b")  # an edit in the new target
        await settle()
        assert taken(pending, tmp_path) == {"releases/2/index.html"}


@linux_only
@pytest.mark.parametrize("command", ["sleep 600", "sleep 600; true"])
async def test_an_immediate_exit_while_a_build_starts_kills_that_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """``kill_groups_now`` (a second signal, the watchdog) comes while a build's command is
    being started on its worker thread. The command was listed for it only once the build's
    task ran again on the event loop, so nothing was killed, and the build, in a session of
    its own, outlived the server (1 run in 20 of a server test, on a loaded machine). It is
    listed on the starting thread now, under the lock ``kill_groups_now`` takes: the kill
    waits for the start, then kills it too. (Directly, and through the shell.)"""
    import subprocess
    import threading

    from punie_trio.web.dev import _builder

    real_popen = subprocess.Popen
    killers: list[threading.Thread] = []

    def popen_then_exit(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        process = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        # The exit comes now, the child running and its start not yet returned.
        killer = threading.Thread(target=_builder.kill_groups_now)
        killer.start()
        killers.append(killer)
        return process  # type: ignore[no-any-return]

    monkeypatch.setattr(subprocess, "Popen", popen_then_exit)
    with trio.fail_after(DEADLINE):
        result = await run_build(command, tmp_path)
    monkeypatch.undo()
    for killer in killers:
        killer.join()
    assert len(killers) == 1
    assert result.exit_status == -9, result  # SIGKILL, from kill_groups_now
    assert not _builder._commands


def _unreaped_child(pid: int) -> bool:
    """Whether ``pid`` is a child of this process not reaped yet (running, or a zombie):
    only then is its number, and its process group's, still its own."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except FileNotFoundError:
        return False
    return int(fields[1]) == os.getpid()


@linux_only
@pytest.mark.parametrize("pidfd", [True, False])
async def test_a_build_group_is_listed_for_killing_only_while_its_command_is_unreaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pidfd: bool
) -> None:
    """``kill_groups_now`` (an immediate exit: a second signal, the shutdown watchdog)
    SIGKILLs the process group of every build whose command runs, by the command's pid.
    The command was reaped (``Process.wait``) and taken off that list only later, some
    awaits on (its pipe closed, its group looked up): meanwhile its pid was free for any
    new process, and one that made itself a group leader there (a shell's job, a daemon)
    would have been killed. Here a task looks at the list at every scheduling pass while
    builds run, end, and are cancelled: each pid on it must be an unreaped child. (Without
    a pidfd the exit is waited for with ``waitid(WNOWAIT)`` in a thread.)"""
    from punie_trio.web.dev import _builder

    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open")

    strays: list[int] = []

    async def watch_the_list() -> None:
        while True:
            strays.extend(pid for pid in list(_builder._commands) if not _unreaped_child(pid))
            await trio.lowlevel.checkpoint()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_the_list)
            for command in ("true", "echo through the shell; true", "sleep 600 & echo $!"):
                result = await run_build(command, tmp_path)
                assert result.ok, result
                if result.group is not None:
                    await stop_group(result.group)
            async with trio.open_nursery() as cancelled:  # (its group killed, then reaped)
                cancelled.start_soon(run_build, "sleep 600", tmp_path)
                while not _builder._commands:
                    await trio.lowlevel.checkpoint()
                cancelled.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    assert strays == []
    assert not _builder._commands
