"""The ``punie-trio`` command line.

Exit statuses: 0 success, 1 runtime failure (port busy, ...), 2 bad usage or bad input files.
stdout belongs to ACP under ``--stdio``: every human-readable line goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import logging
import logging.handlers
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from ._cli_sessions import _printable
from ._cli_sessions import add_commands as add_session_commands
from ._config import (
    BY_NAME,
    LOG_LEVELS,
    STORES,
    ConfigError,
    _choice,
    _to_host,
    _to_host_name,
    _to_nonempty,
    _to_origin,
    _to_path,
    _to_port,
    _to_positive_int,
    _to_seconds,
    _to_token,
    as_flag,
    load_file,
    misspelt_env,
    named_config,
    readable_token_warning,
    resolve_with_sources,
)
from ._json import is_name_text
from ._paths import (
    DataDirInUse,
    closed_marker,
    config_path,
    create_private,
    default_data_dir,
    ensure_data_dir,
    file_kind,
    lock_data_dir,
    remove_leftover_temporaries,
    resolve_path,
    store_path,
    token_path,
)
from ._version import __version__
from .hub import Limits
from .server import Running, ServeConfig, ServeError, find_exception, serve
from .web._auth import write_token_file
from .worker import Model, ScriptError, model_from_spec

# Each flag is checked by its option's rule (as_flag), so that it is said alike from the
# flag, $PUNIE_* and the file (cli.py once had its own _port and _positive_int, which said
# "must be a port number 0-65535, got '-1'" where $PUNIE_PORT said "must be from 0 to
# 65535, got -1"); argparse's own message for a ValueError would name the function.
_positive_int = as_flag(_to_positive_int)
_port = as_flag(_to_port)
_seconds = as_flag(_to_seconds)  # a number >= 0 (not nan)
_host = as_flag(_to_host)  # not empty (that would bind every interface), no spaces around
_token = as_flag(_to_token)  # not empty (that once meant a generated one), no spaces around
_origin = as_flag(_to_origin)  # scheme://host[:port], as an Origin header carries it
_host_name = as_flag(_to_host_name)  # a name, .domain or *, without scheme or port
_path = as_flag(_to_path)  # not empty (Path("") is the current directory: nobody chose it)
_command = as_flag(_to_nonempty)  # not empty (an empty --build ran nothing, without a word)
_glob = as_flag(_to_nonempty)  # not empty (an empty --ignore ignored nothing, without a word)
# Any case, like the file and $PUNIE_LOG_LEVEL; refused in their words, not argparse's
# "invalid choice: 'loud' (choose from 'debug', ...)". (``choices`` stays, for the help.)
_log_level = as_flag(_choice(*LOG_LEVELS, fold_case=True))
_store = as_flag(_choice(*STORES))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="punie-trio",
        description="Serve AI coding agents to IDEs over the Agent Client Protocol.",
    )
    parser.add_argument("--version", action="version", version=f"punie-trio {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    s = commands.add_parser(
        "serve",
        help="run the server (ACP over WebSocket at /acp, optionally stdio; dev app with --site)",
        description="Run the punie-trio server. Every option can also come from $PUNIE_<NAME> "
        "or the TOML config file; precedence: flags > env > file > defaults "
        "(docs/configuration.md).",
    )
    s.add_argument(
        "--config",
        type=_path,
        metavar="FILE",
        help="TOML config file (default: $PUNIE_CONFIG, else the platform's, if it exists)",
    )
    s.add_argument("--host", type=_host, help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=_port, help="port (default 8765; 0 picks a free one)")
    s.add_argument(
        "--stdio",
        action="store_true",
        default=None,
        help="also serve one ACP connection on stdin/stdout",
    )
    s.add_argument(
        "--no-http",
        action="store_true",
        default=None,
        help="do not start the HTTP server (with --stdio: a pure stdio agent that exits at EOF)",
    )
    s.add_argument(
        "--project",
        action="append",
        type=_path,
        metavar="DIR",
        help="a project root sessions may use (repeatable; default: the current directory)",
    )
    s.add_argument("--model", help="model backend: echo (default), echo:N or script:PATH")
    s.add_argument(
        "--log-level",
        type=_log_level,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"stderr log level: {', '.join(LOG_LEVELS)} (default warning)",
    )
    s.add_argument(
        "--data-dir",
        type=_path,
        metavar="DIR",
        help="data directory (default: $PUNIE_DATA_DIR, else the config file's data-dir, else "
        "the platform's)",
    )
    s.add_argument("--store", type=_store, choices=STORES, help="session store (default sqlite)")
    auth = s.add_argument_group("security")
    auth.add_argument(
        "--token",
        type=_token,
        help="bearer token for /acp (default: generated into DATA_DIR/token)",
    )
    auth.add_argument(
        "--allow-origin",
        action="append",
        type=_origin,
        metavar="ORIGIN",
        help="browser Origin allowed on /acp (repeatable)",
    )
    auth.add_argument(
        "--allow-host",
        action="append",
        type=_host_name,
        metavar="HOST",
        help="host name the server may be reached by besides IP addresses and localhost; "
        ".example.com admits its subdomains, * every name (repeatable)",
    )
    auth.add_argument(
        "--metrics-public",
        action="store_true",
        default=None,
        help="serve /metrics without the token",
    )
    limits = s.add_argument_group("limits")
    limits.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        metavar="N",
        help="largest JSON-RPC message (default 16 MiB; WebSocket closes with 1009)",
    )
    limits.add_argument(
        "--max-prompt-bytes",
        type=_positive_int,
        metavar="N",
        help="largest prompt in UTF-8 bytes (default 1 MiB)",
    )
    limits.add_argument(
        "--max-sessions-per-connection",
        type=_positive_int,
        metavar="N",
        help="live sessions per connection (default 64)",
    )
    limits.add_argument(
        "--max-connections",
        type=_positive_int,
        metavar="N",
        help="ACP connections in total (default 256)",
    )
    limits.add_argument(
        "--prompts-per-minute", type=_positive_int, metavar="N", help="per connection (default 120)"
    )
    limits.add_argument(
        "--tool-calls-per-minute", type=_positive_int, metavar="N", help="per session (default 240)"
    )
    limits.add_argument(
        "--outbox-limit",
        type=_positive_int,
        metavar="N",
        help="queued messages per connection (default 256)",
    )
    limits.add_argument(
        "--outbox-bytes",
        type=_positive_int,
        metavar="N",
        help="bytes of queued messages per connection (default 1048576: 1 MiB)",
    )
    limits.add_argument(
        "--grace-seconds",
        type=_seconds,
        metavar="SECONDS",
        help="how long a disconnected client's sessions wait for it to reconnect (default 300)",
    )
    limits.add_argument(
        "--detached-buffer",
        type=_positive_int,
        metavar="N",
        help="updates kept per session while its client is away (default 1024)",
    )
    limits.add_argument(
        "--detached-bytes",
        type=_positive_int,
        metavar="N",
        help="bytes of updates kept per session while its client is away (default 4194304: 4 MiB)",
    )
    limits.add_argument(
        "--client-call-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="seconds a client gets to answer the server's requests (fs/*) before the tool "
        "call fails (default 300)",
    )
    limits.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="seconds a graceful shutdown may take (default 5)",
    )
    dev = s.add_argument_group("dev app (site preview with live reload)")
    dev.add_argument("--site", type=_path, metavar="DIR", help="serve DIR (built output) at /")
    dev.add_argument(
        "--build", type=_command, metavar="CMD", help="build command, run at start and on changes"
    )
    dev.add_argument(
        "--watch", action="append", type=_path, metavar="PATH", help="watch PATH (repeatable)"
    )
    dev.add_argument(
        "--ignore", action="append", type=_glob, metavar="GLOB", help="ignore GLOB (repeatable)"
    )
    dev.add_argument(
        "--no-watch", action="store_true", default=None, help="do not watch for changes"
    )
    dev.add_argument(
        "--debounce",
        type=_seconds,
        metavar="SECONDS",
        help="quiet period after a change before building or reloading (default 0.2; 0: none)",
    )
    dev.add_argument(
        "--open", action="store_true", default=None, help="open the browser once the site answers"
    )
    s.set_defaults(func=_run_serve)

    add_session_commands(commands)
    return parser


#: A log message longer than this is cut (its traceback, if any, is not).
LOG_MESSAGE_CHARS = 2000


class _ClippingFormatter(logging.Formatter):
    """Cuts a long message: a line may quote what a client sent (a method name, a request
    id), and 20 answers with a 1 MiB id once wrote 21 MB to stderr."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if len(message) > LOG_MESSAGE_CHARS:
            record.message = f"{message[:LOG_MESSAGE_CHARS]}... ({len(message):,} characters)"
        return super().formatMessage(record)


log = logging.getLogger(__name__)


class _StderrHandler(logging.Handler):
    """Logs to stderr from a thread of its own, never from the server's.

    Why: ACP clients MAY ignore an agent's stderr, and an IDE that pipes it and never reads
    it fills the pipe; a ``StreamHandler``'s next write then blocked the Trio thread, and
    the whole server stopped (no request read or answered again, over stdio or WebSocket).
    Resource handling: at most :attr:`limit` bytes of lines wait for stderr; a line that
    does not fit is dropped, and once stderr takes lines again one more says how many
    were. The thread writes to its own copy of fd 2 (``os.write``, no Python stream lock
    held while it waits), so the process can exit while it is stuck; at exit,
    :meth:`flush` gives the lines waiting :data:`STDERR_FLUSH_SECONDS` to go out.
    """

    limit = 256 * 1024

    def __init__(self, level: str) -> None:
        super().__init__(level)
        # None: started without a stderr (``2>&-``). Descriptor 2 then belongs to the next
        # file opened (the data directory's lock), which must not get the log lines.
        self._fd = None if sys.__stderr__ is None else os.dup(2)
        self._encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
        self._changed = threading.Condition()
        self._waiting: list[str] = []
        self._waiting_bytes = 0
        self._writing = False
        self._dropped = 0
        self._closing = False
        self._told: list[str] = []
        self._flush_deadline: float | None = None
        self._thread = threading.Thread(target=self._write_all, name="stderr log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self.say(line)

    def say(self, line: str, *, told: bool = False) -> None:
        """Queue ``line`` (ending in a newline) for stderr as it is, whatever the level: what
        the process says on stderr besides log records (the log file's trouble, the
        "listening on" line), from any thread, without waiting on stderr.

        Why through here: written directly, such a line went out before the log lines
        still waiting, or in the middle of one (``print`` writes the line and its newline
        apart): the listening line came out as ``... (ACP: ws://HOST:PORT/acp)2026-...
        INFO hypercorn.error: Running on ...``. ``told``: a line for the user (the
        listening line), never dropped, and if stderr cannot take it, it is logged with
        the reason (the log file then has it)."""
        with self._changed:
            if self._fd is None or self._closing:
                if told:
                    log.warning("no stderr to write to: %s", line.rstrip("\n"))
                return
            if not told and self._waiting_bytes + len(line) > self.limit:
                self._dropped += 1
                return
            if told:
                self._told.append(line)
            self._waiting.append(line)
            self._waiting_bytes += len(line)
            self._changed.notify_all()

    def _write_all(self) -> None:
        while True:
            with self._changed:
                self._writing = False
                self._changed.notify_all()
                self._changed.wait_for(
                    lambda: bool(self._waiting or self._dropped or self._closing)
                )
                if self._closing and not (self._waiting or self._dropped):
                    # (Closed here, by the one thread that writes to it: never while a
                    # write is under way, into a file that got the number meanwhile.)
                    if self._fd is not None:
                        os.close(self._fd)
                        self._fd = None
                    return
                text, dropped, told = "".join(self._waiting), self._dropped, self._told
                self._waiting, self._waiting_bytes, self._dropped = [], 0, 0
                self._told = []
                self._writing = True
            if dropped:  # (dropped after the lines that were waiting: said after them)
                text += f"punie-trio: {dropped} log lines dropped: stderr was not read\n"
            data = text.encode(self._encoding, "backslashreplace")
            assert self._fd is not None  # (nothing is queued without one)
            try:
                while data:
                    try:
                        data = data[os.write(self._fd, data) :]
                    except BlockingIOError:
                        # stderr shares its file description with the ACP stdin or
                        # stdout (a terminal, ``2>&1``), which the server put in
                        # non-blocking mode: wait until it takes more.
                        select.select([], [self._fd], [])
            except OSError as exc:
                # (stderr is gone: nowhere to say so, but for the lines told the user.)
                for line in told:
                    log.warning("cannot write to stderr (%s): %s", exc.strerror or exc, line[:-1])

    def flush(self) -> None:
        # One budget for all the flushes at the end (the CLI's error line, then the exit's):
        # a stderr nobody reads costs STDERR_FLUSH_SECONDS once, not once each.
        if self._flush_deadline is None:
            self._flush_deadline = time.monotonic() + STDERR_FLUSH_SECONDS
        with self._changed:
            self._changed.wait_for(
                lambda: not (self._waiting or self._dropped or self._writing),
                timeout=max(0.0, self._flush_deadline - time.monotonic()),
            )

    def close(self) -> None:
        """Stop taking lines; the thread writes those waiting, then closes its copy of fd 2
        and ends (a handler replaced by a second :func:`_setup_logging` in one process
        kept its thread and descriptor)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        super().close()


#: How long the log lines waiting for stderr get at exit (a reader that stopped reading
#: must not keep the process alive).
STDERR_FLUSH_SECONDS = 2.0


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A ``RotatingFileHandler`` whose new files are readable only by the user (0600): a log
    line may quote a client's prompt. (Rotation renames files, so the backups keep it.)

    Error handling: a write that fails (a full disk) prints one line to stderr, not
    logging's "--- Logging error ---" and a traceback for every record; the lines are
    dropped until a write succeeds again, which is said too."""

    _failing = False
    _erred = False
    #: Where its trouble is said: the stderr log handler's queue. Without one (a handler
    #: of its own, in a test), ``sys.stderr``.
    stderr: _StderrHandler | None = None

    def _say(self, line: str) -> None:
        # Why not sys.stderr from here: this runs in the server's thread, and a stderr
        # nobody reads (which ACP allows) blocked it for good at the first failed write.
        if self.stderr is not None:
            self.stderr.say(line)
        else:
            sys.stderr.write(line)

    def _open(self) -> Any:
        path = Path(self.baseFilename)
        create_private(path)
        # A FIFO there made serve wait at start for ever, for a reader; a device is no log.
        with contextlib.suppress(FileNotFoundError):
            mode = path.stat().st_mode
            if not stat.S_ISREG(mode):
                why = f"it is not a regular file ({file_kind(mode)})"
                raise OSError(errno.EINVAL, why, str(path))
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        self._erred = False
        super().emit(record)
        if self._failing and not self._erred:
            self._failing = False
            self._say(f"punie-trio: writing {self.baseFilename} again\n")

    def handleError(self, record: logging.LogRecord) -> None:
        why = sys.exc_info()[1]
        if not isinstance(why, OSError):  # a bad log call: logging's own report
            self._erred = True  # (nor is it a write that succeeded)
            super().handleError(record)
            return
        self._erred = True
        if not self._failing:
            self._failing = True
            self._say(
                f"punie-trio: cannot write {self.baseFilename} ({why}); "
                "its lines are dropped until it can\n"
            )


def _setup_logging(level: str, data_dir: Path | None) -> None:
    """Log to stderr and (with a data dir) to ``punie-trio.log``.

    Error handling: a log line may quote a client's text, and a lone surrogate (valid in
    JSON) cannot be encoded: both streams write it as ``\\udXXX`` (stderr set up so by
    :func:`main`) instead of printing "--- Logging error ---" with a traceback. A long
    message is cut (:class:`_ClippingFormatter`)."""
    root = logging.getLogger()
    # Set up a second time in one process (a program running ``main`` twice): the first
    # set-up's handlers go, closed (each line went out twice, and each stderr handler's
    # thread and copy of fd 2 stayed for good).
    for old in list(root.handlers):
        if isinstance(old, (_StderrHandler, _PrivateRotatingFileHandler)):
            root.removeHandler(old)
            old.close()
    root.setLevel(logging.DEBUG)
    # hpack (HTTP/2's header coding) logs every header it decodes, and each raw header
    # block, at DEBUG: with --log-level debug, every `authorization: Bearer TOKEN` and
    # `:path /acp?token=TOKEN` an HTTP/2 client sent went to stderr and the log file.
    # Nothing of it is of use for debugging the server, so it stays at INFO and above.
    logging.getLogger("hpack").setLevel(logging.INFO)
    formatter = _ClippingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stderr = _StderrHandler(level.upper())
    stderr.setFormatter(formatter)
    root.addHandler(stderr)
    if data_dir is not None:
        file_handler = _PrivateRotatingFileHandler(
            data_dir / "punie-trio.log",
            maxBytes=5 * 1024 * 1024,
            backupCount=2,
            encoding="utf-8",
            errors="backslashreplace",
        )
        file_handler.setLevel(min(logging.INFO, logging.getLevelName(level.upper())))
        file_handler.setFormatter(formatter)
        file_handler.stderr = stderr
        root.addHandler(file_handler)


def _warn(message: str) -> None:
    # Escaped (_printable), as _error: a warning quotes values (a config file's path).
    print(f"punie-trio: warning: {_printable(message)}", file=sys.stderr)


def _error(message: str, status: int) -> int:
    # Escaped (_printable): a message quotes values (a site, a script path, a data
    # directory, a host), and one with an escape sequence, from a config file given by
    # --config say, went to the terminal raw and could clear the screen or retitle the
    # window (only a project was escaped).
    _stderr_log_written()
    print(f"punie-trio: error: {_printable(message)}", file=sys.stderr)
    return status


def _stderr_log_written() -> None:
    """Wait (at most :data:`STDERR_FLUSH_SECONDS`, as the exit would) for the log lines
    that wait for stderr. Why: a line printed directly after ``serve`` returned (its
    error) came before the log lines logged earlier, or in the middle of one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _StderrHandler):
            handler.flush()


def _settings(
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, str | None], dict[str, Any]]:
    """The resolved options, where each came from (``resolve_with_sources``), and the
    config file's values."""
    config_file = config_path(args.config)
    file_values = load_file(config_file, required=args.config is not None)
    flags = {name: getattr(args, name, None) for name in BY_NAME}
    o, sources = resolve_with_sources(flags, file_values, os.environ, str(config_file))
    return o, sources, file_values


def _bad_value(sources: dict[str, str | None], name: str, problem: str) -> int:
    """Exit 2 with ``problem`` (about option ``name``, checked after the merge), named by
    the place its value came from: ``$PUNIE_PROJECT: project /x: not a directory``, not
    the flag nobody gave. A flag's problem is said as is (it names the flag)."""
    source = sources.get(name)
    # (Told by being the flag: a config file's name may start with "--" too.)
    if source is None or source == BY_NAME[name].flag:
        return _error(problem, 2)
    return _error(f"{source}: {problem}", 2)


def _named(sources: dict[str, str | None], name: str) -> str:
    """How a message names option ``name``: its flag if the flag set it, else its name."""
    flag = BY_NAME[name].flag
    return flag if sources.get(name) == flag else name.replace("_", "-")


#: The dev app's options besides ``site``: without a site there is no dev app to use them.
DEV_APP_OPTIONS = ("build", "watch", "ignore", "no_watch", "debounce", "open")


def dev_options(o: dict[str, Any]) -> dict[str, Any]:
    """The DevApp's keyword arguments from resolved settings."""
    options: dict[str, Any] = {"no_watch": o["no_watch"], "debounce": o["debounce"]}
    if o["build"]:
        options["build_cmd"] = o["build"]
    if o["watch"]:
        options["watch"] = tuple(p.resolve() for p in o["watch"])
    if o["ignore"]:
        options["ignore"] = tuple(o["ignore"])
    return options


def site_path(site: Path) -> Path:
    """``--site`` made absolute, but a symlink it names is kept, not resolved.

    Why: a build that re-points a link to its new output each time (``nix build``'s
    ``./result``, a ``current -> releases/N``) must be served from the link's current
    target; resolved once here, the output of the start stayed served for ever, while
    reload events still went out (an audit). The directories above it are resolved.
    """
    site = site.expanduser()
    if site.name in ("", ".", ".."):
        return site.resolve()
    return site.parent.resolve() / site.name


def _project_root(given: Path) -> tuple[Path, str | None]:
    """``given`` resolved (``~``, symlinks, ``..``), and what keeps it from being served
    (None: nothing).

    Why: a path that cannot be resolved (a symlink loop, a name too long, a NUL from the
    config file) was a traceback, and a path that is not UTF-8 was served although no
    client can name it: a session's ``cwd`` is JSON text, so every ``session/new`` was
    refused as outside the project roots."""
    try:
        project = resolve_path(given.expanduser())
        is_dir = project.is_dir()
    except (OSError, RuntimeError, ValueError) as exc:  # (3.11: a loop is a RuntimeError)
        return given, f"cannot be resolved: {exc}"
    if not is_dir:
        return project, "not a directory"
    if not is_name_text(str(project)):
        return project, (
            "its path is not UTF-8, so no client could name it as a session's cwd "
            "(JSON text is UTF-8): rename it"
        )
    return project, None


def _run_serve(args: argparse.Namespace) -> int:
    try:
        args.config = named_config(args.config, os.environ)  # (--config, else $PUNIE_CONFIG)
        o, sources, file_values = _settings(args)
    except ConfigError as exc:
        return _error(str(exc), 2)
    warning = readable_token_warning(config_path(args.config), file_values, sources["token"])
    if warning is not None:
        _warn(warning)
    for warning in misspelt_env(os.environ):
        _warn(warning)
    if o["no_http"] and not o["stdio"]:
        flag = _named(sources, "no_http") == "--no-http"
        needs = "--no-http needs --stdio" if flag else "no-http needs stdio"
        return _bad_value(sources, "no_http", f"{needs} (there would be nothing to serve)")
    if o["max_prompt_bytes"] >= o["max_message_bytes"]:
        # A prompt goes in one message, and its message is larger still (the envelope, JSON
        # escapes): at or past the message bound no prompt would ever get the prompt
        # limit's -32602, which leaves the connection as it was. A WebSocket would be
        # closed with 1009 instead, and with it the turns of the connection's other
        # sessions (for a client without a client id). Blamed on the prompt limit if it
        # was set, else on the message bound that was lowered under it.
        blamed = "max_prompt_bytes" if sources.get("max_prompt_bytes") else "max_message_bytes"
        return _bad_value(
            sources,
            blamed,
            f"{_named(sources, 'max_prompt_bytes')} ({o['max_prompt_bytes']}) must be less "
            f"than {_named(sources, 'max_message_bytes')} ({o['max_message_bytes']}): a "
            "prompt goes in one message, and a message over that bound ends a WebSocket "
            "(1009) before its prompt is read, so the prompt limit would never apply",
        )
    if o["stdio"]:
        # Python makes sys.stdin/sys.stdout None when fd 0/1 were closed at its start
        # (``<&-``, ``>&-``). The next file opened then takes the descriptor: the server read
        # its own lock file as requests, or wrote ACP into a file of the data directory.
        for name, stream in (("stdin", sys.stdin), ("stdout", sys.stdout)):
            if stream is None:
                return _bad_value(
                    sources,
                    "stdio",
                    f"--stdio needs an open {name} (the client's pipe), and {name} is closed",
                )
    projects: list[Path] = []
    for given in o["project"] or [Path.cwd()]:
        project, problem = _project_root(given)
        if problem is not None:
            # (a NUL shown as an escape by _error, an undecodable byte by stderr's backslashreplace)
            return _bad_value(
                sources, "project", f"{_named(sources, 'project')} {project}: {problem}"
            )
        if project not in projects:  # (P and P/, or P through a link: one root, said once)
            projects.append(project)
    site = site_path(o["site"]) if o["site"] else None
    if site is not None and not site.is_dir():
        return _bad_value(sources, "site", f"{_named(sources, 'site')} {site}: not a directory")
    if site is None:
        # Without a site these did nothing, without a word: a --build never ran, --open
        # opened nothing. A flag is a mistake on this command line; a value from the
        # environment or the file may be a preference kept for the runs with a site. (A
        # flag whatever its value: `--debounce 0.2`, the default's, was let through.)
        for name in DEV_APP_OPTIONS:
            source = sources[name]
            if source is not None and source == BY_NAME[name].flag:
                return _error(f"{source} needs --site (it is the dev app's)", 2)
            if source is None or o[name] == BY_NAME[name].default:
                continue
            key = name.replace("_", "-")
            _warn(f"{source}: {key} does nothing without site (it is the dev app's)")
    try:
        model = model_from_spec(o["model"])
    except (ScriptError, ValueError) as exc:
        return _bad_value(sources, "model", str(exc))
    data_dir = (o["data_dir"] or default_data_dir()).expanduser()
    try:
        ensure_data_dir(data_dir)
    except FileExistsError:  # (mkdir's "File exists" for a file there read as nonsense)
        return _error(f"cannot use data directory {data_dir}: it is not a directory", 1)
    except OSError as exc:
        return _error(f"cannot use data directory {data_dir}: {exc.strerror or exc}", 1)
    try:
        lock = lock_data_dir(data_dir)
    except DataDirInUse as exc:
        who = f" (pid {exc.pid})" if exc.pid else ""
        return _error(
            f"another punie-trio serve{who} is using the data directory {data_dir}: stop "
            "it, or give this one its own --data-dir",
            1,
        )
    except OSError as exc:
        path = data_dir / "serve.lock"
        return _error(f"cannot lock the data directory ({path}): {exc.strerror or exc}", 1)
    try:
        config_file = config_path(args.config)
        return _serve_locked(o, tuple(projects), site, model, data_dir, config_file)
    finally:
        if lock is not None:
            os.close(lock)


def _serve_locked(
    o: dict[str, Any],
    projects: tuple[Path, ...],
    site: Path | None,
    model: Model,
    data_dir: Path,
    config_path: Path,
) -> int:
    """The rest of ``serve``, with the data directory claimed (``lock_data_dir``)."""
    path = token_path(data_dir)
    # A start killed while it wrote the token left its temporary file (holding a token),
    # and one killed while it closed the store, the marker's.
    remove_leftover_temporaries(data_dir, [path.name, closed_marker(store_path(data_dir)).name])
    if o["token"]:
        # A configured token is not written down; one generated by an earlier start
        # would only mislead `punie-trio token` (the server would refuse it).
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            # (Not "cannot write": nothing is written with a configured token.)
            why = exc.strerror or exc
            return _error(
                f"cannot remove the token file an earlier start generated, {path}: {why}", 1
            )
        token = o["token"]
    else:
        try:
            token = write_token_file(path)
        except OSError as exc:
            return _error(f"cannot write the token file {path}: {exc.strerror or exc}", 1)
    try:
        _setup_logging(o["log_level"], data_dir)
    except OSError as exc:
        path = data_dir / "punie-trio.log"
        return _error(f"cannot write the log file {path}: {exc.strerror or exc}", 1)
    config = ServeConfig(
        projects=projects,
        model=model,
        host=o["host"],
        port=o["port"],
        http=not o["no_http"],
        stdio=o["stdio"],
        max_message_bytes=o["max_message_bytes"],
        shutdown_timeout=o["shutdown_timeout"],
        limits=Limits(
            max_prompt_bytes=o["max_prompt_bytes"],
            max_sessions_per_connection=o["max_sessions_per_connection"],
            max_connections=o["max_connections"],
            prompts_per_minute=o["prompts_per_minute"],
            tool_calls_per_minute=o["tool_calls_per_minute"],
            outbox_limit=o["outbox_limit"],
            outbox_bytes=o["outbox_bytes"],
            grace_seconds=o["grace_seconds"],
            detached_buffer=o["detached_buffer"],
            detached_bytes=o["detached_bytes"],
            client_call_timeout=o["client_call_timeout"],
        ),
        site=site,
        dev_options=dev_options(o),
        data_dir=data_dir,
        config_path=config_path,
        store=o["store"],
        token=token,
        allow_origins=tuple(o["allow_origin"]),
        allow_hosts=tuple(o["allow_host"]),
        metrics_public=o["metrics_public"],
    )
    try:
        trio.run(_serve_main, config, o["open"])
    except (ServeError, BaseExceptionGroup) as exc:
        failure = find_exception(exc, lambda e: isinstance(e, ServeError))
        if failure is None:
            if isinstance(exc, BaseExceptionGroup):
                interrupted, rest = exc.split(KeyboardInterrupt)
                if interrupted is not None and rest is None:
                    # A Ctrl-C before serve watches its signals (as it starts) or after
                    # (as it ends) is Python's KeyboardInterrupt, raised in whatever task
                    # runs, so it comes out of serve's nurseries in a group: taken for a
                    # failure, it was a traceback and status 1. It is an interrupt (130).
                    raise KeyboardInterrupt from None
            raise
        return _error(str(failure), 1)
    return 0


async def _serve_main(config: ServeConfig, open_browser: bool) -> None:
    """``serve``, and with ``--open`` the browser opened beside it, which ends with it.

    Why the browser's task is cancelled once ``serve`` returns: ``webbrowser.open`` may wait
    for the browser to exit (``$BROWSER``, a console browser), and the process waited for
    it after its shutdown, until the user closed the browser."""
    async with trio.open_nursery() as nursery:
        running = await nursery.start(_serve_then_stop, config, nursery.cancel_scope)
        if open_browser and running.url is not None and config.site is not None:
            from .web.dev import open_browser_when_ready

            nursery.start_soon(open_browser_when_ready, running.url + "/")


async def _serve_then_stop(
    config: ServeConfig,
    others: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``serve``, then cancel ``others`` (what runs beside it: the browser's opening)."""
    await serve(config, task_status=task_status)
    others.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; its exit status.

    Error handling: text the commands print can hold what a terminal's encoding cannot
    (a lone surrogate from a client, any non-ASCII under ``LC_ALL=C`` or
    ``PYTHONIOENCODING=ascii``): it is written escaped (``\\u...``) rather than failing
    half-way. A reader that closes the pipe early (``| head -1``) ends the command quietly
    with status 1, as Python's documentation recommends, not with a traceback.
    """
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status: int = args.func(args)
        if sys.stdout is not None:  # (None: started with stdout closed, ``>&-``)
            sys.stdout.flush()
    except KeyboardInterrupt:
        # Ctrl-C before ``serve`` watches its signals (it then shuts down gracefully, exit
        # 0), or during a read-only command: no traceback.
        print("punie-trio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Nothing more can be written; keep the interpreter's final flush from failing too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status
