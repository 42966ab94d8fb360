"""An HTTP/2 request whose ``:method`` or ``:path`` is not ASCII, or that has no ``:path``
(a plain CONNECT), gets 400 on its own stream, instead of failing the whole connection.

Why: HTTP/2 carries the pseudo-headers as bytes, and Hypercorn decodes them with
``decode("ascii")`` as it opens the stream (``H2Protocol._create_stream``, and the scope's
``path`` in ``HTTPStream.handle``). A raw non-ASCII byte (a clumsy client's unescaped
``/über.html``) raised ``UnicodeDecodeError`` there: logged as a failed connection with its
traceback, and every other stream of that connection died with it. Over HTTP/1.1 h11
refuses such a request line with 400; RFC 9113 section 8.1.1 makes such a request
malformed, and lets the server answer it before ending the stream. So the request's own
stream is answered 400 with the reason, and ended; the connection goes on. (Only the path
before ``?`` counts: Hypercorn hands the query on as bytes.) A plain CONNECT (RFC 9113
section 8.5: ``:method`` and ``:authority`` only, a tunnel through a proxy, which this
server is not) made the same set-up read a ``raw_path`` it never set
(``UnboundLocalError``), with the same end; it gets the same 400. So does an extended
CONNECT (RFC 8441) whose ``:protocol`` is not ``websocket``: Hypercorn opened a WebSocket
for any such request, and answered 200 to a client that had asked for another protocol.

Resource handling: nothing is owned; like ``_h2_late_data.install`` it patches Hypercorn
for the whole process (idempotent), and patches nothing if Hypercorn's internals do not
match. A request body the client still sends on the answered stream is dropped as any
late data is (``_h2_late_data``).

A refused request opens no stream, so the patch keeps Hypercorn's bookkeeping of one itself:
Hypercorn says "busy" (``Updated(idle=False)``: the keep-alive timer stops) after every
request it reads, and "idle" only as a stream ends. Once the events read with a refused
request are handled, a connection left without a running stream says "idle" again (its
keep-alive timer restarts; at shutdown it is closed at once): one refused request, and
nothing after it, once held the connection open for good, and a shutdown for its whole
graceful timeout. And a refused request counts towards ``keep_alive_max_requests``.
"""

from __future__ import annotations

import logging
from typing import Any

import h2.events
from h2.errors import ErrorCodes
from hypercorn.events import Updated
from hypercorn.protocol.h2 import H2Protocol

from ._http import body_headers, printable, shown_header

log = logging.getLogger(__name__)


def _refusal(request: h2.events.RequestReceived) -> str | None:
    """Why Hypercorn could not open a stream for ``request`` (the 400's reason), or None."""
    has_path = False
    for name, value in request.headers or ():
        if name == b":path":
            has_path = True
            value = value.partition(b"?")[0]
        elif name == b":protocol":
            # (h2 lets it come with CONNECT only.) Hypercorn opened a WebSocket for any.
            if value.lower() != b"websocket":
                shown = printable(shown_header(value), 40)
                return (
                    f"the extended CONNECT's :protocol '{shown}' is not served here "
                    "(only websocket, RFC 8441)"
                )
            continue
        elif name != b":method":
            continue
        if not value.isascii():
            return f"the request's {name.decode()} is not ASCII (percent-encode it)"
    if not has_path:
        return "a request without :path (a CONNECT tunnel) is not served here"
    return None


def install() -> bool:
    """Answer a non-ASCII ``:method`` or ``:path``, or none, with 400 on its stream (idempotent).
    Returns False, patching nothing, if Hypercorn's ``H2Protocol`` changed."""
    original = getattr(H2Protocol, "_create_stream", None)
    handle_events = getattr(H2Protocol, "_handle_events", None)
    if (
        original is None
        or handle_events is None
        or not hasattr(H2Protocol, "_flush")
        or not isinstance(getattr(H2Protocol, "idle", None), property)
    ):
        log.warning("Hypercorn internals changed; a non-ASCII HTTP/2 path may fail its connection")
        return False
    if getattr(original, "punie_trio", False):
        return True

    async def _create_stream(self: H2Protocol, request: Any) -> None:
        refusal = _refusal(request)
        if refusal is None:
            await original(self, request)
            return
        body = f"Bad Request: {refusal}\n".encode()
        if self.connection.local_flow_control_window(request.stream_id) >= len(body):
            headers = [(b":status", b"400"), *body_headers(body)]
            self.connection.send_headers(request.stream_id, headers)
            self.connection.send_data(request.stream_id, body, end_stream=True)
        else:  # no room for the reason (a client that reads nothing): a bare stream error
            self.connection.reset_stream(request.stream_id, ErrorCodes.PROTOCOL_ERROR)
        await self._flush()
        self.keep_alive_requests += 1  # (as Hypercorn counts a stream it opens)
        self._punie_refused = True  # type: ignore[attr-defined]

    async def _handle_events(self: H2Protocol, events: list[Any]) -> None:
        await handle_events(self, events)
        # After Hypercorn's "busy" for the refused request (sent once _create_stream
        # returned): no stream will end to say "idle" (see the module's docstring).
        if getattr(self, "_punie_refused", False):
            self._punie_refused = False  # type: ignore[attr-defined]
            if self.idle and not self.closed:
                await self.send(Updated(idle=True))

    _create_stream.punie_trio = True  # type: ignore[attr-defined]
    H2Protocol._create_stream = _create_stream  # type: ignore[method-assign]
    H2Protocol._handle_events = _handle_events  # type: ignore[method-assign]
    return True
