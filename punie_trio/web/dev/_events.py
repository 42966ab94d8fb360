"""Live-reload events and their Server-Sent Events wire format (sans-I/O).

Two kinds of event travel on ``/__reload__``:

* a :class:`ReloadEvent` says the served output changed. Each one bumps the server's
  *generation*; pages carry the generation they were served at, so a client that missed
  events can ask for everything after it. Generations count from 0 in every server run, so
  they are only comparable within one: every event id and every page also names the *run*
  (a random id per :class:`~._broadcast.Broadcaster`), as ``<run>.<generation>``, and a
  client from another run is reloaded whatever its generation. Reload events *merge*: a full
  ``reload`` beats a ``reload-css`` and the paths are united, so any number of missed events
  collapse into one.
* a :class:`StatusEvent` reports the build: ``build_start``, ``build_ok``, ``build_error``.
  Status is *state*, not history: only the latest one matters, so a newer one replaces an
  older one that was not delivered yet.

Everything here is pure: the functions build bytes, and the tests check them directly.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from typing import Any, Literal

import attrs

Action = Literal["reload", "reload-css"]
StatusKind = Literal["build_start", "build_ok", "build_error"]

#: How strongly each action refreshes the page; a merge keeps the stronger one.
SEVERITY: dict[str, int] = {"reload-css": 1, "reload": 2}

#: Bound on the paths one (merged) event names. Beyond it the list is cut, which is safe: the
#: client swaps every stylesheet on ``reload-css`` and reloads the page on ``reload`` anyway;
#: the paths are informative.
MAX_PATHS = 200

#: Reconnection delay the browser's EventSource uses after a dropped stream, in ms.
RETRY_MS = 1000


@attrs.frozen
class ReloadEvent:
    """The output changed at ``generation`` (merged: everything up to it)."""

    action: Action
    paths: tuple[str, ...]
    generation: int

    def merge(self, other: ReloadEvent) -> ReloadEvent:
        """Combine two pending reloads: strongest action, union of paths, newest generation."""
        action = self.action if SEVERITY[self.action] >= SEVERITY[other.action] else other.action
        paths = tuple(sorted(set(self.paths) | set(other.paths))[:MAX_PATHS])
        return ReloadEvent(action, paths, max(self.generation, other.generation))

    def data(self) -> dict[str, Any]:
        return {"action": self.action, "paths": list(self.paths), "generation": self.generation}


def merge_all(events: Iterable[ReloadEvent]) -> ReloadEvent | None:
    """Merge a run of reload events into one (``None`` for none)."""
    merged: ReloadEvent | None = None
    for event in events:
        merged = event if merged is None else merged.merge(event)
    return merged


@attrs.frozen
class StatusEvent:
    """The build's state at ``generation``: running, succeeded, or failed (with details)."""

    kind: StatusKind
    generation: int
    command: str | None = None
    exit_status: int | None = None
    output: str = ""
    duration: float | None = None

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"generation": self.generation}
        if self.command is not None:
            data["command"] = self.command
        if self.kind == "build_error":
            data["exit_status"] = self.exit_status
            data["output"] = self.output
        if self.duration is not None:
            data["duration"] = round(self.duration, 3)
        return data


Event = ReloadEvent | StatusEvent


def event_id(run: str, generation: int) -> str:
    """The SSE ``id`` (and ``?since=``) of a position: ``<run>.<generation>``."""
    return f"{run}.{generation}"


def format_event(name: str, event_id: str | None, data: dict[str, Any]) -> bytes:
    """One SSE event: ``id:``, ``event:`` and a single-line JSON ``data:`` field."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {name}")
    # json.dumps never emits a raw newline, so the data always fits one ``data:`` line.
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


@functools.lru_cache(maxsize=64)
def encode(event: Event, run: str) -> bytes:
    """Wire form of a reload or status event; the SSE ``id`` is run and generation.

    Cached: one broadcast sends the same (immutable) event to every subscriber, so it is
    serialised once, not once per client.
    """
    position = event_id(run, event.generation)
    if isinstance(event, ReloadEvent):
        return format_event("reload", position, event.data())
    return format_event(event.kind, position, event.data())


def format_comment(text: str) -> bytes:
    """An SSE comment line: ignored by EventSource, keeps proxies and sockets alive."""
    return b"".join(b": " + line.encode() + b"\n" for line in text.splitlines() or [""]) + b"\n"


def opening(retry_ms: int = RETRY_MS) -> bytes:
    """First bytes of every stream: the reconnection delay and a comment flushing headers."""
    return f"retry: {retry_ms}\n".encode() + format_comment("punie-trio live reload")


KEEPALIVE = format_comment("keepalive")


def shutdown(run: str, generation: int) -> bytes:
    """The final event of a stream when the server shuts down."""
    return format_event("shutdown", event_id(run, generation), {"generation": generation})


def parse_event_id(value: str | bytes | None) -> int | None:
    """Parse ``Last-Event-ID`` / ``?since=``; anything but a non-negative integer is ignored."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    # isascii too: isdigit() takes "²", which int() refuses.
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return int(value)


#: What a run id may be (ours are hex; anything else is ignored, not echoed anywhere).
_RUN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_since(value: str | bytes | None) -> tuple[str, int] | None:
    """Parse ``Last-Event-ID`` / ``?since=``: ``<run>.<generation>``, or a bare generation,
    which names no run (``""``): it comes from a server that had no run ids or from a client
    that read only the generation, so it cannot be told to be this run's, and gets the full
    reload that is always right. ``None`` for anything else."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    run, dot, generation = value.strip().rpartition(".")
    if dot and not _RUN.fullmatch(run):
        return None
    parsed = parse_event_id(generation)
    if parsed is None:
        return None
    return run, parsed
