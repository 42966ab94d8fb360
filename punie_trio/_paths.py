"""Where punie-trio keeps its files.

One module owns every on-disk location so the server, the read-only CLI commands and the
``punie-trio acp`` shim (a later issue) agree on them without passing paths around: the
shim is to find the token the server wrote, and ``punie-trio sessions list`` opens the same
database ``serve`` writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

import platformdirs

APP_NAME = "punie-trio"
DATA_DIR_ENV = "PUNIE_DATA_DIR"


def default_data_dir() -> Path:
    """The data directory: ``$PUNIE_DATA_DIR`` if set (tests, containers), else the
    platform's per-user data directory (``~/.local/share/punie-trio`` on Linux)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME))


def default_config_path() -> Path:
    """The user's config file; it need not exist."""
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def config_path(given: Path | None) -> Path:
    """The config file a command reads: ``given`` (``--config``), else the default."""
    return given if given is not None else default_config_path()


def token_path(data_dir: Path) -> Path:
    """The file holding the bearer token ``serve`` generated (mode 0600)."""
    return data_dir / "token"


def store_path(data_dir: Path) -> Path:
    """The SQLite session store (sessions and transcripts)."""
    return data_dir / "sessions.sqlite3"


def closed_marker(store: Path) -> Path:
    """The file a clean close of the session store ``store`` leaves beside it
    (``sessions.sqlite3-closed``): without it, the next open checks the whole store."""
    return store.with_name(store.name + "-closed")


def ensure_data_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing, private to the user (0700), and return it.

    The directory holds the token and every transcript, so a directory we create is never
    group- or world-readable. An existing directory's mode is left alone: the user chose it.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class NotASmallFile(Exception):
    """What :func:`read_small_file` refuses; the message completes "FILE ...": ``is not
    a regular file (a FIFO)``, ``is over 1048576 bytes``."""


class OthersCanWrite(NotASmallFile):
    """What :func:`read_small_file` refuses with ``trusted=True``: a file another user
    could change (``is writable by every user (mode 0666)``, ``is owned by another
    user (uid 1000)``); ``fix`` says what to do about it, with ``{path}`` for the file."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is (``a FIFO``), for a message."""
    return next((kind for is_kind, kind in _KINDS if is_kind(mode)), "not a file")


def read_small_file(path: Path, max_bytes: int, *, trusted: bool = False) -> bytes:
    """:func:`read_small_file_and_status`'s bytes."""
    return read_small_file_and_status(path, max_bytes, trusted=trusted)[0]


def read_small_file_and_status(
    path: Path, max_bytes: int, *, trusted: bool = False
) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them; anything
    else is :class:`NotASmallFile` (and a missing or unreadable file the ``OSError`` an
    open gives). With ``trusted``, a file another user could change (writable by every
    user, or owned by a user other than this one and root) is :class:`OthersCanWrite`.

    Why: a config or token file is read whole, at start or by a CLI command. Named by a
    FIFO (``--config``, or one planted as ``DATA_DIR/token``) the open waited for ever for
    a writer; ``/dev/zero`` was read until memory ran out. The open does not wait
    (``O_NONBLOCK``), and what it opened is checked before a byte is read. A config file
    names commands serve runs (``trusted``): one anybody could edit ran their commands as
    this user. Group-writable passes: user private groups make files 0664. The status is
    the file's that was read (``token`` warns of its mode: looked at again by name, a file
    removed meanwhile was a traceback)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd: int | None = os.open(path, flags)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # (ENXIO: a socket, which no open reads)
            raise
        fd = None
    try:
        status = os.fstat(fd) if fd is not None else os.stat(path)
        mode = status.st_mode
        if not stat.S_ISREG(mode):
            raise NotASmallFile(f"is not a regular file ({file_kind(mode)})")
        assert fd is not None
        if trusted:
            _check_trusted(status)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    finally:
        if fd is not None:
            os.close(fd)
    if len(data) > max_bytes:
        raise NotASmallFile(f"is over {max_bytes} bytes")
    return data, status


def _check_trusted(status: os.stat_result) -> None:
    if status.st_mode & stat.S_IWOTH:
        mode = stat.S_IMODE(status.st_mode)
        raise OthersCanWrite(f"is writable by every user (mode {mode:04o})", "`chmod o-w {path}`")
    getuid = getattr(os, "getuid", None)  # (Windows: no owners to compare)
    if getuid is not None and status.st_uid not in (getuid(), 0):
        raise OthersCanWrite(
            f"is owned by another user (uid {status.st_uid})", "use a copy you own"
        )


def resolved(path: str) -> str:
    """``path`` with ``~``, symlinks and ``..`` resolved: the form sessions' cwds and roots
    are stored and compared in (the server and the CLI alike)."""
    return str(resolve_path(Path(path).expanduser()))


def resolve_path(path: Path) -> Path:
    """``path.resolve()`` (not strict: what does not exist yet is kept as written), with a
    symlink loop an error on every Python: ``OSError`` (``ELOOP``) or, before 3.13,
    ``RuntimeError``.

    Why: Python 3.13's ``resolve`` no longer raises for a loop; it hands the looping link
    back as if it were resolved, so a ``--project`` loop was "not a directory" there and a
    ``sessions list --cwd`` loop listed nothing, without a word, where 3.11 named the loop.
    A path that does not exist is resolved again strictly, for the loop's error alone."""
    result = path.resolve()
    if not result.exists():
        try:
            result.resolve(strict=True)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise
    return result


def replace_file(path: Path, data: bytes, mode: int = 0o666, *, exact_mode: bool = False) -> None:
    """Write ``data`` to ``path`` whole or not at all: into a file beside it, created with
    ``mode`` (so a private file is never readable by others, even for an instant), then
    renamed into place. On failure an existing file is as it was, and nothing is left
    behind (no stray copy of, say, a live token).

    ``mode`` is narrowed by the umask, as ``open`` does; with ``exact_mode`` the file gets
    ``mode`` itself (created 0600, then widened if asked): an export that replaces a file
    keeps the mode the user gave that file.

    The file beside it gets an unguessable name and is created exclusively (``O_EXCL``):
    a file or symlink planted under a predictable name, by anyone who can write to the
    directory, once received the token or lent it its wide mode. Its name is
    ``.NAME.<16 hex digits>.tmp``, which :func:`remove_leftover_temporaries` knows.

    Durable: the new file's data is synced before the rename, and the directory after it.
    Unsynced, a power loss or kernel crash soon after could leave the name holding an
    empty file (the rename reached the disk, the data had not) where the old token had
    been; and a token the shim had read could come back as the previous one. (Measured
    on the development VM: 0.6 ms a replace, synced; the token is written once a start.)
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(TEMPORARY_HEX_BYTES)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if exact_mode else mode)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"could not create a temporary file beside {path}")
    try:
        if exact_mode:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_directory(path.parent)


#: :func:`replace_file`'s temporary files are ``.NAME.`` + twice this many hex digits + ``.tmp``.
TEMPORARY_HEX_BYTES = 8


def sync_directory(path: Path | str | int) -> None:
    """``fsync`` the directory ``path`` (or the open descriptor of one), so that a rename
    or a new name in it survives a power loss. Where a system cannot sync a directory
    (Windows opens none; some file systems answer ``EINVAL``), nothing is done: the
    file's own data was synced, and the rename is as durable as that system makes it."""
    if isinstance(path, int):
        fd, close = path, False
    else:
        try:
            fd = os.open(
                path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
            )
        except (PermissionError, IsADirectoryError):  # (Windows: a directory is no file)
            return
        close = True
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        if close:
            os.close(fd)


def remove_leftover_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files :func:`replace_file` left in ``directory`` for the files
    ``names`` (``.NAME.<16 hex digits>.tmp`` exactly, a regular file or a symlink, which is
    removed, not followed); return those removed.

    Why: a process killed between creating such a file and renaming it (``kill -9``, a
    power loss) left it for good, and the token's holds a token. Only names of exactly
    that form go: nothing else in the directory is ours to remove. The caller holds the
    directory (``serve``, under :func:`lock_data_dir`), so no write of another process
    is in flight. A file that cannot be removed is left (it is only a stale copy).
    """
    wanted = set(names)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or match.group(1) not in wanted:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


_TEMPORARY = re.compile(rf"\.(.+)\.[0-9a-f]{{{2 * TEMPORARY_HEX_BYTES}}}\.tmp")


def write_output(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as ``sessions export -o`` promises: where ``path`` is (or
    a symlink leads to) a regular file or nothing, whole or not at all
    (:func:`replace_file`), keeping an existing file's mode and creating a new one 0600
    (a transcript is as private as the store it came from); anything else that exists (a
    FIFO, a terminal, ``/dev/null``) is opened and written into, as a shell's ``>`` would.

    Why: the export once replaced whatever was at ``path`` with a regular file. A FIFO's
    reader got nothing, a symlink became a file while its target kept the old export, and
    ``-o /dev/null`` run as root replaced the device. A symlink is followed (the link
    stays; its target is written), so an export through it is still whole or not at all.

    Error handling: ``OSError`` for the caller to report; a directory (``.``, ``/``) is
    ``IsADirectoryError`` (``.`` once was a ``ValueError`` traceback: it has no name to
    put a temporary file beside).
    """
    if _names_a_descriptor(str(path)):
        # /dev/stdout, /dev/fd/N, /proc/self/fd/N: a file already open (a pipe, or what
        # the shell's > or >> opened). Resolving such a name gives a pipe's "pipe:[N]"
        # (no such file) or the redirected file, which a replace would wipe (an export
        # with -o /dev/stdout >> log once did): written into, at its end, as >> would.
        _write_into(path, data, os.O_APPEND)
        return
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode: int | None = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if (mode is not None and stat.S_ISDIR(mode)) or not target.name:
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if mode is None or stat.S_ISREG(mode):
        keep = 0o600 if mode is None else stat.S_IMODE(mode)
        replace_file(target, data, keep, exact_mode=True)
        return
    _write_into(target, data)  # (it exists: never O_CREAT here)


def _write_into(path: Path, data: bytes, flags: int = 0) -> None:
    """Write ``data`` into the existing file ``path`` opens (a FIFO, a device, a file
    descriptor's name), as a shell's redirection does."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CLOEXEC | flags), "wb") as file:
        file.write(data)


def _names_a_descriptor(path: str) -> bool:
    """Whether ``path`` reaches a file through ``/proc`` (``/dev/stdout`` is a link to
    ``/proc/self/fd/1``, ``/dev/fd`` one to ``/proc/self/fd``): the name of a descriptor
    a process has open, not of a place in the file system."""
    for _ in range(40):  # (SYMLOOP_MAX)
        parent = os.path.realpath(os.path.dirname(path) or ".")
        if parent == "/proc" or parent.startswith("/proc/"):
            return True
        if not os.path.islink(path):
            return False
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    return False


def create_private(path: Path) -> None:
    """Create ``path`` as an empty file readable only by the user (0600), unless it exists
    (an existing file and its mode are left alone: the user may have chosen it).

    Why: the session store and the log hold transcripts and prompts. SQLite and
    ``logging`` create their files 0666 less the umask, 0644 for most users, which in a
    data directory that already existed with a wide mode (the 0700 one ``ensure_data_dir``
    creates protects only a new directory) let every local user read them. An empty file
    is a valid empty database, and SQLite creates the ``-wal`` and ``-shm`` files with
    the database's mode. ``OSError`` (a directory in the way, no permission) is the
    caller's to report.

    An existing file is never opened (``O_EXCL``), not even for an instant: closing any
    descriptor of a file drops every POSIX lock the process holds on it, SQLite's
    included. Opening the store's second connection once did that to the first one's
    locks, so another process opening the store could delete the WAL under it.

    A symlink to a file not made yet (the store put on another disk) gets its target
    made here, 0600: ``O_EXCL`` stops at the link, and SQLite then made the target with
    its own mode (0644), and the ``-wal`` and ``-shm`` after it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        if not os.path.islink(path) or os.path.exists(path):
            return
        try:
            fd = os.open(os.path.realpath(path), flags, 0o600)
        except FileExistsError:  # (made meanwhile; or a loop of links: SQLite says so)
            return
    os.close(fd)


class DataDirInUse(Exception):
    """Another ``serve`` holds the data directory; ``pid`` is its process id as it wrote it
    (empty if unreadable, or if the file holds anything but a number: in a data directory
    others can write to it may hold escape sequences, once printed to the terminal raw)."""

    def __init__(self, pid: str) -> None:
        super().__init__(pid)
        self.pid = pid


def lock_data_dir(data_dir: Path) -> int | None:
    """Claim ``data_dir`` for this ``serve`` process: an exclusive ``flock`` on
    ``DATA_DIR/serve.lock``, which holds this process's id. Returns the descriptor that
    holds the lock (closing it, or the process ending in any way, ``kill -9`` included,
    releases it); None where ``flock`` does not exist (Windows).

    Why: one ``serve`` per data directory. Two shared the token file (each start
    overwrote it, and the other server then refused the token it had written), the WAL
    (neither could ever restart it: it grew by gigabytes an hour) and the sessions (each
    kept its own idea of a session's turns, so prompts on one failed "already has turn N
    recorded" once the other had appended).

    The lock file is never opened through a symlink (``O_NOFOLLOW``): one planted there by
    someone who can write to a shared data directory made ``serve`` truncate the file it
    led to (any of the user's) and write its pid into it.

    Error handling: ``DataDirInUse`` when another process holds it; ``OSError`` when the
    lock file cannot be opened (``ELOOP``, said in words, for a symlink).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(data_dir / "serve.lock", flags, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise OSError(
            errno.ELOOP, "it is a symbolic link, which serve does not follow (remove it)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = os.read(fd, 32).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        raise DataDirInUse(pid if pid.isdigit() else "") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
