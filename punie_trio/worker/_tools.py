"""Tools a model may call. Each reports itself to the client as a ``tool_call`` followed by
``tool_call_update``s, as the tool-calls page of the spec describes.

File tools go through the client (``fs/read_text_file``, ``fs/write_text_file``) when it
advertised the capability, so the agent sees unsaved editor buffers; otherwise they use the
disk directly. Either way the path must resolve inside the session's roots.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import trio

from .._json import has_lone_surrogate, is_name_text
from .._paths import TEMPORARY_HEX_BYTES, file_kind, sync_directory
from .._threads import RootNotAnswering, root_of, run_sync_under
from ..acp import FS_READ_TEXT_FILE, FS_WRITE_TEXT_FILE
from ._envelopes import TurnEnv
from ._paths import _CLOEXEC, PathEscape, directory_ending, open_beneath, resolve_inside

if sys.platform != "win32":  # (used where a write replaces a file: not on Windows)
    import fcntl

ClientCaller = Callable[[str, dict[str, Any]], Awaitable[Any]]


class ClientUnavailable(Exception):
    """Raised by a :data:`ClientCaller` when no client can take the call now (see
    ``ClientReply.unavailable``): the tool falls back to the disk."""


class ToolError(Exception):
    """The tool ran and failed; the message is shown to the user in the tool call."""


@attrs.define(eq=False)
class CallState:
    """What a running tool call may have done that its turn's cancel does not undo.

    ``may_have`` (None: nothing) completes "cancelled, but ...": a turn cancelled before
    the call reported its end reports it failed with that text (``ProjectWorker``), so
    a write that may land after the cancel is not reported as one that did not happen.
    A tool sets it before it starts what it cannot take back."""

    may_have: str | None = None


@attrs.frozen
class ToolSpec:
    kind: str
    title: str
    #: ``(env, input, call_client, path, state)``: ``path`` is the input's, as
    #: :func:`resolve_tool_path` resolved and checked it (once, for the call's ``locations``
    #: too, so the file reported is the file used); None for a tool without ``uses_path``.
    #: ``state``: the call's :class:`CallState`.
    run: Callable[[TurnEnv, dict[str, Any], ClientCaller, Path | None, CallState], Awaitable[str]]
    #: Whether the input names a file (``path``) the call works on.
    uses_path: bool = True


#: ``fs/read_text_file``'s ``line`` and ``limit`` are uint32 (the schema).
_UINT32_MAX = 2**32 - 1

#: The most a ``read_file`` from disk returns (16 MiB, the default message bound): a larger
#: file, or a larger run of lines, fails the call rather than fill the server's memory.
READ_LIMIT_BYTES = 16 * 1024 * 1024

#: The most of a tool's output its ``tool_call_update`` shows (characters). The model gets
#: the whole output; an IDE gets a readable head and the total, not megabytes per update
#: (stored, and replayed by every ``session/load``).
SHOWN_OUTPUT_CHARS = 64 * 1024


def shown_output(output: str) -> tuple[str, dict[str, Any]]:
    """The text ``content`` and the ``rawOutput`` a completed tool call reports: the output
    itself, or its first :data:`SHOWN_OUTPUT_CHARS` characters with a note of what was cut
    (``rawOutput`` then says ``truncated`` and the full ``length``)."""
    if len(output) <= SHOWN_OUTPUT_CHARS:
        return output, {"output": output}
    head = output[:SHOWN_OUTPUT_CHARS]
    more = len(output) - SHOWN_OUTPUT_CHARS
    note = f"\n[... {more:,} more characters not shown ({len(output):,} in all)]"
    return head + note, {"output": head, "truncated": True, "length": len(output)}


def _path_arg(tool_input: dict[str, Any]) -> str:
    path = tool_input.get("path")
    if not isinstance(path, str) or not path:
        raise ToolError("input.path must be a non-empty string")
    if not is_name_text(path):
        raise ToolError("input.path must not contain NUL or a lone surrogate")
    ending = directory_ending(path)
    if ending is not None:
        raise ToolError(f"input.path {path!r} ends in {ending!r}: it names a directory, not a file")
    return path


def _line_args(tool_input: dict[str, Any]) -> dict[str, int]:
    """``line`` and ``limit`` for ``fs/read_text_file``, checked against the schema's
    uint32 (a bool is no integer here, though Python's ``bool`` is an ``int``). Lines count
    from 1 (the overview page), so a ``line`` of 0 is sent as 1, as the disk read takes it:
    what the client would make of 0 the spec leaves open."""
    args: dict[str, int] = {}
    for key in ("line", "limit"):
        value = tool_input.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT32_MAX:
            raise ToolError(f"input.{key} must be an integer from 0 to {_UINT32_MAX}")
        args[key] = max(value, 1) if key == "line" else value
    return args


async def resolve_tool_path(env: TurnEnv, tool_input: dict[str, Any]) -> Path:
    """The tool's ``path``, resolved and checked inside the session's roots (a
    :class:`ToolError` naming the problem otherwise).

    Why a thread: resolving walks the file system (a ``stat`` per component, the server's
    own files compared by inode), and on the event loop a project on a network mount that
    stopped answering froze every client of the server. Only this turn waits now, and a
    cancel does not wait for it (``abandon_on_cancel``: the walk changes nothing, and its
    thread ends when the file system answers). The thread is one of the root's the path
    names (:func:`_threads_of`): a hung mount holds only its own root's threads."""
    raw = _path_arg(tool_input)
    try:
        return await run_sync_under(
            _threads_of(env, raw), resolve_inside, raw, env.cwd, env.roots, env.private
        )
    except (PathEscape, RootNotAnswering) as exc:
        raise ToolError(str(exc)) from None


def _threads_of(env: TurnEnv, path: str | Path) -> str:
    """The served root whose threads (``_threads.run_sync_under``) a tool's work on
    ``path`` takes: the one the path names, relative to the session's cwd (by its text:
    :func:`~punie_trio._threads.root_of`), else the one the session's cwd lies under (a
    path with ``~``, or outside every root: refused once resolved)."""
    anchors = _walk_from(env)
    own = root_of(env.cwd, anchors)
    text = str(path)
    if text.startswith("~"):
        return own
    return root_of(os.path.join(env.cwd, text), anchors, own)


async def _read_file(
    env: TurnEnv,
    tool_input: dict[str, Any],
    call: ClientCaller,
    path: Path | None,
    state: CallState,
) -> str:
    assert path is not None  # (uses_path)
    lines = _line_args(tool_input)
    if env.capabilities.read_text_file:
        params: dict[str, Any] = {"sessionId": env.session_id, "path": str(path), **lines}
        try:
            result = await call(FS_READ_TEXT_FILE, params)
        except ClientUnavailable:
            pass  # (read from disk below)
        else:
            content = result.get("content") if isinstance(result, dict) else None
            if not isinstance(content, str):
                raise ToolError("client answered fs/read_text_file without a content string")
            return content
    line, limit = lines.get("line"), lines.get("limit")
    try:
        # Abandoned on cancel: a read changes nothing, and on a network mount that stopped
        # answering it held the turn's session/cancel (and a shutdown) until the mount
        # answered. The thread ends when the file system answers (or at its next chunk).
        # One of the file's root's threads: a hung mount holds only its own root's.
        return await run_sync_under(
            _threads_of(env, path), _read_disk, path, _walk_from(env), line, limit
        )
    except (PathEscape, RootNotAnswering) as exc:
        raise ToolError(str(exc)) from None
    except IsADirectoryError:
        raise ToolError(f"cannot read {path}: it is a directory") from None
    except _NotAFile as exc:
        raise ToolError(f"cannot read {path}: not a regular file ({exc.kind})") from None
    except _TooLarge:
        raise ToolError(
            f"cannot read {path}: more than {READ_LIMIT_BYTES:,} bytes"
            " (read it in parts with line and limit)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolError(f"cannot read {path}: {exc}") from None


class _TooLarge(Exception):
    """What a disk read would return is over :data:`READ_LIMIT_BYTES`."""


class _NotAFile(Exception):
    """The path names a FIFO, a socket or a device: ``kind`` says which."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


async def _write_file(
    env: TurnEnv,
    tool_input: dict[str, Any],
    call: ClientCaller,
    path: Path | None,
    state: CallState,
) -> str:
    """Write the file through the client (``fs/write_text_file``) or on disk.

    Cancelled (``session/cancel``, the client gone, shutdown), the call does not wait for
    the write: a disk write runs in a thread abandoned on cancel, since on a network
    mount that stopped answering it held the turn's cancel until the mount answered. An
    abandoned write lands or not as follows, and ``state`` says so for the call's report:

    - Before its commit (the rename of the new file over the old, or the truncation of
      a file written into) the thread looks at the cancel (:func:`_write_disk`'s
      ``commit``): cancelled by then, it removes its new file and changes nothing, and
      the call is reported ``cancelled``, the truth.
    - From its commit on, it may land after the turn is over (a rename the file system
      has not answered). The call is reported failed with "cancelled, but PATH may hold
      the new content": never as a write that did not happen.
    - Asked of the client, the write is the client's once the request is sent; a cancel
      before its answer is reported so too.
    """
    assert path is not None  # (uses_path)
    content = tool_input.get("content")
    if not isinstance(content, str):
        raise ToolError("input.content must be a string")
    if has_lone_surrogate(content):
        raise ToolError("input.content is not valid Unicode text (a lone surrogate)")
    on_disk = not env.capabilities.write_text_file
    if not on_disk:
        params = {"sessionId": env.session_id, "path": str(path), "content": content}
        state.may_have = f"{path} may hold the new content: the client was asked to write it"
        try:
            await call(FS_WRITE_TEXT_FILE, params)
        except trio.Cancelled:
            state.may_have += " and had not answered"
            raise
        except ClientUnavailable:
            state.may_have = None  # (it was not asked: the disk is)
            on_disk = True
    if on_disk:

        def commit() -> None:  # (on the write's thread, just before its commit)
            state.may_have = (
                f"{path} may hold the new content: the cancel came while it was being "
                "written, and a write the file system has not finished runs on"
            )
            trio.from_thread.check_cancelled()

        try:
            # (One of the file's root's threads, as a read. Refused for want of one,
            # nothing was started: the call fails with nothing written.)
            await run_sync_under(
                _threads_of(env, path), _write_disk, path, _walk_from(env), content, commit
            )
        except (PathEscape, RootNotAnswering) as exc:
            raise ToolError(str(exc)) from None
        except IsADirectoryError:
            raise ToolError(f"cannot write {path}: it is a directory") from None
        except _NotAFile as exc:
            raise ToolError(f"cannot write {path}: not a regular file ({exc.kind})") from None
        except OSError as exc:
            raise ToolError(f"cannot write {path}: {exc}") from None
    output = f"wrote {len(content.encode())} bytes to {path}"
    state.may_have = f"it {output}"  # (a cancel before the call reports: it did)
    return output


def _walk_from(env: TurnEnv) -> tuple[str, ...]:
    """The roots an open starts its no-follow walk from: the served project roots
    (``open_beneath`` takes the outermost containing the path), so the directories
    between a project root and an additional directory are walked too."""
    return env.anchors or env.roots


def _read_disk(path: Path, roots: tuple[str, ...], line: int | None, limit: int | None) -> str:
    """(On a worker thread.) The file's text as stored (``\r\n`` and ``\r`` kept: what an
    editor holds), opened without following a symlink that appeared since the path was
    checked (``open_beneath``). With ``line`` and/or ``limit``, from its ``line``-th line
    (1-based, as ``fs/read_text_file`` counts; 0 reads as 1), at most ``limit`` lines, each
    with its ending, as a client's ``fs/read_text_file`` answers; lines end at ``\n``,
    ``\r\n`` or ``\r``, as an editor counts them. The file is read a line at a time then,
    so a part of a file of any size can be read. Raises :class:`_TooLarge` past
    :data:`READ_LIMIT_BYTES` of what would be returned."""
    with os.fdopen(_open_file(path, roots, os.O_RDONLY), "rb") as file:
        if line is None and limit is None:
            data = file.read(READ_LIMIT_BYTES + 1)
        else:
            first = max(line or 1, 1) - 1
            data = _take_lines(file, first, limit, check=trio.from_thread.check_cancelled)
        if len(data) > READ_LIMIT_BYTES:
            raise _TooLarge
        return data.decode("utf-8")


#: Opened without waiting (a FIFO's open waits for its other end) and without making a
#: terminal the server's controlling one. Neither flag exists on Windows.
_NO_WAIT = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


def _open_file(path: Path, roots: tuple[str, ...], flags: int) -> int:
    """(On a worker thread.) ``open_beneath``, for a regular file only: a directory is
    :class:`IsADirectoryError`, anything else :class:`_NotAFile`, closed again before
    anything is read from it or written into it.

    Why: the open of a FIFO waits for its other end, and a disk tool's open runs in a
    thread that a cancel cannot stop: a ``read_file`` of a FIFO in the project hung its
    turn, ``session/cancel`` could not end it, and a server told to stop gave up on its
    shutdown after a timeout and exited 1. A device has no end (``/dev/zero`` read by
    lines never stopped). The open does not wait now (``O_NONBLOCK``: a FIFO or a socket
    nobody reads fails with ``ENXIO``), and what it opened is checked before use.

    What the name is is looked at before the open too, so that such a file is not opened
    at all (but for one swapped in after the look): an open acts. A writer waiting in its
    own open of a FIFO was let go by the server's, and its writes failed (``EPIPE``) once
    the server closed its end; a device may act on an open (a tape rewinds on its close).
    """
    try:
        kind = os.stat(path, follow_symlinks=False).st_mode
    except OSError:
        pass  # (not there, not reachable: the open says so, as it did)
    else:
        if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind) or stat.S_ISLNK(kind)):
            raise _NotAFile(file_kind(kind))
    try:
        fd = open_beneath(path, roots, flags | _NO_WAIT)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # (a FIFO with no reader, a socket: never opened)
            raise _NotAFile(file_kind(os.stat(path, follow_symlinks=False).st_mode)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise _NotAFile(file_kind(mode))
        if _NO_WAIT:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _take_lines(
    file: BinaryIO,
    first: int,
    limit: int | None,
    chunk_size: int = 1 << 20,
    *,
    check: Callable[[], None] = lambda: None,
) -> bytes:
    """Lines ``first`` (0-based) to ``first + limit`` of ``file`` (to its end if ``limit``
    is None), read in chunks so that neither a long file nor a long line is held whole:
    only the lines taken are kept, and reading stops once they pass
    :data:`READ_LIMIT_BYTES` (the caller then refuses them).

    ``check`` runs before each chunk and raises to stop (``_read_disk`` passes
    ``trio.from_thread.check_cancelled``): reaching a line reads every byte before it, and
    a ``line`` past the end of a large file read all of it (a terabyte, for hours) while
    the turn's cancel waited for the thread."""
    end = None if limit is None else first + limit
    out = bytearray()
    index = 0  # the line the next byte belongs to
    cr_ended = False  # the last chunk ended with \r: a \n opening the next one is its
    while (end is None or index < end) and len(out) <= READ_LIMIT_BYTES:
        check()
        chunk = file.read(chunk_size)
        if not chunk:
            break
        pos = 0
        if cr_ended and chunk.startswith(b"\n"):
            if first <= index - 1:
                out += b"\n"  # (the \r\n of a line taken)
            pos = 1
        cr_ended = False
        for match in _LINE_END.finditer(chunk, pos):
            if first <= index:
                out += chunk[pos : match.end()]
            index += 1
            pos = match.end()
            cr_ended = pos == len(chunk) and match.group() == b"\r"
            if index == end:
                break
        else:
            if first <= index:
                out += chunk[pos:]
            continue
        break
    if cr_ended and index == end and first < index and file.read(1) == b"\n":
        out += b"\n"  # the last line taken ends with \r\n across two chunks
    return bytes(out)


def _write_disk(
    path: Path,
    roots: tuple[str, ...],
    content: str,
    commit: Callable[[], None] = lambda: None,
) -> None:
    """(On a worker thread.) Create or replace the file whole or not at all: the content
    goes into a new file beside it, renamed over it once written, in the directory opened
    as ``_read_disk`` opens a file (``open_beneath``). An existing file's mode (and, where
    the server may set it, owner) is kept, and so are its extended attributes (its ACL).

    ``commit`` runs just before the first change to the file (the rename, or the
    truncation of a file written into), and raises to write nothing: ``_write_file``
    passes one that looks at the turn's cancel, so that a write abandoned before it
    never lands (the new file beside is removed).

    Why: the file was truncated, then written, so a write that failed part way (a full
    disk) left the start of the new content where the user's file had been. Replacing
    also leaves any other hard link to the file as it was: a hard link planted in the
    project to a file outside no longer carries a write out.

    Where the replace cannot be made as the file was (a directory the server may not
    create files in, an owner or an attribute it may not give), the file is written
    into, as before.
    """
    data = content.encode("utf-8")
    if os.open not in os.supports_dir_fd:  # pragma: no cover - not POSIX (open_beneath too)
        commit()
        with os.fdopen(_open_file(path, roots, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
            f.write(data)
        return
    if any(path == Path(root) for root in roots):  # (its parent is outside: nothing to open)
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    directory = open_beneath(path.parent, roots, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _sweep_once(directory)
        existing = _existing_file(directory, path)
        try:
            _replace(directory, path.name, data, existing, commit)
        except _CannotReplace:
            if existing is None:  # (nothing to write into: no file may be made here)
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path)) from None
            _write_into(directory, path, data, existing, commit)
    finally:
        os.close(directory)


class _CannotReplace(Exception):
    """The file cannot be replaced as it was (see :func:`_write_disk`)."""


def _existing_file(directory: int, path: Path) -> os.stat_result | None:
    """The status of the regular file ``path.name`` in ``directory`` (None: no such file);
    anything else there is refused as ``_open_file`` refuses it, and a symlink (one that
    appeared after the path was checked) as :class:`PathEscape`."""
    try:
        status = os.stat(path.name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return None
    mode = status.st_mode
    if stat.S_ISLNK(mode):
        raise PathEscape(
            f"{path} cannot be opened without following a symlink (one appeared "
            "after the path was checked)"
        )
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(mode):
        raise _NotAFile(file_kind(mode))
    if not os.access(path.name, os.W_OK, dir_fd=directory, follow_symlinks=False):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return status


def _replace(
    directory: int,
    name: str,
    data: bytes,
    existing: os.stat_result | None,
    commit: Callable[[], None] = lambda: None,
) -> None:
    """Write ``data`` to a new file in ``directory`` and rename it to ``name`` (``commit``
    first); the new file gets an unguessable name, created exclusively, and is removed
    again on any failure (``commit`` raising too).

    Durable (on the worker's thread): the data is synced before the rename and the
    directory after it. Unsynced, a power loss soon after a write could leave the user's
    file empty (the rename reached the disk before the data), neither version.

    The new file is locked (``flock``) from its creation until it is renamed or removed,
    so that a sweep (:func:`_sweep_once`, of this server or another) knows it for a live
    write's and leaves it: one a ``kill -9`` left is held by nobody (a lock ends with its
    process). A sweep can still take it in the moment between its creation and its lock:
    the writer then finds its name gone, or another file's, and starts again under a new
    name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
    for _ in range(100):
        # (Not named after the target: that name could be too long where the target's is not.)
        tmp = f".punie-trio-{secrets.token_hex(TEMPORARY_HEX_BYTES)}.tmp"
        try:
            # (A new file: 0666 less the umask, as open would make it.)
            fd = os.open(tmp, flags, 0o600 if existing else 0o666, dir_fd=directory)
        except FileExistsError:
            continue
        except PermissionError:
            raise _CannotReplace from None  # (no file may be made here)
        try:
            held = _held(fd, directory, tmp)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=directory)
            raise
        if held:
            break
        os.close(fd)  # (swept before it was held: the sweep removes it, if it has not)
    else:
        raise FileExistsError(f"could not create a temporary file beside {name}")
    with os.fdopen(fd, "wb") as file:  # (open, and so held, until renamed or removed)
        try:
            if existing is not None:
                _take_owner_and_mode(file.fileno(), existing)
                _take_xattrs(file.fileno(), directory, name, existing)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            commit()
            os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=directory)
            raise
    sync_directory(directory)


#: :func:`_replace`'s temporary files are ``.punie-trio-`` + lowercase hex digits (as many
#: as :func:`punie_trio._paths.replace_file`'s) + ``.tmp``, and only names of exactly that
#: form are swept.
_LEFT_OVER = re.compile(rf"\.punie-trio-[0-9a-f]{{{2 * TEMPORARY_HEX_BYTES}}}\.tmp")

#: What ``flock`` answers on a file system that keeps no such locks.
_NO_LOCKS = frozenset(
    {errno.ENOLCK, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}
)


def _held(fd: int, directory: int, name: str) -> bool:
    """Lock the new temporary file ``fd`` (``name`` in ``directory``) for its write, and
    say whether it is still the file under that name (False: a sweep took it between its
    creation and now). Where the file system keeps no locks, it is not locked, and no
    sweep there takes anything either."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # (a sweep holds it, to remove it)
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            raise
    try:
        named = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return os.path.samestat(named, mine)


#: The directories (device and inode) this process has swept (:func:`_sweep_once`); at
#: most :data:`_MAX_SWEPT`, then forgotten all at once (a second sweep costs a listing).
_swept: set[tuple[int, int]] = set()
_swept_lock = threading.Lock()
_MAX_SWEPT = 4096


def _sweep_once(directory: int) -> None:
    """(On a worker thread.) Remove from ``directory`` the temporary files that writes
    killed part way left there (:func:`_remove_if_left_over`), the first time this
    process writes a file in it.

    Why: a server killed (``kill -9``, a crash) between creating ``.punie-trio-<16
    hex>.tmp`` beside the user's file and renaming it over the file left it in the
    project for good, holding content that never landed, in the user's ``git status``.
    It is removed where it was left, when the next server writes there: in the
    directories the agent writes in, and without walking the whole project (a tree of
    any size, perhaps on a mount that does not answer) at serve start. Once per
    directory a process: a listing a write would cost a directory of 50,000 entries tens
    of milliseconds each time, and what a process of its own leaves it does not live to
    sweep. Nothing here fails the write."""
    try:
        status = os.fstat(directory)
        key = (status.st_dev, status.st_ino)
        with _swept_lock:
            if key in _swept:
                return
            if len(_swept) >= _MAX_SWEPT:
                _swept.clear()
            _swept.add(key)
        names = [name for name in os.listdir(directory) if _LEFT_OVER.fullmatch(name)]
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            _remove_if_left_over(directory, name)


def _remove_if_left_over(directory: int, name: str) -> None:
    """Remove ``name`` (a :data:`_LEFT_OVER` name) from ``directory`` if it is certainly a
    temporary file a killed write left: a regular file (not a symlink, not followed), with
    no other name (a hard link is the same file under a name of the user's), owned by this
    process's user, and held by no live write (:func:`_replace` locks its own until it
    renames it; a lock ends with its process). Anything else is left as it is. Checked
    again by name, under the lock, just before the unlink: a file that took the name
    meanwhile is not removed.

    The lock taken here is shared: it conflicts with the writer's exclusive one both ways
    (a writer that finds it cannot lock its new file starts again under a new name), and
    a read-only descriptor may take it on every file system that keeps locks. An
    exclusive one failed on NFS (``flock`` is a whole-file byte-range lock there, and an
    exclusive one needs a descriptor opened for writing: ``EBADF``), so no leftover was
    ever removed there. (Two sweeps may both hold it: the second unlink finds no name.)"""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC | _NO_WAIT, dir_fd=directory)
    try:
        status = os.fstat(fd)
        if (
            not stat.S_ISREG(status.st_mode)
            or status.st_nlink != 1
            or status.st_uid != os.geteuid()
        ):
            return
        # (Held by a live write: OSError. Shared, as a read-only descriptor may lock it
        # everywhere: on NFS an exclusive lock needs one opened for writing, EBADF.)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        now = os.stat(name, dir_fd=directory, follow_symlinks=False)
        if os.path.samestat(now, status):
            os.unlink(name, dir_fd=directory)
    finally:
        os.close(fd)


def _take_owner_and_mode(fd: int, existing: os.stat_result) -> None:
    """Give the new file ``fd`` the owner and mode of the file it replaces, or raise
    :class:`_CannotReplace` if the owner cannot be given (a file another user owns)."""
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) != (existing.st_uid, existing.st_gid):
        try:
            os.fchown(fd, existing.st_uid, existing.st_gid)
        except PermissionError:
            raise _CannotReplace from None
    os.fchmod(fd, stat.S_IMODE(existing.st_mode))


#: What listing a file's extended attributes answers on a file system that keeps none.
_NO_XATTRS = frozenset({errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)})


def _take_xattrs(fd: int, directory: int, name: str, existing: os.stat_result) -> None:
    """Give the new file ``fd`` the extended attributes of the file ``name`` it replaces
    (``existing``), and only those, or raise :class:`_CannotReplace` (Linux; elsewhere
    there is nothing ``os`` can copy).

    Why: a POSIX ACL is one (``system.posix_acl_access``). A file shared with one other
    user (``user:bob:rw-``, ``group::---``, ``mask::rw-``) shows the mask as its group
    bits (0660), so a new file given only its mode let every member of its group read and
    write it, and bob not; and a directory's default ACL gave a new file entries the old
    one never had. An attribute that cannot be set (``security.*`` needs rights the server
    may lack) leaves the file to be written into, as an owner that cannot be given does."""
    if not hasattr(os, "listxattr"):  # pragma: no cover - not Linux
        return
    flags = os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC | _NO_WAIT
    try:
        try:
            source = os.open(name, flags, dir_fd=directory)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                return  # (the file checked is gone: the rename replaces what took its name)
            raise
        try:
            now = os.fstat(source)
            if (now.st_dev, now.st_ino) != (existing.st_dev, existing.st_ino):
                return  # (as above; never a reason to write into what is there now)
            try:
                names = os.listxattr(source)
            except OSError as exc:
                if exc.errno not in _NO_XATTRS:
                    raise
                return  # (a file system that keeps none: nothing to keep)
            theirs = {key: os.getxattr(source, key) for key in names}
        finally:
            os.close(source)
        for key in os.listxattr(fd):
            if key not in theirs:
                os.removexattr(fd, key)
        for key, value in theirs.items():
            with contextlib.suppress(OSError):
                if os.getxattr(fd, key) == value:
                    continue  # (a label the new file was given already: setting it may need rights)
            os.setxattr(fd, key, value)
    except OSError:
        raise _CannotReplace from None


def _write_into(
    directory: int,
    path: Path,
    data: bytes,
    existing: os.stat_result,
    commit: Callable[[], None] = lambda: None,
) -> None:
    """Write ``data`` into the existing file (truncated first, ``commit`` before that),
    where it cannot be replaced: the very file checked (``existing``), or none.

    Why: the name was opened with ``O_TRUNC`` and written whatever it named by then, so a
    file swapped meanwhile for a hard link to a file outside the project (by a local
    process that can write in it) had that file truncated and overwritten. The name is
    opened without truncating now, and truncated only once it is known to be the file.

    Synced before it returns: unsynced, the call reported "wrote N bytes" while a power
    loss could still leave the user's file truncated to nothing (an editor's in-place save
    syncs too). Written into, a write cut short part way is still torn: only a replace is
    whole or not at all."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | _CLOEXEC | _NO_WAIT
    fd = os.open(path.name, flags, dir_fd=directory)
    with os.fdopen(fd, "wb") as file:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode):  # (swapped meanwhile)
            raise _NotAFile(file_kind(now.st_mode))
        if (now.st_dev, now.st_ino) != (existing.st_dev, existing.st_ino):
            raise _Replaced
        os.set_blocking(fd, True)
        commit()
        os.ftruncate(fd, 0)
        file.write(data)
        file.flush()
        os.fsync(fd)  # (before the call reports "wrote": see the docstring)


class _Replaced(OSError):
    """The file checked was replaced by another before it could be written into (the tool
    call fails ``cannot write PATH: it was replaced ...``)."""

    def __init__(self) -> None:
        super().__init__(
            "it was replaced while it was being written (another file took its name): "
            "nothing was written"
        )


TOOLS: dict[str, ToolSpec] = {
    "read_file": ToolSpec("read", "Read file", _read_file),
    "write_file": ToolSpec("edit", "Write file", _write_file),
}
