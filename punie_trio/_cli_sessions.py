"""``punie-trio sessions ...`` and ``punie-trio token``: inspect what the server stored.

These commands only read: they open the session store read-only (never creating a database
for a typo'd ``--data-dir``), so they are safe to run while a server is writing, and they
work without Trio. ``cli.py`` calls :func:`add_commands` on its sub-parsers; each command's
``func`` takes the parsed namespace and returns the exit status.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs

from ._config import (
    BY_NAME,
    CONFIG_ENV,
    ConfigError,
    _to_nonempty,
    _to_path,
    as_flag,
    load_file,
    misspelt_env,
    named_config,
    readable_token_warning,
    resolve_option,
)
from ._json import escape_lone_surrogates
from ._paths import (
    NotASmallFile,
    config_path,
    default_data_dir,
    read_small_file_and_status,
    resolved,
    store_path,
    token_path,
    write_output,
)
from .store import (
    STOP,
    SessionRecord,
    StoreError,
    TranscriptEntry,
    read_ids_starting_with,
    read_session_count,
    read_session_with_transcript,
    read_sessions,
)

_PROG = "punie-trio"


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``sessions {list,show,export}`` and ``token`` on ``subparsers``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=as_flag(_to_path),  # ("" was read as the current directory)
        metavar="FILE",
        help=(
            "the config file whose data-dir to use (default: $PUNIE_CONFIG, else the "
            "platform's, as for serve)"
        ),
    )
    common.add_argument(
        "--data-dir",
        type=as_flag(_to_path),
        metavar="DIR",
        help="where the server keeps its token and session store (default: as serve finds "
        "it: $PUNIE_DATA_DIR, else the config file's data-dir, else the platform's)",
    )

    sessions = subparsers.add_parser("sessions", help="inspect stored sessions")
    actions = sessions.add_subparsers(dest="sessions_command", metavar="COMMAND", required=True)

    p = actions.add_parser("list", parents=[common], help="list sessions, newest first")
    p.add_argument(
        "--cwd",
        type=as_flag(_to_nonempty),  # ("" listed every session, as if no filter was given)
        help="only sessions whose working directory is CWD",
    )
    p.set_defaults(func=_in_data_dir(cmd_list))

    p = actions.add_parser("show", parents=[common], help="print a session's transcript")
    p.add_argument("id", metavar="ID", help="session id")
    p.set_defaults(func=_in_data_dir(cmd_show))

    p = actions.add_parser("export", parents=[common], help="write a session as JSON")
    p.add_argument("id", metavar="ID", help="session id")
    p.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE, not stdout (- for stdout)"
    )
    p.set_defaults(func=_in_data_dir(cmd_export))

    p = subparsers.add_parser("token", parents=[common], help="print the server's access token")
    p.set_defaults(func=_in_data_dir(cmd_token, reads=("token",)))


def resolve_data_dir(args: argparse.Namespace) -> Path:
    """The data directory ``serve`` would use with these ``--config`` and ``--data-dir``:
    the flag, else ``$PUNIE_DATA_DIR``, else the config file's ``data-dir``, else the
    platform's. ``ConfigError`` for a bad value (``PUNIE_DATA_DIR=``), a bad or missing
    ``--config`` file.

    Why: these commands once knew only the flag and the variable, so with ``data-dir``
    in the config file ``serve`` wrote one directory and ``token`` and ``sessions`` read
    another. Only ``data-dir`` is resolved: a bad value of an option they do not use is
    ``serve``'s to report."""
    config = config_path(args.config)
    file_values = load_file(config, required=args.config is not None)
    value, _ = resolve_option("data_dir", args.data_dir, file_values, os.environ, str(config))
    return Path(value or default_data_dir()).expanduser()


def _in_data_dir(
    command: Callable[[argparse.Namespace, Path], int], *, reads: tuple[str, ...] = ()
) -> Callable[[argparse.Namespace], int]:
    """``command`` run with the resolved data directory; a configuration error is exit 2,
    as for ``serve``. ``reads``: the options besides ``data_dir`` it reads (``token``
    reads ``$PUNIE_TOKEN``), whose misspelt variables are warned about too."""

    def run(args: argparse.Namespace) -> int:
        try:
            args.config = named_config(args.config, os.environ)  # (--config, else $PUNIE_CONFIG)
            data_dir = resolve_data_dir(args)
        except ConfigError as exc:
            print(f"{_PROG}: error: {_printable(str(exc))}", file=sys.stderr)
            return 2
        # The variables these commands read, misspelt (PUNIE_DATADIR), sent them to
        # another data directory without a word; serve warns of it. (Other near misses,
        # PUNIE_PROT, are serve's to name: nothing here reads them.)
        read = (BY_NAME["data_dir"].env, CONFIG_ENV, *(BY_NAME[name].env for name in reads))
        for warning in misspelt_env(os.environ, meaning=read):
            print(f"{_PROG}: warning: {_printable(warning)}", file=sys.stderr)
        return command(args, data_dir)

    return run


def _fail(message: str) -> int:
    # Escaped (_printable): a message quotes values (a data directory, from a config file
    # given by --config, a repository's say), whose escape sequences went to the terminal
    # raw and could clear the screen or retitle the window.
    print(f"{_PROG}: {_printable(message)}", file=sys.stderr)
    return 1


def _emit(text: str) -> int:
    """Write ``text`` to stdout whole and return 0, or say why not and return 1.

    Why: ``sessions export ID > backup.json`` on a disk that filled up ended with a
    traceback; with ``PYTHONUNBUFFERED`` set (as many container images do) it exited 0
    with the file cut short, since an unbuffered ``sys.stdout`` drops what a short write
    left over without a word. Here every short write is carried on until the whole text
    is written or the write fails. A closed pipe stays ``BrokenPipeError`` (``main``
    ends quietly)."""
    out = sys.stdout
    if out is None:  # (started with stdout closed: ``>&-``)
        return _fail("cannot write the output: standard output is closed")
    buffer = getattr(out, "buffer", None)
    if buffer is None:  # (a stream of text only, as an embedding may set)
        out.write(text)
        return 0
    data = text.replace("\n", os.linesep).encode(out.encoding, out.errors or "strict")
    view = memoryview(data)
    try:
        out.flush()
        while view:
            # A BufferedWriter takes it all or raises; a raw FileIO (unbuffered) may
            # take part (None: a non-blocking stdout that would block: try again).
            written = buffer.write(view)
            view = view[written or 0 :]
        buffer.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        return _fail(f"cannot write the output: {exc.strerror or exc}")
    return 0


def _escape(code: int) -> str:
    named = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(code)
    return named or (f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}")


#: Every control character (C0, DEL, C1) and its escape.
_CONTROLS = {code: _escape(code) for code in [*range(0x20), *range(0x7F, 0xA0)]}
# And the invisible characters that reorder or break what a terminal shows (Trojan Source
# style): bidi marks, embeddings, overrides and isolates, the line and paragraph
# separators, the zero-width space and the BOM. (Not the zero-width joiners: emoji and
# some scripts are written with them.)
_INVISIBLE = (
    0x061C,
    0x200B,
    0x200E,
    0x200F,
    0xFEFF,
    *range(0x2028, 0x202F),
    *range(0x2066, 0x206A),
)
_CONTROLS |= {code: _escape(code) for code in _INVISIBLE}
#: The same but for the newline and tab that lay out a message's text.
_CONTROLS_BUT_LAYOUT = {code: e for code, e in _CONTROLS.items() if code not in (0x09, 0x0A)}


def _printable(text: str, *, layout: bool = False) -> str:
    """``text`` with its control characters escaped (``\\x1b``, ``\\r``, ``\\u009b``), for
    the terminal: titles, prompts and model text come from clients and models, and ESC,
    BEL, CR, BS or a C1 CSI printed raw let any of them set the window title, rewrite or
    erase lines, or fake a line of the transcript. With ``layout`` a newline and a tab are
    kept (message text is laid out with them: a continuation line is indented, so it
    cannot pass for a line of its own); elsewhere a newline is escaped too."""
    return text.translate(_CONTROLS_BUT_LAYOUT if layout else _CONTROLS)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


#: The ids a message names when a prefix starts several.
SHOWN_IDS = 5


def _load(
    args: argparse.Namespace, data_dir: Path
) -> tuple[SessionRecord, list[TranscriptEntry]] | int:
    """The session and transcript named by ``args.id`` (a whole id, else the prefix of
    exactly one), or an exit status after a message.

    Why a prefix: ids are 37 characters, ``list`` shows them whole, and ``show sess_c26b``
    was ``no session 'sess_c26b'`` although one session's id starts so. An exact id wins;
    a prefix of several is named with them, not guessed."""
    db = store_path(data_dir)
    try:
        loaded = read_session_with_transcript(db, args.id)
        if loaded is None and args.id:
            ids, count = read_ids_starting_with(db, args.id, limit=SHOWN_IDS)
            if count > 1:
                shown = ", ".join(_printable(i) for i in ids) + (
                    ", ..." if count > len(ids) else ""
                )
                return _fail(
                    f"{args.id!r} is the start of {count} session ids in {db} ({shown}): "
                    "give more of it"
                )
            if ids:  # (None again if it was deleted meanwhile: "no session" below)
                loaded = read_session_with_transcript(db, ids[0])
    except StoreError as exc:
        return _fail(str(exc))
    except UnicodeEncodeError:
        # An id that is not UTF-8 (bytes from argv) cannot be stored; sqlite3 refuses to
        # encode it (this was a traceback).
        loaded = None
    if loaded is None:
        return _fail(f"no session {args.id!r} in {db}")
    return loaded


# -- sessions list --------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace, data_dir: Path) -> int:
    db = store_path(data_dir)
    try:
        # Stored cwds are resolved (symlinks, "..", a trailing slash): filter on the same.
        cwd = resolved(args.cwd) if args.cwd else None
    except (OSError, RuntimeError) as exc:
        # (~nosuchuser, and in 3.11 a symlink loop, are RuntimeErrors: a traceback.)
        message = f"error: --cwd {args.cwd!r} cannot be resolved: {exc}"
        print(f"{_PROG}: {_printable(message)}", file=sys.stderr)
        return 2
    try:
        records = read_sessions(db, cwd=cwd)
    except StoreError as exc:
        return _fail(str(exc))
    except UnicodeEncodeError:
        # A cwd that is not UTF-8 (bytes from argv) cannot be stored: it matches nothing
        # (sqlite3 refuses to encode it: this was a traceback).
        return _emit(f"no sessions in {db}\n")
    if not records and cwd is not None:
        # Said as for an empty store, a mistyped --cwd read as a store holding nothing.
        try:
            total = read_session_count(db)
        except StoreError as exc:
            return _fail(str(exc))
        of = f"{total} session{'s' if total != 1 else ''}"
        return _emit(f"no sessions in {db} with cwd {_printable(cwd)} (of {of})\n")
    if not records:
        return _emit(f"no sessions in {db}\n")
    rows = [("ID", "UPDATED", "TURNS", "TITLE", "CWD")]
    rows += [
        (
            _printable(r.id),
            _when(r.updated_at),
            str(r.turns),
            _one_line(_printable(r.title or "-"), 40),
            _printable(r.cwd_sent or r.cwd),  # (as session/list gives it)
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[4]]).rstrip() + "\n")
    return _emit("".join(lines))


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"


# -- sessions show --------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace, data_dir: Path) -> int:
    loaded = _load(args, data_dir)
    if isinstance(loaded, int):
        return loaded
    rec, entries = loaded
    text = io.StringIO()
    write_transcript(text, rec, entries)
    return _emit(text.getvalue())


def write_transcript(out: TextIO, rec: SessionRecord, entries: Iterable[TranscriptEntry]) -> None:
    """Render a session for a human: header, then each turn's messages, thoughts, plans,
    tool calls and stop reason, with consecutive message chunks joined into paragraphs.
    Control characters in what was stored are escaped (:func:`_printable`)."""
    out.write(f"session  {_printable(rec.id)}\n")
    out.write(f"title    {_printable(rec.title or '-')}\n")
    # The cwd as the client sent it, as session/list gives it (the resolved one, which
    # the server checks paths against, beside it when it differs: a symlink).
    sent = rec.cwd_sent or rec.cwd
    resolved = f" (resolved: {_printable(rec.cwd)})" if sent != rec.cwd else ""
    out.write(f"cwd      {_printable(sent)}{resolved}\n")
    if rec.root != rec.cwd:
        out.write(f"root     {_printable(rec.root)}\n")
    # (session/list gives them too; they were once in export alone.)
    for i, directory in enumerate(rec.additional_directories):
        out.write(f"{'dirs' if i == 0 else '':<9}{_printable(directory)}\n")
    out.write(f"created  {_when(rec.created_at)}\n")
    out.write(f"updated  {_when(rec.updated_at)}\n")
    out.write(f"turns    {rec.turns}\n")
    for line in _render(entries):
        out.write(line + "\n")


_LABELS = {"user_message_chunk": "user", "agent_message_chunk": "agent"}
_THOUGHT = "agent_thought_chunk"
_CHECKBOX = {"completed": "[x]", "in_progress": "[~]", "pending": "[ ]"}


def _render(entries: Iterable[TranscriptEntry]) -> Iterator[str]:
    turn: int | None = None
    text_kind: str | None = None
    text: list[str] = []
    tools: dict[str, str] = {}

    def flush() -> Iterator[str]:
        nonlocal text_kind
        if text_kind is not None:
            label = "(thought)" if text_kind == _THOUGHT else _LABELS[text_kind]
            yield _labelled(f"{label}: ", _printable("".join(text), layout=True))
        text_kind = None
        text.clear()

    for entry in entries:
        payload = entry.payload
        if entry.turn != turn:
            yield from flush()
            turn = entry.turn
            yield ""
            yield f"--- turn {turn + 1} ---"
        if entry.kind in _LABELS or entry.kind == _THOUGHT:
            if entry.kind != text_kind:
                yield from flush()
                text_kind = entry.kind
            text.append(_content_text(payload.get("content")))
            continue
        yield from flush()
        if entry.kind == "plan":
            yield "plan:"
            items = payload.get("entries")
            for item in items if isinstance(items, list) else []:
                item = item if isinstance(item, dict) else {"content": item}
                box = _CHECKBOX.get(str(item.get("status")), "[?]")
                yield _printable(f"  {box} {item.get('content', '')}")
        elif entry.kind == "tool_call":
            call_id = str(payload.get("toolCallId", "?"))
            title = str(payload.get("title") or call_id)
            tools[call_id] = title
            kind = f" [{payload['kind']}]" if payload.get("kind") else ""
            yield _printable(f"tool: {title}{kind} ({payload.get('status') or 'pending'})")
        elif entry.kind == "tool_call_update":
            call_id = str(payload.get("toolCallId", "?"))
            if payload.get("title"):
                tools[call_id] = str(payload["title"])
            status = payload.get("status")
            if status:
                # A failure says why (its content: the tool's message), on one line.
                why = ""
                if status == "failed" and isinstance(payload.get("content"), list):
                    said = [_tool_content_text(c) for c in payload["content"]]
                    why = " ".join(t for t in said if t)
                    why = f": {why}" if why else ""
                yield _printable(f"tool: {tools.get(call_id, call_id)} -> {status}{why}")
        elif entry.kind == "session_info_update" and "title" in payload:
            yield _printable(f"named: {payload['title']}")  # (the first turn names its session)
        elif entry.kind == STOP:
            error = payload.get("error")
            if isinstance(error, str):
                # The prompt was answered with an error: the stored stopReason (end_turn)
                # never reached the client, so it is not shown as if it had.
                yield _printable(
                    f"stop: failed, the prompt got an error (the model failed: {error})"
                )
            else:
                yield _printable(f"stop: {payload.get('stopReason')}")
        else:
            yield _printable(f"{entry.kind}: {json.dumps(payload, ensure_ascii=False)}")
    yield from flush()


def _tool_content_text(item: Any) -> str:
    """The text of a tool call's content item (``{"type": "content", "content": block}``);
    a diff or a terminal is named, not shown."""
    if not isinstance(item, dict):
        return ""
    if item.get("type") == "content":
        return _content_text(item.get("content"))
    return f"[{item.get('type')}]"


def _content_text(block: Any) -> str:
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "resource_link":
        return f"[link: {block.get('uri', '')}]"
    if kind == "resource":
        resource = block.get("resource")
        uri = resource.get("uri", "") if isinstance(resource, dict) else ""
        return f"[resource: {uri}]"
    return f"[{kind}]"


def _labelled(prefix: str, text: str) -> str:
    lines = text.strip("\n").split("\n")
    indent = "\n" + " " * len(prefix)
    return prefix + indent.join(lines)


# -- sessions export ------------------------------------------------------------------------

#: DEL and the C1 controls: ``json.dumps`` escapes only C0 ones, so these reached the
#: terminal raw (U+009B is a CSI to many). In a JSON text they can only stand in a string,
#: where ``\\u009b`` is the same value.
_JSON_RAW_CONTROLS = re.compile("[\x7f-\x9f]")


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def cmd_export(args: argparse.Namespace, data_dir: Path) -> int:
    loaded = _load(args, data_dir)
    if isinstance(loaded, int):
        return loaded
    rec, entries = loaded
    document = {
        "session": attrs.asdict(rec),
        "transcript": [
            {
                "session_id": e.session_id,
                "seq": e.seq,
                "turn": e.turn,
                "kind": e.kind,
                "payload": e.payload,
            }
            for e in entries
        ],
    }
    # A lone surrogate (a prompt's or a model's text may hold one) stays a \\uXXXX escape:
    # the same JSON value, and the text is UTF-8.
    text = escape_lone_surrogates(json.dumps(document, ensure_ascii=False, indent=2)) + "\n"
    text = _JSON_RAW_CONTROLS.sub(_json_escape, text)
    output: str | None = args.output
    if output is None or output == "-":
        return _emit(text)
    if not output:  # (Path("") is the current directory)
        return _fail("cannot write '': the path is empty")
    if output.endswith(("/", os.sep)):  # (Path() drops the slash: "f/" named the file f)
        return _fail(f"cannot write {output}: a path ending in / names a directory")
    # Whole or not at all for a file: a failed export leaves an existing file as it was
    # (writing in place once truncated it first). A FIFO or a device is written into.
    try:
        write_output(Path(output), text.encode("utf-8"))
    except OSError as exc:
        return _fail(f"cannot write {output}: {exc.strerror or exc}")
    print(f"wrote {_printable(output)}", file=sys.stderr)
    return 0


# -- token ----------------------------------------------------------------------------------


#: The largest token file read (``serve`` writes 44 bytes).
MAX_TOKEN_FILE_BYTES = 64 * 1024


def cmd_token(args: argparse.Namespace, data_dir: Path) -> int:
    path = token_path(data_dir)
    try:
        configured = _configured_token(args)
    except ConfigError as exc:  # (a token serve would refuse: exit 2, as serve's)
        print(f"{_PROG}: error: {_printable(str(exc))}", file=sys.stderr)
        return 2
    if configured is not None:
        token, source = configured
        if os.path.lexists(path):
            print(
                _printable(
                    f"{_PROG}: warning: {path} holds another token, generated by a serve "
                    "started without this one: a serve still running since then uses that one"
                ),
                file=sys.stderr,
            )
        return _emit(f"token from: {_printable(source)}\ntoken: {token}\n")
    try:
        data, status = read_small_file_and_status(path, MAX_TOKEN_FILE_BYTES)
        token = data.decode("utf-8").strip()
    except NotASmallFile as exc:
        return _fail(f"token file {path} {exc} (`{_PROG} serve` writes a new one)")
    except FileNotFoundError:
        return _fail(_no_token_file(args, path))
    except OSError as exc:
        return _fail(f"cannot read {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        return _fail(f"token file {path} is not UTF-8 text (`{_PROG} serve` writes a new one)")
    if not token:
        return _fail(f"token file {path} is empty")
    if not (token.isascii() and token.isprintable()):
        # Not what `serve` writes, nor any token it would take (config._to_token): in a
        # data directory others can write to, a planted file's escape sequences went to
        # the terminal raw. Not shown, then.
        return _fail(
            f"token file {path} does not hold a token (it has characters no token has: "
            f"not printable ASCII); `{_PROG} serve` writes a new one"
        )
    # (The mode of the file read: a second look by name found none when a serve starting
    # with a configured token removed it meanwhile, a FileNotFoundError traceback.)
    mode = status.st_mode & 0o777
    if mode & 0o077:
        # (Said as it is: "readable by others" was said of a 0620 file too, which others
        # cannot read but can change.)
        others = "readable by others" if mode & 0o044 else "open to others"
        print(
            _printable(
                f"{_PROG}: warning: {path} is {others} (mode {mode:04o}); "
                f"`chmod 600 {path}`, or let `{_PROG} serve` write a new one"
            ),
            file=sys.stderr,
        )
    return _emit(f"token file: {path}\ntoken: {token}\n")


def _configured_token(args: argparse.Namespace) -> tuple[str, str] | None:
    """The token ``$PUNIE_TOKEN`` or the config file configures, as ``serve`` takes it (the
    variable over the file, checked by the same rule), and where it comes from; None if
    neither does. ``ConfigError`` for a token ``serve`` would refuse.

    Why: ``serve`` uses a configured token and writes no token file, but ``token`` printed
    the file, a token an earlier start generated that the server refuses (401), or said
    there was none. (A ``--token`` flag is on ``serve``'s command line alone: nothing here
    can see it, and such a ``serve`` leaves no file, which :func:`_no_token_file` says.)
    A config file holding a token that others can read is warned about, as by ``serve``."""
    config = config_path(args.config)
    file_values = load_file(config, required=args.config is not None)
    token, source = resolve_option("token", None, file_values, os.environ, str(config))
    warning = readable_token_warning(config, file_values, source)
    if warning is not None:
        print(f"{_PROG}: warning: {_printable(warning)}", file=sys.stderr)
    return None if token is None or source is None else (token, source)


def _no_token_file(args: argparse.Namespace, path: Path) -> str:
    """Why there is no token file (no token is configured where this command can see:
    :func:`_configured_token`). A running ``serve`` may still have one this command cannot
    see: its ``--token``, or a ``$PUNIE_TOKEN`` of its own environment."""
    return (
        f"no token at {path} yet; `{_PROG} serve` writes one when it starts without a "
        "configured token (one given --token, or $PUNIE_TOKEN or a config file's token "
        "where it was started, uses that and writes no file)"
    )
