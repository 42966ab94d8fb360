"""Path policy: every path a session touches resolves (symlinks, ``..``, ``~``) inside a root."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from pathlib import Path

from .._json import is_name_text
from .._paths import resolve_path

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class PathEscape(ValueError):
    """A path resolves outside every allowed root (or cannot be resolved, or resolves to a
    name that is not UTF-8)."""


#: Endings that make a path name a directory (``new/``, ``sub/.``), for the OS and a shell.
_DIRECTORY_ENDINGS = tuple(f"{sep}{dots}" for sep in {"/", os.sep} for dots in ("", ".", ".."))


def directory_ending(path: str) -> str | None:
    """The ending (``/``, ``/.`` or ``/..``) that makes ``path`` name a directory, or None.

    Why: resolving drops it (``Path("new/")`` is ``new``), so a file tool given ``new/``
    wrote a file ``new`` where a directory was meant, and read ``inside.txt/`` as the
    file; the OS refuses both (``EISDIR``, ``ENOTDIR``). The file tools refuse such a
    path before resolving it."""
    return next((end for end in _DIRECTORY_ENDINGS if path.endswith(end)), None)


#: What ``TurnEnv.private`` names: the server's own files, which no tool may touch.
DATA_DIRECTORY = "data directory"
CONFIG_FILE = "config file"
_WHY_PRIVATE = {
    DATA_DIRECTORY: "it holds the token and every session",
    CONFIG_FILE: "it may hold the token",
}


def resolve_inside(
    path: str, cwd: str, roots: Iterable[str], private: Iterable[tuple[str, str]] = ()
) -> Path:
    """Resolve ``path`` (relative to ``cwd``) and check it lies inside one of ``roots`` and
    outside each of ``private`` (the server's own files: see ``TurnEnv.private``).

    Symlinks are resolved before the check, so a link pointing out of the project is caught;
    ``strict=False`` lets a not-yet-existing file (a write target) resolve through its parent.

    ``roots`` are taken as given: resolved once, when the session was opened (the manager
    stores them so). Resolving them again here let a root that had since been replaced by
    a symlink (an additional directory swapped for a link to ``/``) point anywhere.

    Error handling: a path that cannot be resolved (a symlink loop, a directory changing
    under the walk) is a :class:`PathEscape` too, not an internal error.
    """
    expanded = os.path.expanduser(path)
    try:
        # (resolve_path: a symlink loop is an error on every Python, 3.13's too.)
        candidate = resolve_path(Path(cwd, expanded))
    except (OSError, RuntimeError) as exc:  # (3.11 reports a symlink loop as RuntimeError)
        raise PathEscape(f"path {path!r} cannot be resolved: {exc}") from None
    if not is_name_text(str(candidate)):
        # (Only a symlink leads there: a client sends UTF-8. Its fs/* request and the
        # call's locations carried an escape no client can open.)
        raise PathEscape(
            f"path {path!r} resolves to {str(candidate)!r}, a path that is not UTF-8 "
            "(no client could name it)"
        )
    roots = tuple(roots)
    top = _outermost_root(candidate, roots)
    hit = _private_hit(candidate, private, top)
    if hit is not None:
        kept, what = hit
        where = "is" if what == CONFIG_FILE else "lies inside"
        raise PathEscape(
            f"path {path!r} resolves to {candidate}, which {where} the server's {what} "
            f"({kept}): no tool may use it ({_WHY_PRIVATE[what]})"
        )
    if top is not None:
        return candidate
    names = ", ".join(str(r) for r in roots)
    raise PathEscape(f"path {path!r} resolves to {candidate}, outside the allowed roots ({names})")


def _private_hit(
    candidate: Path, private: Iterable[tuple[str, str]], top: Path | None
) -> tuple[str, str] | None:
    """The entry of ``private`` that ``candidate`` (resolved) is or lies inside, by its
    path or, failing that, by what it names: the file itself or a directory above it, up
    to the root it lies in (``top``; None: outside every root, refused anyway), that is
    the same file (device and inode) as a private one.

    Why: the text alone let another name for the same file through. On a case-insensitive
    file system (macOS's default, Windows) ``Library/Application Support/PUNIE-TRIO/token``
    is the data directory's token; a bind mount is another name for a directory, a hard
    link for the config file. (A hard link to a file inside the data directory is still
    not caught: nothing names it as the server's. See docs/security.md.)"""
    private = tuple(private)
    for kept, what in private:
        if candidate.is_relative_to(kept):
            return kept, what
    if top is None:
        return None
    ids: dict[tuple[int, int], tuple[str, str]] = {}
    for kept, what in private:
        with contextlib.suppress(OSError, ValueError):
            status = os.stat(kept)
            ids[(status.st_dev, status.st_ino)] = (kept, what)
    if not ids:
        return None
    here, last = str(candidate), str(top)  # (text: this runs on every tool call, twice)
    while True:
        try:
            status = os.stat(here)
        except (OSError, ValueError):
            pass  # (a file not there yet, a directory the server may not enter)
        else:
            hit = ids.get((status.st_dev, status.st_ino))
            if hit is not None:
                return hit
        up = os.path.dirname(here)
        if here == last or up == here:
            return None
        here = up


def _outermost_root(path: Path, roots: Iterable[str]) -> Path | None:
    """The least specific of ``roots`` that ``path`` is (or lies under), or None."""
    inside = [Path(r) for r in roots if path.is_relative_to(r)]
    return min(inside, key=lambda r: len(r.parts)) if inside else None


def open_beneath(path: Path, roots: Iterable[str], flags: int, mode: int = 0o666) -> int:
    """Open ``path`` (as :func:`resolve_inside` returned it) without following a symlink on
    the way: from the outermost of ``roots`` it lies in, one directory at a time, each with
    ``O_NOFOLLOW``.
    Returns the file descriptor (close-on-exec; the caller closes it).

    Why: between the check and the open, a local process that can write in the project
    could swap a checked directory for a symlink to outside (an audit did, in 2 of 3 runs).
    A resolved path has no symlink in it, so any link met now is such a swap, and the open
    fails with :class:`PathEscape` instead of following it.

    Error handling: ``OSError`` from the walk (missing file, permissions) is raised as is;
    a symlink met on the way is a :class:`PathEscape`. Where ``os.open`` takes no
    ``dir_fd`` (not POSIX), the path is opened directly, as before this check existed.
    """
    if os.open not in os.supports_dir_fd or not hasattr(os, "O_NOFOLLOW"):
        return os.open(path, flags | _CLOEXEC, mode)
    # The outermost root containing the path: opening an inner one (an additional
    # directory) directly followed any link swapped in above it.
    root = _outermost_root(path, roots)
    if root is None:
        raise PathEscape(f"{path} is outside the allowed roots")
    parts = path.relative_to(root).parts
    directory = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
    try:
        fd = os.open(root, directory)
        for name in parts[:-1]:
            parent, fd = fd, -1
            try:
                fd = os.open(name, directory, dir_fd=parent)
            finally:
                os.close(parent)
        if not parts:
            return fd  # (the root itself: a directory, which the caller's read will refuse)
        parent, fd = fd, -1
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | _CLOEXEC, mode, dir_fd=parent)
        finally:
            os.close(parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _has_link(root, parts):
            raise PathEscape(
                f"{path} cannot be opened without following a symlink (one appeared after "
                "the path was checked, or a link loops)"
            ) from None
        raise


def _has_link(root: Path, parts: tuple[str, ...]) -> bool:
    """Whether a component of ``root / parts`` is (now) a symlink."""
    here = root
    if here.is_symlink():
        return True
    for name in parts:
        here = here / name
        if here.is_symlink():
            return True
    return False
