"""Wiring: the root nursery of ``punie-trio serve``.

::

    signal watcher                       from the start (the store's open included):
    │                                    1st SIGINT/SIGTERM/SIGHUP sets ``closing``, a 2nd
    │                                    exits at once
    root nursery
    ├─ Manager.run()                     worker nursery, one ProjectWorker per root
    ├─ Heartbeat.run()                   with HTTP: pings silent /acp WebSockets, drops dead ones
    ├─ hypercorn.trio.serve(app, shutdown_trigger=closing.wait)
    ├─ stdio ClientConnection.run()      with --stdio
    └─ DevApp.run()                      with --site

Shutdown: ``closing`` is the one event everything watches. Connections cancel their turns
(which answer ``stopReason: "cancelled"``), drain, and close their WebSockets with 1001;
Hypercorn stops accepting and returns once its handlers have; then the root is cancelled. All
of it is bounded by ``shutdown_timeout``. Before the server listens (the dev app's first build
may take minutes), ``closing`` cancels the start-up instead.
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import attrs
import hypercorn.config
import hypercorn.trio
import trio

from ._metrics import store_bytes
from ._paths import store_path
from .hub import ClientConnection, Limits, Manager
from .store import MemoryStore, Store, StoreError, open_sqlite_store
from .transport import NdjsonStream, stdio_stream
from .web import App
from .web import _accept_log as accept_log
from .web import _deflate as deflate
from .web import _fast_send as fast_send
from .web import _h2_buffers as h2_buffers
from .web import _h2_idle as h2_idle
from .web import _h2_late_data as h2_late_data
from .web import _h2_requests as h2_requests
from .web import _handshake as handshake
from .web import _ws_refusals as ws_refusals
from .worker import CONFIG_FILE, DATA_DIRECTORY, Model

log = logging.getLogger("punie_trio.server")


class ServeError(Exception):
    """A startup failure with a message for the user (the CLI prints it and exits 1)."""


@attrs.frozen
class ServeConfig:
    projects: tuple[Path, ...]
    model: Model = attrs.field(eq=False)
    host: str = "127.0.0.1"
    port: int = 8765
    http: bool = True
    stdio: bool = False
    max_message_bytes: int = 16 * 1024 * 1024
    shutdown_timeout: float = 5.0
    limits: Limits = attrs.field(factory=Limits)
    site: Path | None = None
    dev_options: dict[str, Any] = attrs.field(factory=dict)
    data_dir: Path | None = None
    # The config file the settings came from (it may hold the token): no tool may touch it.
    config_path: Path | None = None
    # "sqlite" (DATA_DIR/sessions.sqlite3; needs data_dir) or "memory" (nothing survives).
    store: str = "sqlite"
    # Bearer token required on /acp (and /metrics unless metrics_public); None: no auth.
    token: str | None = None
    allow_origins: tuple[str, ...] = ()
    # Host names accepted besides IP addresses and localhost (a DNS-rebinding guard; the
    # --host name is always accepted).
    allow_hosts: tuple[str, ...] = ()
    metrics_public: bool = False
    handle_signals: bool = True


@attrs.frozen
class Running:
    """What :func:`serve` hands to ``task_status.started``."""

    url: str | None
    manager: Manager
    closing: trio.Event = attrs.field(eq=False)


def _hypercorn_config(config: ServeConfig) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    hc.websocket_max_message_size = config.max_message_bytes
    hc.graceful_timeout = config.shutdown_timeout
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    # No read_timeout: it would kill quiet SSE streams. Heartbeats live in the app, and so
    # does the deadline on a request body that stops coming (web/_http.py, read_body).
    return hc


def find_exception(
    exc: BaseException, match: Callable[[BaseException], bool]
) -> BaseException | None:
    """The first exception in ``exc`` (itself, or a leaf of the exception groups nurseries
    wrap errors in) for which ``match`` holds."""
    if match(exc):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_exception(inner, match)
            if found is not None:
                return found
    return None


_HOST_HINT = "(--host takes an address of this machine or a host name that resolves to one)"
#: Why a bind failed, by errno, as a hint for the user. EADDRNOTAVAIL (an address not on
#: this machine, 192.0.2.1) once got the busy port's hint, "is another punie-trio
#: running?"; EINVAL (``fe80::1%lo``: a zone the address cannot have) was a traceback.
_BIND_HINTS = {
    errno.EADDRINUSE: "(is another punie-trio running? use --port to pick another port, "
    "or --port 0)",
    errno.EACCES: "(ports below 1024 need privileges: use another --port, or --port 0)",
    errno.EADDRNOTAVAIL: _HOST_HINT,
    errno.EINVAL: _HOST_HINT,
}


def _address_unusable(exc: BaseException) -> bool:
    # gaierror: a host name that does not resolve ("Name or service not known").
    return isinstance(exc, socket.gaierror) or (
        isinstance(exc, OSError) and exc.errno in _BIND_HINTS
    )


# After the shutdown timeout, how long cancellation gets before the process exits anyway.
# Two seconds: what is still ending then (a final send's SHUTDOWN_FINAL_SEND, the store's
# close) takes a fraction of that on a quiet machine, but with 1 s a busy one (a CI run
# beside other work) ran a shutdown that ended in time into the watchdog, status 1.
FORCE_EXIT_GRACE = 2.0
# The collector's thresholds once serving (gc.set_threshold): young collections every
# 20,000 net allocations rather than 700 (see _serve).
GC_THRESHOLDS = (20_000, 20, 100)


#: What the watchdog names once serving: a shutdown then waits on the clients' sends.
_SERVING = "a client stopped reading?"


@attrs.define
class _Stage:
    """What the shutdown is doing, for the watchdog's message; and the watchdog, which
    ``serve`` cancels as it returns (a program running ``serve`` in-process lives on)."""

    doing: str = _SERVING
    watchdog: threading.Timer | None = None


#: How long the line said before an immediate exit gets to reach stderr.
LAST_WORDS_SECONDS = 0.5


def _exit_now(message: str) -> NoReturn:
    """Say ``message`` on stderr and exit at once, status 1.

    Why a thread: a stderr nobody reads (an IDE that pipes it and never reads it, which
    ACP allows) is a full pipe, and the print waited on it for good, so neither a second
    signal nor the watchdog could end the process; only SIGKILL did. The line now gets
    :data:`LAST_WORDS_SECONDS`, and the process exits whether it went out or not.

    Where the CLI logs to stderr from a thread of its own, the line goes out through it
    (:func:`_tell`), after the log lines waiting (printed directly, it came before the
    "received SIGINT" line logged a moment earlier, glued to it, or without it).

    The dev app's builds are killed first (``_builder.kill_groups_now``): they run in
    sessions of their own, and one the graceful shutdown had not stopped yet (it gives a
    build 5 s between SIGTERM and SIGKILL) once ran on for good."""
    handlers = [h for h in logging.getLogger().handlers if hasattr(h, "say")]

    def say() -> None:
        if handlers:
            _tell(message)
            for handler in handlers:
                handler.flush()
        elif sys.stderr is not None:  # (None: started without a stderr)
            print(message, file=sys.stderr, flush=True)

    builds = sys.modules.get("punie_trio.web.dev._builder")  # (loaded only with --site)
    if builds is not None:
        # A build the shutdown was still stopping (or one the exit cuts short) must not
        # outlive us: in a session of its own, nothing else would ever stop it.
        builds.kill_groups_now()
    writer = threading.Thread(target=say, name="last words", daemon=True)
    writer.start()
    writer.join(LAST_WORDS_SECONDS)
    os._exit(1)


def _force_exit(timeout: float, stage: _Stage) -> None:
    _exit_now(
        f"punie-trio: shutdown did not finish within {timeout:g} s ({stage.doing}), exiting now"
    )


#: The signals that ask for a graceful shutdown. SIGHUP too: the terminal running ``serve``
#: was closed (its default action killed the process on the spot: no answers, no close
#: frames, the running turns not recorded).
SHUTDOWN_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


async def _watch_signals(
    closing: trio.Event,
    shutdown_timeout: float,
    stage: _Stage,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Turn the first :data:`SHUTDOWN_SIGNALS` signal into ``closing``, a second into an
    exit at once. ``task_status.started`` once the handlers are in place: ``serve``
    waits for that before the store opens, whose start-up check begins on the store's
    thread before the opening task yields (started with ``start_soon``, this watcher
    ran only then, and a signal as the check began met the system's default: the
    process was killed, with no shutdown at all)."""
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            if closing.is_set():
                _exit_now("punie-trio: second signal, exiting now")
            log.warning("received %s, shutting down", signal.Signals(signum).name)
            closing.set()
            # A last resort: stalled socket writes are abandoned during shutdown
            # (web/_fast_send.py), but anything else beyond the reach of cancellation
            # must not keep the process alive either.
            timeout = shutdown_timeout + FORCE_EXIT_GRACE
            stage.watchdog = threading.Timer(timeout, _force_exit, (timeout, stage))
            stage.watchdog.daemon = True
            stage.watchdog.start()


async def serve(
    config: ServeConfig, *, task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the server until ``closing`` is set (by a signal, or by the caller through the
    :class:`Running` handed to ``task_status.started``), then shut down within
    ``config.shutdown_timeout`` seconds.

    With ``config.handle_signals`` the signals are watched from the very start, so one
    that arrives while the store opens or the dev app's first build runs shuts down
    gracefully too: the start-up is abandoned (the build cancelled, its process group
    killed) and ``task_status.started`` gets a :class:`Running` whose ``url`` is None.
    """
    closing = trio.Event()
    stage = _Stage()
    # stdin and stdout are the client's from the start: nothing the start-up does (the
    # store, the dev app's first build, a library's print) may write into the ACP stream.
    stdio = stdio_stream(config.max_message_bytes) if config.stdio else None
    try:
        async with trio.open_nursery() as signals:
            if config.handle_signals:
                # (Started, not start_soon: watched before anything below can take long.)
                await signals.start(_watch_signals, closing, config.shutdown_timeout, stage)
            try:
                stage.doing = "opening the session store"
                async with _open_store(config, closing, signals) as store:
                    stage.doing = _SERVING
                    try:
                        await _serve(config, store, stdio, closing, task_status)
                    finally:
                        # (Outside the shutdown's budget: its WAL is copied into the file.)
                        stage.doing = "closing the session store"
            finally:
                signals.cancel_scope.cancel()
    finally:
        if stage.watchdog is not None:
            stage.watchdog.cancel()
        if stdio is not None:  # (a start-up that failed: the client sees EOF, at once)
            with trio.CancelScope(shield=True):
                await stdio.aclose()


@asynccontextmanager
async def _open_store(
    config: ServeConfig, closing: trio.Event, nursery: trio.Nursery
) -> AsyncIterator[Store]:
    """The session store ``serve`` serves; ``closing`` set while it opens stops the open.

    Why: the open checks a store not closed cleanly whole, 10.4 s for 618 MB from the
    disk, and a SIGINT or SIGTERM then waited for the check: past the shutdown timeout,
    the watchdog ended ``serve`` with status 1, blaming a client. Now the check stops
    (``SqliteStore``'s open, cancelled), and the start-up is abandoned as for a signal
    a moment later: a store that is never used stands in (``_serve`` sees ``closing``
    and serves nothing), and ``serve`` ends cleanly.
    """
    if config.store == "memory" or config.data_dir is None:
        yield MemoryStore()
        return
    async with AsyncExitStack() as stack:
        with trio.CancelScope() as opening:
            nursery.start_soon(_cancel_on, closing, opening)
            try:
                store: Store = await stack.enter_async_context(
                    open_sqlite_store(store_path(config.data_dir))
                )
            except StoreError as exc:
                # Each of its messages names the file and the store ("PATH: cannot open
                # session store: ..."); said again in front, it read "cannot open the
                # session store: PATH: cannot open session store: file is not a database".
                raise ServeError(str(exc)) from None
        if opening.cancelled_caught:
            store = MemoryStore()
        yield store


async def _serve(
    config: ServeConfig,
    store: Store,
    stdio: NdjsonStream | None,
    closing: trio.Event,
    task_status: trio.TaskStatus[Running],
) -> None:
    manager = Manager(
        tuple(str(p) for p in config.projects),
        config.model,
        limits=config.limits,
        closing=closing,
        store=store,
        # (The token, the store and the config are no tool's, even under a project root.)
        private=tuple(
            (str(path), what)
            for path, what in ((config.data_dir, DATA_DIRECTORY), (config.config_path, CONFIG_FILE))
            if path is not None
        ),
    )
    if config.store != "memory" and config.data_dir is not None:
        manager.metrics.track_store(functools.partial(store_bytes, store_path(config.data_dir)))
    dev_app = None
    if config.site is not None:
        from .web.dev import DevApp
        from .web.dev._builder import KILL_GRACE

        dev_app = DevApp(
            site_dir=config.site,
            project_root=config.projects[0],
            closing=closing,
            data_dir=config.data_dir,
            # A build stopped at shutdown gets half of it between SIGTERM and SIGKILL
            # (5 s at most): with the whole 5 s, a build that ignored SIGTERM outlasted a
            # shorter --shutdown-timeout, and the watchdog ended the process, status 1.
            kill_grace=min(KILL_GRACE, config.shutdown_timeout / 2),
            **config.dev_options,
        )
    app = App(
        manager,
        closing,
        fallback=dev_app,
        token=config.token,
        allow_origins=config.allow_origins,
        allow_hosts=(*config.allow_hosts, config.host.lower().rstrip(".")),
        metrics_public=config.metrics_public,
    )
    async with trio.open_nursery() as root:
        url = None
        hypercorn_done = trio.Event()
        stdio_done = trio.Event()
        failed: Exception | None = None
        # Start-up (the dev app's first build may take minutes) gives way to a shutdown.
        with trio.CancelScope() as startup:
            root.start_soon(_cancel_on, closing, startup)
            await root.start(manager.run)
            if stdio is not None:
                # Served from here: the stdio client needs neither the dev app's first
                # build nor the HTTP server, and its initialize once waited for the whole
                # build (minutes, for a real site).
                root.start_soon(_serve_stdio, manager, config, stdio, closing, stdio_done)
            try:
                if dev_app is not None:
                    await root.start(dev_app.run)
                if config.http:
                    await root.start(app.heartbeat.run)
                    url = await _start_http(root, app, config, closing, hypercorn_done)
                    _tell(f"punie-trio listening on {url} (ACP: ws{url[4:]}/acp)")
                else:
                    hypercorn_done.set()
            except Exception as exc:
                if stdio is None:
                    raise
                # The start-up failed (the HTTP port taken, the dev app not started)
                # while the stdio client was served: it is wound down below, as in any
                # shutdown, before the failure ends the server. Raised at once, the
                # failure cut its connection: a turn running was recorded cancelled,
                # but its answer never went out, and the client was left awaiting it.
                failed = exc
                closing.set()
        if startup.cancelled_caught or failed is not None:
            # Interrupted before serving: nothing to wind down but what started (the
            # stdio client, whose answers drain as in any shutdown).
            if failed is None:
                task_status.started(Running(None, manager, closing))
            if stdio is not None:
                with trio.move_on_after(config.shutdown_timeout):
                    await stdio_done.wait()
            root.cancel_scope.cancel()
            if failed is not None:
                raise failed
            return
        if config.handle_signals:
            # The whole process is ours (the CLI): what is alive once serving starts
            # (modules, the app, the store) lives as long as the process. Frozen, the
            # collector no longer walks it: a full collection with 1,000 open SSE streams
            # takes about a quarter less (docs/dev-app.md, Performance).
            gc.freeze()
            # Each young-generation collection walks every object of the requests in flight
            # (about 80 per prompt being answered), so at the default threshold (700
            # allocations) its cost grows with the number of busy clients: at 100 clients
            # it took 5% of the server's CPU. Collected rarely, it costs under 1%; what it
            # frees is a few reference cycles per thousand prompts (performance.md).
            gc.set_threshold(*GC_THRESHOLDS)
        task_status.started(Running(url, manager, closing))
        await closing.wait()
        fast_send.cut_final_sends()  # (the shielded ends of responses may wait no more)
        with trio.move_on_after(config.shutdown_timeout):
            await hypercorn_done.wait()
            if stdio is not None:
                await stdio_done.wait()
        root.cancel_scope.cancel()
    failure = _stdout_failure(stdio)
    if failure is not None and not config.http:
        # The only client's answers were lost: that is the run's outcome (exit 1).
        raise ServeError(failure)


def _tell(line: str) -> None:
    """Print ``line`` for the user on stderr, if stderr takes it.

    Why: an IDE may close its end of the agent's stderr (ACP lets clients ignore it), or
    stderr may be a file on a full disk; the print's error then ended ``serve`` just after
    it started (status 1, not a word anywhere), stdio client and all. The log file says
    why instead.

    Where the CLI logs to stderr from a thread of its own (a root handler with ``say``),
    the line goes out through it, after the log lines logged before it and never in the
    middle of one (printed here, it once came out glued to a log line); that thread logs
    it with the reason if stderr cannot take it."""
    for handler in logging.getLogger().handlers:
        say = getattr(handler, "say", None)
        if say is not None:
            say(line + "\n", told=True)
            return
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError as exc:
        log.warning("cannot write to stderr (%s): %s", exc.strerror or exc, line)


async def _set_after(event: trio.Event, delay: float) -> None:
    await trio.sleep(delay)
    event.set()


async def _cancel_after(scope: trio.CancelScope, delay: float) -> None:
    await trio.sleep(delay)
    scope.cancel()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _start_http(
    root: trio.Nursery, app: App, config: ServeConfig, closing: trio.Event, done: trio.Event
) -> str:
    fast_send.install()
    accept_log.install()
    handshake.install()
    h2_late_data.install()
    h2_requests.install()
    h2_buffers.install()
    h2_idle.install()
    deflate.install(config.max_message_bytes)
    ws_refusals.install()

    async def run_hypercorn(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await hypercorn.trio.serve(
                app,  # type: ignore[arg-type]
                _hypercorn_config(config),
                shutdown_trigger=closing.wait,
                task_status=task_status,
            )
        finally:
            done.set()

    try:
        binds: list[str] = await root.start(run_hypercorn)
    except (OSError, BaseExceptionGroup) as exc:
        busy = find_exception(exc, _address_unusable)
        if not isinstance(busy, OSError):
            raise
        hint = _HOST_HINT if isinstance(busy, socket.gaierror) else _BIND_HINTS[busy.errno or 0]
        raise ServeError(
            f"cannot listen on {config.host}:{config.port}: {busy.strerror or busy} {hint}"
        ) from None
    return binds[0]


async def _serve_stdio(
    manager: Manager,
    config: ServeConfig,
    stream: NdjsonStream,
    closing: trio.Event,
    done: trio.Event,
) -> None:
    """One ACP connection on stdin/stdout. EOF ends only this connection, unless stdio is the
    only transport (``--no-http``), where it ends the server. Its end closes the client's
    pipes (:func:`stdio_stream`): the client reads stdout to its end while the HTTP server
    serves on."""
    conn = ClientConnection(manager, transport="stdio", probeable=False)
    try:
        with trio.CancelScope() as connection:
            async with trio.open_nursery() as timers:
                # The requests read before EOF get shutdown_timeout to be answered; then,
                # if the connection has not ended by itself, the bounded shutdown starts
                # (a client that closed stdin and stopped reading stdout once kept the
                # process alive for good), or with the HTTP server serving on, the
                # connection is ended (it once stayed, its sessions owned and its worker
                # running, until the server stopped).
                conn.on_input_end = (
                    functools.partial(
                        timers.start_soon, _set_after, closing, config.shutdown_timeout
                    )
                    if not config.http
                    else functools.partial(
                        timers.start_soon, _cancel_after, connection, config.shutdown_timeout
                    )
                )
                await conn.run(stream)
                timers.cancel_scope.cancel()
        if connection.cancelled_caught:
            log.warning(
                "the stdio client closed stdin and did not read its answers within %g s; "
                "its connection is ended",
                config.shutdown_timeout,
            )
    finally:
        done.set()
        with trio.CancelScope(shield=True):
            await stream.aclose()
        if not config.http:
            closing.set()
        else:
            failure = _stdout_failure(stream)
            if failure is not None:
                log.error("%s; the stdio connection ended", failure)


#: Write errors that mean the client closed its end of stdout: it is gone, nothing to say.
_CLIENT_GONE = (errno.EPIPE, errno.ECONNRESET)


def _stdout_failure(stream: NdjsonStream | None) -> str | None:
    """Why writing stdout failed, for the user (a full disk, an I/O error); None if it did
    not, or only because the client closed its end. Such a failure ended the stdio
    connection without a word, and ``--no-http`` exited 0 with every answer lost."""
    failure = None if stream is None else stream.send_failure
    if failure is None or failure.errno in _CLIENT_GONE:
        return None
    return f"cannot write to stdout: {failure.strerror or failure}"
