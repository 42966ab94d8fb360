"""Path policy: every path a session touches resolves (symlinks, ``..``, ``~``) inside a root."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class PathEscape(ValueError):
    """A path resolves outside every allowed root."""


def absolute_location(path: str, cwd: str) -> str:
    """``path`` as the absolute path a tool call's ``locations`` must carry (the schema:
    "the absolute file path"): joined to ``cwd``, ``~`` expanded, ``..`` collapsed.
    Symlinks are the tool's business (``resolve_inside``); this is only for display."""
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def resolve_inside(path: str, cwd: str, roots: Iterable[str]) -> Path:
    """Resolve ``path`` (relative to ``cwd``) and check it lies inside one of ``roots``.

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
        candidate = Path(cwd, expanded).resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # (3.11 reports a symlink loop as RuntimeError)
        raise PathEscape(f"path {path!r} cannot be resolved: {exc}") from None
    allowed = [Path(r) for r in roots]
    for root in allowed:
        if candidate == root or candidate.is_relative_to(root):
            return candidate
    names = ", ".join(str(r) for r in allowed)
    raise PathEscape(f"path {path!r} resolves to {candidate}, outside the allowed roots ({names})")
