"""The ``punie-trio`` command line.

Exit statuses: 0 success, 1 runtime failure (port busy, ...), 2 bad usage or bad input files.
stdout belongs to ACP under ``--stdio``: every human-readable line goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from ._cli_sessions import add_commands as add_session_commands
from ._paths import default_data_dir, ensure_data_dir
from ._version import __version__
from .hub import Limits
from .server import ServeConfig, ServeError, serve
from .worker import ScriptError, model_from_spec

LOG_LEVELS = ("debug", "info", "warning", "error")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


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
        description="Run the punie-trio server. See docs/cli.md.",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument(
        "--port", type=_port, default=8765, help="port (default 8765; 0 picks a free one)"
    )
    s.add_argument(
        "--stdio", action="store_true", help="also serve one ACP connection on stdin/stdout"
    )
    s.add_argument(
        "--no-http",
        action="store_true",
        help="do not start the HTTP server (with --stdio: a pure stdio agent that exits at EOF)",
    )
    s.add_argument(
        "--project",
        action="append",
        type=Path,
        metavar="DIR",
        help="a project root sessions may use (repeatable; default: the current directory)",
    )
    s.add_argument("--model", default="echo", help="model backend: echo (default) or script:PATH")
    s.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="stderr log level")
    s.add_argument(
        "--data-dir", type=Path, help="data directory (default: $PUNIE_DATA_DIR or the platform's)"
    )
    s.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        default=16 * 1024 * 1024,
        help="largest JSON-RPC message accepted (default 16 MiB; WebSocket closes with 1009)",
    )
    s.add_argument("--max-prompt-bytes", type=_positive_int, default=1024 * 1024)
    s.add_argument("--max-sessions-per-connection", type=_positive_int, default=64)
    s.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=5.0,
        help="seconds a graceful shutdown may take (default 5)",
    )
    dev = s.add_argument_group("dev app (site preview with live reload)")
    dev.add_argument("--site", type=Path, metavar="DIR", help="serve DIR (built output) at /")
    dev.add_argument("--build", metavar="CMD", help="build command, run at start and on changes")
    dev.add_argument(
        "--watch", action="append", type=Path, metavar="PATH", help="watch PATH (repeatable)"
    )
    dev.add_argument("--ignore", action="append", metavar="GLOB", help="ignore GLOB (repeatable)")
    dev.add_argument("--no-watch", action="store_true", help="do not watch for changes")
    dev.add_argument("--open", action="store_true", help="open the browser once the site answers")
    s.set_defaults(func=_run_serve)

    add_session_commands(commands)
    return parser


def _setup_logging(level: str, data_dir: Path | None) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(level.upper())
    stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(stderr)
    if data_dir is not None:
        file_handler = logging.handlers.RotatingFileHandler(
            data_dir / "punie-trio.log", maxBytes=5 * 1024 * 1024, backupCount=2, encoding="utf-8"
        )
        file_handler.setLevel(min(logging.INFO, logging.getLevelName(level.upper())))
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        root.addHandler(file_handler)


def _error(message: str, status: int) -> int:
    print(f"punie-trio: error: {message}", file=sys.stderr)
    return status


def _run_serve(args: argparse.Namespace) -> int:
    if args.no_http and not args.stdio:
        return _error("--no-http needs --stdio (there would be nothing to serve)", 2)
    projects = tuple(p.expanduser().resolve() for p in (args.project or [Path.cwd()]))
    for project in projects:
        if not project.is_dir():
            return _error(f"--project {project}: not a directory", 2)
    if args.site is not None and not args.site.expanduser().is_dir():
        return _error(f"--site {args.site}: not a directory", 2)
    try:
        model = model_from_spec(args.model)
    except (ScriptError, ValueError) as exc:
        return _error(str(exc), 2)
    data_dir = (args.data_dir or default_data_dir()).expanduser()
    try:
        ensure_data_dir(data_dir)
    except OSError as exc:
        return _error(f"cannot create data directory {data_dir}: {exc.strerror or exc}", 1)
    _setup_logging(args.log_level, data_dir)
    dev_options: dict[str, object] = {"no_watch": args.no_watch}
    if args.build:
        dev_options["build_cmd"] = args.build
    if args.watch:
        dev_options["watch"] = tuple(p.expanduser().resolve() for p in args.watch)
    if args.ignore:
        dev_options["ignore"] = tuple(args.ignore)
    config = ServeConfig(
        projects=projects,
        model=model,
        host=args.host,
        port=args.port,
        http=not args.no_http,
        stdio=args.stdio,
        max_message_bytes=args.max_message_bytes,
        shutdown_timeout=args.shutdown_timeout,
        limits=Limits(
            max_prompt_bytes=args.max_prompt_bytes,
            max_sessions_per_connection=args.max_sessions_per_connection,
        ),
        site=args.site.expanduser().resolve() if args.site else None,
        dev_options=dev_options,
        data_dir=data_dir,
    )
    try:
        trio.run(_serve_main, config, args.open)
    except ServeError as exc:
        return _error(str(exc), 1)
    return 0


async def _serve_main(config: ServeConfig, open_browser: bool) -> None:
    async with trio.open_nursery() as nursery:
        running = await nursery.start(serve, config)
        if open_browser and running.url is not None and config.site is not None:
            from .web.dev import open_browser_when_ready

            nursery.start_soon(open_browser_when_ready, running.url + "/")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    status: int = args.func(args)
    return status
