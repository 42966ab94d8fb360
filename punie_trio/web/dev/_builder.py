"""The build loop: changes -> quiet period -> build -> compare outputs -> broadcast.

One debounce layer: :meth:`PendingChanges.wait_quiet` waits until ``debounce`` seconds passed
without a change. Changes that arrive while a build runs accumulate in the same
:class:`PendingChanges` and produce exactly **one** follow-up build (the loop takes them all at
once). Builds never overlap: the loop is one task.

A failed build publishes ``build_error`` (command, exit status, tail of the output) and does not
touch the reload state: the last good output keeps being served (the dev app does not write to
the site directory) and the comparison base stays the last good snapshot, so the next good
build reloads exactly what changed since the output the tabs are showing.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar, TypeVarTuple

import attrs
import trio

from ..._threads import RootNotAnswering, run_sync_under, site_key
from ._broadcast import Broadcaster
from ._events import StatusEvent
from ._snapshot import FileSig, decide, small_snapshot, take_snapshot
from ._watch import PendingChanges

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")

log = logging.getLogger("punie_trio.dev")

#: A build still running after this long is announced to open streams (``build_start``: the
#: badge). A faster one is not: its ``build_ok`` and reload follow within the delay, and a
#: badge shown for a few milliseconds is flicker. It also spares every open stream one write
#: per quick rebuild, which is what keeps a broadcast to a thousand tabs quick.
BUILD_START_DELAY = 0.1

#: Builds in a row started only by paths the build before changed, and changing them again,
#: after which the loop guard takes them for the build's own (see :meth:`BuildLoop._guard`).
ECHO_BUILDS = 2

#: How much of a build's combined stdout/stderr is kept for the error overlay.
OUTPUT_TAIL_BYTES = 8192
OUTPUT_TAIL_LINES = 60


#: The exit status of a build whose command could not be started at all (the shell's
#: "found but cannot be executed").
NOT_STARTED = 126


@attrs.frozen
class BuildResult:
    command: str
    exit_status: int
    output: str
    duration: float
    #: The build's process group when processes of it still run after the command exited
    #: (a background child, a helper daemon): the caller stops it (:func:`stop_group`).
    group: Group | None = None

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


#: Terminal control sequences: CSI (colours, cursor moves, erase), OSC (window titles,
#: hyperlinks) up to BEL or ST, DCS/SOS/PM/APC strings, and the short escapes.
_ESCAPES = re.compile(
    rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[PX^_][^\x1b]*(?:\x1b\\)?"
    rb"|[ -/]*[0-~])"
)
#: C0 controls a terminal does not print (tab, newline, carriage return and backspace are
#: handled apart), and DEL.
_CONTROLS = re.compile(rb"[\x00-\x07\x0b\x0c\x0e-\x1f\x7f]")
_BACKSPACED = re.compile(rb"[^\x08]\x08")


def _visible(segment: bytes) -> bytes:
    """``segment`` (no ``\r`` or ``\n`` in it) without what a terminal does not print."""
    segment = _ESCAPES.sub(b"", segment)
    while b"\x08" in segment:
        rubbed = _BACKSPACED.sub(b"", segment).lstrip(b"\x08")
        if rubbed == segment:
            break
        segment = rubbed
    return _CONTROLS.sub(b"", segment)


def _last_visible(segments: Sequence[bytes]) -> bytes:
    for segment in reversed(segments):
        visible = _visible(segment)
        if visible:
            return visible
    return b""


@attrs.define(eq=False)
class OutputTail:
    """The end of a build's output as a terminal would show it, kept as it is read.

    Why: the overlay showed raw output, so colour codes were literal text, and every ``\r``
    progress update was a line of its own (the last 60 lines were "progress N%"). Now escape
    sequences and other unprinted controls are dropped, and within a line a ``\r`` means the
    text after it replaces what came before (the last non-empty part of the line is kept).
    The rule is applied as the output arrives, so progress spam longer than the bounds
    cannot push out the lines before it.

    Resource handling: at most ``max_lines`` finished lines and about ``max_bytes`` of them,
    and the current line's last visible part (two ``\r`` parts, each bounded by
    ``max_bytes``).
    """

    max_bytes: int = OUTPUT_TAIL_BYTES
    max_lines: int = OUTPUT_TAIL_LINES
    _lines: collections.deque[bytes] = attrs.field(init=False, factory=collections.deque)
    _size: int = attrs.field(init=False, default=0)
    _partial: bytes = attrs.field(init=False, default=b"")

    def feed(self, chunk: bytes | bytearray) -> None:
        *done, partial = (self._partial + chunk).split(b"\n")
        for line in done:
            self._finish(_last_visible(line.split(b"\r")))
        if b"\r" in partial:
            # Everything before the last \r is finished text: only its last visible part
            # can still show. What follows may end inside an escape sequence: kept raw.
            *before, current = partial.split(b"\r")
            shown = _last_visible(before)[-self.max_bytes :]
            partial = shown + b"\r" + current if shown else current
        self._partial = partial[-2 * self.max_bytes - 1 :]

    def _finish(self, line: bytes) -> None:
        self._lines.append(line[-self.max_bytes :])
        self._size += len(self._lines[-1]) + 1
        while len(self._lines) > self.max_lines or (
            len(self._lines) > 1 and self._size - len(self._lines[0]) - 1 >= self.max_bytes
        ):
            self._size -= len(self._lines.popleft()) + 1

    def text(self) -> str:
        lines = list(self._lines)
        current = _last_visible(self._partial.split(b"\r"))
        if current:
            lines.append(current)
        text = b"\n".join(lines)[-self.max_bytes :].decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-self.max_lines :])


def tail(
    output: bytes, max_bytes: int = OUTPUT_TAIL_BYTES, max_lines: int = OUTPUT_TAIL_LINES
) -> str:
    """The end of a build's output as a terminal shows it (see :class:`OutputTail`): at most
    ``max_lines`` lines and ``max_bytes`` bytes."""
    kept = OutputTail(max_bytes, max_lines)
    kept.feed(output)
    return kept.text()


#: How long a build's processes get between SIGTERM and SIGKILL: a cancelled build's command,
#: and what a finished build left running (the server's shutdown watchdog must not beat it:
#: ``serve`` gives a build no more than half its shutdown timeout, ``BuildLoop.kill_grace``).
KILL_GRACE = 5.0
LEFTOVER_GRACE = 1.0
#: Output read after the command exited: what is in the pipe then, without waiting (a child
#: left running may keep the pipe open for ever), up to this much.
DRAIN_BYTES = 1024 * 1024


@attrs.frozen
class Group:
    """A build's process group as it was when its command exited: its id, and the
    ``(pid, start time)`` of the processes in it then (see :func:`stop_group`)."""

    pgid: int
    members: frozenset[tuple[int, int]]


#: The process groups of the builds whose command has not been reaped (by its pid, the
#: group's id: it is our child, so the id cannot be another's until we reap it; a command
#: leaves this set before it is reaped, under :data:`_reaping`), and of what builds left
#: running that is not stopped yet. :func:`kill_groups_now` kills them all.
_commands: set[int] = set()
_left: dict[int, Group] = {}
#: Held while a command leaves :data:`_commands` and is reaped, and while
#: :func:`kill_groups_now` signals those groups (it may run on the watchdog's thread).
_reaping = threading.Lock()


def kill_groups_now() -> None:
    """SIGKILL every build's process group still running, without waiting: for a server
    that exits at once (a second signal, the shutdown's watchdog; ``server._exit_now``).

    Why: a shutdown stops builds in its own time (SIGTERM, SIGKILL after
    :data:`KILL_GRACE`); a process that exits before that left a build that ignores
    SIGTERM (or is slow to end) running, in a session of its own, for good. Safe from any
    thread: it only reads ``/proc`` and sends signals, and a command's group is signalled
    only while the command is not reaped (:data:`_reaping`)."""
    with _reaping:
        for pgid in list(_commands):
            _signal_group(pgid, signal.SIGKILL)
    for group in list(_left.values()):
        if _ours(group):
            _signal_group(group.pgid, signal.SIGKILL)


def _proc_stat(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()
    except OSError:
        return None


def group_of(pgid: int) -> Group | None:
    """The running processes of group ``pgid`` (a zombie has ended: orphans are reaped by
    init, which in a container may never do it), or None if none runs."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    members = set()
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            fields = _proc_stat(entry) if entry.isdigit() else None
            if fields and len(fields) > 19 and int(fields[2]) == pgid and fields[0] != b"Z":
                members.add((int(entry), int(fields[19])))
    return Group(pgid, frozenset(members)) if members else None


def _ours(group: Group) -> bool:
    """Whether a process the group had when recorded still runs in it. Only then is the
    group id still the build's: once all of them have ended, the id may be a stranger's
    (a review: a process that took the number as its own group got the next build's
    SIGTERM). Its start time tells a process from a later one with the same pid."""
    for pid, start in group.members:
        fields = _proc_stat(pid)
        if (
            fields
            and len(fields) > 19
            and fields[0] != b"Z"
            and int(fields[2]) == group.pgid
            and int(fields[19]) == start
        ):
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def stop_group(group: Group, grace: float = LEFTOVER_GRACE) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace`` seconds; returns once none of
    its recorded processes runs (or, if one survives even SIGKILL, a process stuck in the
    kernel, after another ``grace``). Signals go only while one of them still runs in the
    group (:func:`_ours`).

    For processes that outlived their build's command (its shell has exited, so only the
    group reaches them). They are not our children, so there is nothing to wait on for
    their end: it is polled, every 10 ms. No-op when none of them runs.
    """
    _left[group.pgid] = group
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _ours(group):
                return
            _signal_group(group.pgid, sig)
            with trio.move_on_after(grace):
                while _ours(group):  # noqa: ASYNC110 (not our children: nothing to wait on)
                    await trio.sleep(0.01)
    finally:
        if _left.get(group.pgid) is group:
            del _left[group.pgid]


async def _kill_build(process: subprocess.Popen[bytes], grace: float = KILL_GRACE) -> None:
    """A cancelled build: SIGTERM to its whole process group, SIGKILL after ``grace``
    seconds; then the command is reaped (:func:`_reap`), and whatever of the group
    outlived it (a background child) is stopped too. Signalling the group reaches what a
    shell started; the group is signalled by its id only while the command, its leader,
    is not reaped."""
    _signal_group(process.pid, signal.SIGTERM)
    with trio.move_on_after(grace) as waited:
        await _exited(process)
    if waited.cancelled_caught:
        _signal_group(process.pid, signal.SIGKILL)  # (the leader too: it cannot leave)
        await _exited(process)
    left = _reap(process)
    if left is not None:
        await stop_group(left, min(LEFTOVER_GRACE, grace))


async def _exited(process: subprocess.Popen[bytes]) -> None:
    """Wait for ``process`` to exit without reaping it: it stays a zombie, which keeps its
    pid, and so its process group's id, from any other process until :func:`_reap`.
    (``Popen.wait`` and ``Popen.poll`` reap it.)

    A pidfd (Linux 5.3) is waited on; failing one, ``waitid`` with ``WNOWAIT`` in a
    thread. Where neither exists (macOS before Python 3.13) the process is reaped as it
    exits, as it always was there."""
    pidfd_open = getattr(os, "pidfd_open", None)
    try:
        pidfd = pidfd_open(process.pid) if pidfd_open is not None else -1
    except OSError:  # (ENOSYS: an old kernel; EMFILE: no descriptor to be had)
        pidfd = -1
    if pidfd >= 0:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
    elif hasattr(os, "waitid") and hasattr(os, "WNOWAIT"):
        await trio.to_thread.run_sync(_waitid_exited, process.pid, abandon_on_cancel=True)
    else:  # pragma: no cover - neither pidfd nor waitid
        await trio.to_thread.run_sync(process.wait, abandon_on_cancel=True)


def _waitid_exited(pid: int) -> None:
    """(On a worker thread.) Return once child ``pid`` has exited, leaving it unreaped."""
    with contextlib.suppress(ChildProcessError):  # (reaped meanwhile: it has exited)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _reap(process: subprocess.Popen[bytes]) -> Group | None:
    """Reap the command (exited, not reaped yet: :func:`_exited`), and return what of
    its process group still runs. The group is looked at first, while the exited command
    still holds the group's id (a stranger may take the id once it is reaped, and would
    have been recorded as the build's leftovers); then, under :data:`_reaping`, the
    command leaves :data:`_commands` and is reaped, so that :func:`kill_groups_now`
    (from any thread) never signals the group by an id that is free.

    Why: the command was reaped first and taken off the list some awaits later (its pipe
    closed, its group looked up): an immediate exit meanwhile sent SIGKILL to a group id
    any new process could have taken, a stranger that made itself a group leader there
    (a shell's job, a daemon)."""
    group = group_of(process.pid)
    with _reaping:
        _commands.discard(process.pid)
        process.poll()
    return group


#: Characters that make the shell do more than split a command into words (quotes, escapes,
#: expansions, globs, redirections, pipes, lists, comments, tildes, braces, history).
SHELL_CHARS = frozenset("|&;<>()$`\\\"'*?[]#~{}!\n\r")
#: First words only the shell can run as written: its keywords and built-ins (some exist as
#: programs too, with different behaviour: the shell's own are kept).
_SHELL_WORDS = (
    "! { } [ [[ . : alias bg break builtin case cd command continue do done echo elif else "
    "esac eval exec exit export false fc fg fi for function getopts hash if in jobs kill "
    "let local logout newgrp printf pwd read readonly return select set shift source "
    "suspend test then time times trap true type typeset ulimit umask unalias unset until "
    "wait while"
)
SHELL_WORDS = frozenset(_SHELL_WORDS.split())


def direct_argv(command: str) -> list[str] | None:
    """The program and arguments when the shell would only split ``command`` into words and
    look the program up in ``PATH``, which is what ``exec`` does itself; else ``None``.

    The test GNU make applies before running a recipe line without a shell (a bit stricter:
    no variable assignment as the first word, none of the shell's words). It saves starting
    a shell per build, about 0.6 ms here, which is most of what a quick build costs.
    """
    if any(c in SHELL_CHARS for c in command):
        return None
    argv = [word for word in re.split(r"[ \t]+", command) if word]  # the shell's IFS blanks
    if not argv or argv[0] in SHELL_WORDS or "=" in argv[0]:
        return None
    return argv


async def run_build(command: str, cwd: Path, *, kill_grace: float = KILL_GRACE) -> BuildResult:
    """Run ``command`` as the shell runs it, in ``cwd``; keep a bounded tail of its output.

    A command the shell would only split into words is started directly (see
    :func:`direct_argv`), with ``PWD`` set as the shell sets it; if that program cannot be
    started (not found, not executable, a script without ``#!``), the command goes through
    the shell after all, so the status and message are the shell's own (127, "not found").

    The build is over when its command exits, not when its output ends: a child it left in
    the background (``daemon &``) keeps the pipe open, and waiting for the end of the output
    hung the build loop for good. What is in the pipe when the command exits is still read
    (without waiting); the result names the process group if anything of it still runs.

    Resource handling: the output is read as it comes (a build that prints a lot never fills a
    pipe nor our memory: only its end is kept, as a terminal shows it: :class:`OutputTail`),
    and our end of the pipe is closed when the build is over. Cancellation terminates the
    whole process group, including what the command left in the background (SIGKILL
    after ``kill_grace`` seconds).

    Error handling: a build that cannot be started at all (no pipe or process to be had:
    ``EMFILE`` when a flood of connections took every descriptor, ``ENOMEM``; the project
    directory gone) is a failed build with status :data:`NOT_STARTED` and the reason as its
    output. The ``OSError`` left the build loop and took the whole server down, ACP
    sessions and all; the next change now builds again.
    """
    started = trio.current_time()
    kept = OutputTail()
    try:
        process, stdout = await _open_build(command, cwd)  # (listed: kill_groups_now)
    except OSError as exc:
        reason = f"punie-trio: the build could not be started: {exc}"
        return BuildResult(command, NOT_STARTED, reason, trio.current_time() - started)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_output, stdout, kept)
            await _exited(process)  # (not reaped: see _reap)
            nursery.cancel_scope.cancel()
        _drain(stdout.fileno(), kept)
    except BaseException:
        with trio.CancelScope(shield=True):
            await _kill_build(process, kill_grace)
            await stdout.aclose()
        raise
    with trio.CancelScope(shield=True):
        await stdout.aclose()
    group = _reap(process)
    if group is not None:  # (until BuildLoop.stop_leftovers stops it)
        _left[group.pgid] = group
    exit_status = process.returncode
    assert exit_status is not None
    return BuildResult(command, exit_status, kept.text(), trio.current_time() - started, group)


async def _read_output(stdout: trio.abc.ReceiveStream, kept: OutputTail) -> None:
    async for chunk in stdout:
        kept.feed(chunk)


def _drain(fd: int, kept: OutputTail) -> None:
    """Read what the pipe holds now (the pipe is non-blocking), up to :data:`DRAIN_BYTES`."""
    drained = 0
    while drained < DRAIN_BYTES:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        kept.feed(chunk)
        drained += len(chunk)


def _direct_env(cwd: Path) -> dict[str, str]:
    """The environment the shell would give the program: ours, with ``PWD`` the build's
    directory (a shell sets it at start-up)."""
    return {**os.environ, "PWD": os.path.abspath(cwd)}


async def _open_build(
    command: str, cwd: Path
) -> tuple[subprocess.Popen[bytes], trio.lowlevel.FdStream]:
    """The build's process, in a session (and process group) of its own, stdout and stderr
    into one pipe (our end returned as a stream), and already listed for
    :func:`kill_groups_now`: started directly when the shell would only split the command
    into words and the program can be started, else through ``sh -c``."""
    argv = direct_argv(command)
    if argv is not None:
        try:
            return await _spawn_listed(argv, cwd, _direct_env(cwd), shell=False)
        except OSError:
            pass
    return await _spawn_listed(command, cwd, None, shell=True)


async def _spawn_listed(
    args: str | list[str], cwd: Path, env: dict[str, str] | None, *, shell: bool
) -> tuple[subprocess.Popen[bytes], trio.lowlevel.FdStream]:
    """Start the build's command on a worker thread (a fork can take a while), listed in
    :data:`_commands` on that thread, under :data:`_reaping`, as it is started.

    Why not ``trio.lowlevel.open_process``: it starts the process on a worker thread, and
    the command was listed only once the task ran again on the event loop. A server
    exiting at once meanwhile (a second signal while the build starts; the watchdog)
    found nothing to kill, and the build, in a session of its own, ran on for good (a
    test saw it in about 1 run in 20 on a loaded machine). Under the lock,
    :func:`kill_groups_now` waits for a start under way (a fork: milliseconds), then
    kills that group too.

    Resource handling: the pipe's ends are ours until the process has its copy; the
    child's end is closed here whatever happens, ours on failure."""
    ours, theirs = os.pipe()
    try:
        process = await trio.to_thread.run_sync(_start_listed, args, cwd, env, shell, theirs)
    except BaseException:
        os.close(ours)
        raise
    finally:
        os.close(theirs)
    return process, trio.lowlevel.FdStream(ours)  # (POSIX: made non-blocking)


def _start_listed(
    args: str | list[str], cwd: Path, env: dict[str, str] | None, shell: bool, stdout: int
) -> subprocess.Popen[bytes]:
    """(On a worker thread.) :func:`_spawn_listed`'s start and listing, in one step."""
    with _reaping:
        process = subprocess.Popen(
            args,
            shell=shell,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _commands.add(process.pid)
    return process


def _as_arguments(paths: Sequence[str], root: Path) -> list[str]:
    """``paths`` as a user would type them in ``root`` (for a message's ``--ignore``)."""
    return [shlex.quote(os.path.relpath(path, os.path.realpath(root))) for path in paths]


@attrs.define(eq=False)
class BuildLoop:
    """Owns the comparison base (last good snapshot) and the build/reload cycle."""

    site_dir: Path
    project_root: Path
    broadcaster: Broadcaster
    pending: PendingChanges
    build_cmd: str | None = None
    debounce: float = 0.2
    build_start_delay: float = BUILD_START_DELAY
    #: Seconds a stopped build's processes get between SIGTERM and SIGKILL (what a build
    #: left running: :data:`LEFTOVER_GRACE` at most).
    kill_grace: float = KILL_GRACE
    builds: int = 0
    #: Whether the site lies on a file system that may stop answering (``_mounts.may_hang``,
    #: set by the dev app at start): then even a small site's snapshot takes a thread.
    remote: bool = False
    #: The site directory as named, absolute (nothing resolved).
    _site: str = attrs.field(
        init=False,
        default=attrs.Factory(lambda self: os.path.abspath(self.site_dir), takes_self=True),
    )
    #: The site's thread slots (as the site's requests take: ``StaticSite.in_thread``).
    _site_key: str = attrs.field(
        init=False, default=attrs.Factory(lambda self: site_key(self._site), takes_self=True)
    )
    _last_good: dict[str, FileSig] = attrs.field(factory=dict)
    #: The last build's process group while something it started still runs.
    _leftover: Group | None = None
    #: The loop guard (see :meth:`_guard`): paths changed while the last build ran, how many
    #: builds in a row those alone started and that changed them again, and the paths found
    #: to be the build's own.
    _echo: frozenset[str] = frozenset()
    _echo_builds: int = 0
    _own: set[str] = attrs.field(factory=set)
    #: Paths that changed while a build ran that they did not start (the last build's,
    #: or kept since while they changed during every build): only these can be a build's own.
    _suspects: frozenset[str] = frozenset()

    async def prepare(self) -> None:
        """Snapshot the output as it is before anything runs."""
        # Left to its thread on cancel (a snapshot only reads): on a site that stopped
        # answering (a network mount) it held the server's shutdown until it answered.
        self._last_good = await self._in_thread(take_snapshot, self.site_dir, None)

    async def _in_thread(self, fn: Callable[[*_Args], _T], *args: *_Args) -> _T:
        """``fn(*args)`` in one of the site's threads (``_threads.site_key``, shared with
        the site's requests), abandoned on cancel."""
        return await run_sync_under(self._site_key, fn, *args)

    async def cycle(self, changed: Sequence[str] = ()) -> None:
        """One build (if there is a command) and the reload decision."""
        duration: float | None = None
        if self.build_cmd is not None:
            await self.stop_leftovers()  # the new build supersedes the last one, helpers too
            self.builds += 1
            # Recorded at once (pages served now show the badge, new streams get it), told to
            # open streams only if the build is still running after build_start_delay.
            started = self.broadcaster.publish_status(
                "build_start", command=self.build_cmd, announce=self.build_start_delay <= 0
            )
            log.info("building (%d change(s)): %s", len(changed), self.build_cmd)
            async with trio.open_nursery() as nursery:
                if self.build_start_delay > 0:
                    nursery.start_soon(self._announce_later, started)
                result = await run_build(
                    self.build_cmd, self.project_root, kill_grace=self.kill_grace
                )
                nursery.cancel_scope.cancel()
            await self._guard(frozenset(changed))
            if result.group is not None:
                self._leftover = result.group
                log.warning(
                    "the build left processes running (process group %d); they are stopped "
                    "before the next build and when the server stops",
                    result.group.pgid,
                )
            if not result.ok:
                log.warning(
                    "build failed (exit status %d) in %.2fs: %s\n%s",
                    result.exit_status,
                    result.duration,
                    result.command,
                    result.output,
                )
                self.broadcaster.publish_status(
                    "build_error",
                    command=result.command,
                    exit_status=result.exit_status,
                    output=result.output,
                    duration=result.duration,
                )
                return
            log.info("build ok in %.2fs", result.duration)
            duration = result.duration
        after = None if self.remote else small_snapshot(self.site_dir, self._last_good)
        if after is None:  # a bigger site, big changed files, or a network mount: a thread
            try:
                after = await self._in_thread(take_snapshot, self.site_dir, self._last_good)
            except RootNotAnswering as exc:
                # A site that stopped answering holds every one of its threads. Left to
                # raise, this ended the build loop, DevApp.run and so the whole server
                # (its root nursery). The output is compared at the next build that can
                # read it (the last snapshot is kept): no reload now.
                log.warning("%s: the build's output is compared after the next build", exc)
                after = self._last_good
        decision = decide(self._last_good, after)
        self._last_good = after
        # No await from here on: status and reload reach every subscriber together (in one
        # write each), and a page served after this point carries both.
        ok = None
        if self.build_cmd is not None:
            ok = self.broadcaster.publish_status(
                "build_ok", command=self.build_cmd, duration=duration, announce=decision is None
            )
        if decision is not None:
            action, paths = decision
            event = self.broadcaster.publish_reload(action, paths, status=ok)
            log.info("%s (generation %d): %s", action, event.generation, ", ".join(paths[:5]))

    async def _guard(self, trigger: frozenset[str]) -> None:
        """The loop guard, right after a build's command exited: stop a build that changes
        watched files itself from starting itself for ever.

        Why: a build that writes into the project outside the site directory (a log, a cache
        no default ignore knows) started the next build, which wrote it again, every
        ``debounce`` seconds, for ever. The rule: the changes that came while this build ran
        are read at once (:meth:`PendingChanges.flush`: with inotify the kernel has queued
        them all by now). A build started only by changes that came while the previous one
        ran (an *echo*), during which the same paths changed again, echoes (counting only
        paths also seen changing during a build they did not start, and during every build
        since); after :data:`ECHO_BUILDS` such builds in a row, those paths are the build's
        own: named in the log, once, and from then on their changes during a build are
        dropped. Changes between builds always count (they start a build, and a path of the
        build's own changed between builds is a source again), and any other change during
        a build still gets its one follow-up build.
        """
        await self.pending.flush()
        if self.pending.overflow:
            self._echo, self._echo_builds = frozenset(), 0
            return
        self._own -= trigger - self._echo  # changed between builds: a source after all
        own = self.pending.paths & self._own
        self.pending.discard(own)
        # The output, where the site link leads now: a build that writes each output anew
        # and re-points the link to it (current -> releases/N) is seen writing a new
        # directory each time, which no rule made when the watch started ignores (a
        # review: 20 builds in 4 s, without an edit).
        try:
            output = await self._in_thread(os.path.realpath, self.site_dir)  # (as in prepare)
        except RootNotAnswering as exc:  # (see cycle: it ended the server) the link as named
            log.warning("%s", exc)
            output = self._site
        self.pending.discard(
            [p for p in self.pending.paths if p == output or p.startswith(output + os.sep)]
        )
        during = frozenset(self.pending.paths)
        # A build writes its own files during builds it did not start too (the first one,
        # or one a source started). A user saving a file during each build, each started
        # by the save before, never does that: an echo of those alone was taken for the
        # build's own and the saves were dropped (a review: auto-save with a 1.5 s build).
        self._suspects = (self._suspects & during) | (during - trigger)
        again = trigger & during & self._suspects
        if trigger and trigger <= self._echo and again:
            self._echo_builds += 1
        else:
            self._echo_builds = 0
        if self._echo_builds >= ECHO_BUILDS:
            self._echo_builds = 0
            self._own |= again
            self.pending.discard(again)
            during -= again
            shown = _as_arguments(sorted(again), self.project_root)
            log.warning(
                "the build changes %s itself, so each build starts the next: changes to %s "
                "while a build runs no longer start one (changes between builds still do); "
                "to stop watching %s: %s",
                ", ".join(shown[:5]) + (", ..." if len(shown) > 5 else ""),
                "it" if len(shown) == 1 else "them",
                "it" if len(shown) == 1 else "them",
                " ".join(f"--ignore {name}" for name in shown[:5]),
            )
        self._echo = during

    async def stop_leftovers(self) -> None:
        """Stop what the last build left running (its command has exited, only its process
        group reaches them): before the next build, and at shutdown."""
        if self._leftover is not None:
            group, self._leftover = self._leftover, None
            await stop_group(group, min(LEFTOVER_GRACE, self.kill_grace))

    async def _announce_later(self, started: StatusEvent) -> None:
        await trio.sleep(self.build_start_delay)
        self.broadcaster.announce(started)

    async def run(self) -> None:
        """Forever: wait for changes, let them settle, build once for all of them."""
        while True:
            await self.pending.wait()
            await self.pending.wait_quiet(self.debounce)
            changed, overflow = self.pending.take()
            await self.cycle(sorted(changed) if not overflow else ())
