"""``permessage-deflate`` that stops inflating a message once it passes the size limit.

Why: Hypercorn negotiates ``permessage-deflate`` itself (wsproto's extension) and bounds a
message only once it is assembled, after wsproto has inflated every frame in full. One
compressed message of about 1 MB on the wire inflated to 1 GiB in the server (an audit:
RSS 1.2 GB, other clients stalled 1.5 s) before the 1009 close; under the default 16 MiB
limit a message could inflate to some 16 GB. This subclass inflates each frame with
zlib's ``max_length``: at most the limit plus one byte of a message is ever inflated, the
rest is dropped unread, and the connection closes with 1009 (``MESSAGE_TOO_BIG``).

Resource handling: nothing is owned. :func:`install` swaps the extension class Hypercorn
builds for each WebSocket handshake, for the whole process (idempotent), like
``_handshake.install``. The bound is the largest ``max_message_bytes`` installed in this
process (servers with a smaller one still close over-long messages, after inflating at
most the largest). If Hypercorn's internals stop matching, nothing is patched and a
warning is logged.
"""

from __future__ import annotations

import sys
import zlib
from typing import ClassVar

from hypercorn.protocol import ws_stream
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

from ._swap import swap_class


class BoundedPerMessageDeflate(PerMessageDeflate):
    """wsproto's ``PerMessageDeflate`` with inbound messages bounded by :attr:`limit`
    bytes once inflated."""

    #: Set by :func:`install`.
    limit: ClassVar[int] = 0
    #: Bytes of the current message inflated so far (set per instance once it grows).
    _inflated: int = 0
    #: The frame being read is a control frame (set per instance when one comes).
    _control: bool = False

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, length: int
    ) -> CloseReason | RsvBits:
        """A control frame is never compressed and leaves the message it interrupts as it
        was. wsproto's took a ping between two fragments for the message's kind and, at the
        ping's end, forgot the message was compressed: the fragments after it were read as
        they came, and the message failed as invalid UTF-8 (a review)."""
        self._control = opcode.iscontrol()
        if self._control:
            return CloseReason.PROTOCOL_ERROR if rsv.rsv1 else RsvBits(True, False, False)
        return super().frame_inbound_header(proto, opcode, rsv, length)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if self._control or not self._inbound_compressed or not self._inbound_is_compressible:
            return data  # not compressed: the frame reader's own bound applies
        if self._inflated > self.limit:
            return b""  # already over: the rest of the message is not inflated
        assert self._decompressor is not None
        try:
            # At most one byte over the limit: Hypercorn's own bound on the assembled
            # message then closes with 1009, with a close frame (a CloseReason returned
            # here would end the connection without one). zlib takes a C ssize_t: a
            # larger bound (the options cap it at 2**40, but ServeConfig takes any
            # integer) was an OverflowError on every compressed message, and every such
            # client lost its connection before its first answer.
            room = min(self.limit - self._inflated + 1, sys.maxsize)
            out = self._decompressor.decompress(bytes(data), room)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        return out

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if self._control:
            self._control = False
            return None
        if fin and self._inflated > self.limit:
            # Hypercorn counts characters, not bytes, so text of multi-byte characters can
            # pass its bound: the message, cut short above, must never be delivered.
            self._inflated = 0
            return CloseReason.MESSAGE_TOO_BIG
        result = super().frame_inbound_complete(proto, fin)
        if fin:
            self._inflated = 0
        return result


def install(max_message_bytes: int) -> bool:
    """Bound what one compressed message may inflate to (idempotent; the bound only grows,
    see the module). Returns False, patching nothing, if Hypercorn no longer builds its
    extension as expected."""
    swapped = swap_class(
        ws_stream,
        "PerMessageDeflate",
        PerMessageDeflate,
        BoundedPerMessageDeflate,
        "compressed WebSocket messages are unbounded",
    )
    if swapped:
        BoundedPerMessageDeflate.limit = max(BoundedPerMessageDeflate.limit, max_message_bytes)
    return swapped
