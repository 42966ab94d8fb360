"""HTTP/2 data that arrives for a stream Hypercorn has already closed is dropped, not fatal.

Why: a stream may answer before its request body has all arrived (a 413 for an oversized
body, a refused WebSocket handshake whose client sent frames before reading the refusal).
Hypercorn then forgets the stream, and its ``H2Protocol._handle_events`` looks up every
later ``DataReceived`` in ``self.streams`` unguarded: ``KeyError``, logged as a failed
connection with its traceback, and every other stream of that connection dies with it.
Any client that speaks HTTP/2 with prior knowledge could do that at will. (Hypercorn
guards the same lookup for ``StreamEnded``; the fix for ``DataReceived`` is upstream
pull requests #312, #334 and #365, not in 0.18.)

:func:`install` gives each ``H2Protocol`` a stream table whose missing entries read as a
stream that ignores every event. Only subscripting changes: ``in``, ``get`` and ``pop``
behave as on a dict, so Hypercorn's own bookkeeping is untouched, and the data is still
acknowledged for flow control (the next line of Hypercorn's handler), as the upstream fix
does.

Resource handling: nothing is owned; like ``_handshake.install`` it patches Hypercorn for
the whole process (idempotent), and patches nothing if Hypercorn's internals do not match.
"""

from __future__ import annotations

import logging
from typing import Any

from hypercorn.protocol.h2 import H2Protocol

log = logging.getLogger(__name__)


class _Gone:
    """A stream Hypercorn has closed: whatever still arrives for it goes nowhere."""

    async def handle(self, event: object) -> None:
        return None


_GONE = _Gone()


class _Streams(dict[int, Any]):
    """``H2Protocol.streams``, reading a missing stream as :data:`_GONE`."""

    def __missing__(self, stream_id: int) -> _Gone:
        return _GONE


def install() -> bool:
    """Make late HTTP/2 data harmless (idempotent). Returns False, patching nothing, if
    Hypercorn's ``H2Protocol`` no longer keeps its streams in ``self.streams``."""
    original = H2Protocol.__init__
    if getattr(original, "punie_trio", False):
        return True

    def __init__(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        streams = getattr(self, "streams", None)
        if type(streams) is dict:
            self.streams = _Streams(streams)

    probe = getattr(H2Protocol, "_handle_events", None)
    if probe is None:
        log.warning("Hypercorn internals changed; late HTTP/2 data may fail its connection")
        return False
    __init__.punie_trio = True  # type: ignore[attr-defined]
    H2Protocol.__init__ = __init__  # type: ignore[method-assign]
    return True
