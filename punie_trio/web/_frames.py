"""Reading a WebSocket client's frames (RFC 6455 section 5), sans-I/O: the common case only.

:class:`ClientFrameReader` takes the bytes a client sends after the upgrade and splits them
into whole messages it decodes itself and bytes it hands on, untouched, to a full WebSocket
implementation (wsproto, under Hypercorn). It decodes only what is both common and simple:
a final (unfragmented), masked text or binary frame with no reserved bits, within the size
bound. Everything else is passed on whole:

- ping and pong frames, one frame at a time (the reader carries on after them);
- a fragmented message, frame by frame, until its final continuation frame has passed;
- a close frame, and everything after it;
- anything the reader would have to reject (an unmasked frame, reserved bits, an unknown
  opcode, a text frame that is not UTF-8): that frame and everything after it, so the
  full implementation fails the connection as it would without this reader. Ahead of
  them goes a :class:`Failure` naming the close code (1002, or 1007 for text that is not
  UTF-8) and reason: wsproto finds the same error, but Hypercorn then closes the TCP
  connection without the close frame RFC 6455 section 7.1.7 asks for (stock Hypercorn
  0.18 too), so the caller sends it.

A message over the size bound is a ``Failure(1009)`` of the reader's own (see
:class:`ClientFrameReader`).

The bytes handed on always start on a frame boundary and hold whole frames (but after
"everything after it", which ends the reader's part), so the full implementation sees a
well-formed stream in which some complete messages are missing, and its state is the same
as if it had read them. Messages and passed-on bytes come out in the order they arrived.

No I/O and no clock: :meth:`ClientFrameReader.feed` is a pure function of the bytes so far.
"""

from __future__ import annotations

import attrs

__all__ = ["ClientFrameReader", "Failure", "Item", "close_frame", "unmask"]

_TEXT = 0x1
_BINARY = 0x2
_CONTINUATION = 0x0
_CLOSE = 0x8
_PING = 0x9
_PONG = 0xA


def unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """``payload`` XOR the 4-byte ``mask`` repeated (RFC 6455 section 5.3).

    One big-integer XOR: linear in the size and done in C, much cheaper than a Python loop
    and cheaper than wsproto's four ``translate`` passes for the small frames ACP sends.
    """
    n = len(payload)
    if n == 0:
        return b""
    key = (bytes(mask) * ((n + 3) // 4))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def close_frame(code: int, reason: str) -> bytes:
    """One unmasked close frame (RFC 6455 section 5.5.1), as a server sends it; ``reason``
    is cut to the 123 bytes a control frame leaves it (whole characters only)."""
    data = reason.encode()[:123].decode(errors="ignore").encode()
    return bytes((0x88, 2 + len(data))) + code.to_bytes(2, "big") + data


@attrs.frozen
class Failure:
    """A :meth:`ClientFrameReader.feed` item: fail the connection here, with this close code
    and reason (the caller sends the close frame, in order with the other items)."""

    code: int
    reason: str


Item = str | tuple[bytes] | bytearray | Failure


class ClientFrameReader:
    """Splits a client's bytes into decoded messages and bytes for the full implementation.

    :meth:`feed` returns a list of items in arrival order: a ``str`` (a text message), a
    ``bytes`` wrapped in a 1-tuple (a binary message: ``(data,)``), a ``bytearray`` (raw
    bytes to hand on) or a :class:`Failure`. A partial frame at the end is kept for the next
    call.

    ``max_size`` bounds a message in bytes (one frame, or the frames of a fragmented one).
    A message over it is a ``Failure(1009)`` as soon as the header that crosses the bound
    arrives: it is neither buffered nor handed on. The reader then discards what the client
    sends (the rest of that message, further messages, pings) until its close frame, which
    it hands on with everything after it, so the full implementation finishes the closing
    handshake. (Hypercorn bounds a message in characters, not bytes: a message of 4-byte
    characters got four times the bound through, and as many bytes again in memory.)
    """

    __slots__ = (
        "_buffer", "_closing", "_discard", "_fragment_bytes", "_fragmented", "done", "failure",
        "max_size",
    )  # fmt: skip

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._fragmented = False
        #: Payload bytes of the open fragmented message so far.
        self._fragment_bytes = 0
        #: After a message over the bound: everything but a close frame is dropped.
        self._closing = False
        #: Bytes of a dropped frame still to come.
        self._discard = 0
        #: True once the reader has handed on everything from the first frame it would not
        #: take: from then on every byte goes to the full implementation.
        self.done = False
        #: The close code and reason of the :class:`Failure` given (None: none was).
        self.failure: tuple[int, str] | None = None

    @property
    def buffered(self) -> int:
        """Bytes of a partial frame waiting for the rest."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> list[Item]:
        """Take ``data``; return the items it completes (then see :attr:`done`)."""
        if self.done:
            return [bytearray(data)]
        items: list[Item] = []
        if self._discard:
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            if dropped == len(data):
                return items
            data = data[dropped:]
        # Parse straight from ``data`` when nothing is waiting (the usual case: no copy).
        buf: bytes | bytearray
        if self._buffer:
            self._buffer += data
            buf = self._buffer
        else:
            buf = data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                header = 4
                if end - pos < header:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            elif length == 127:
                header = 10
                if end - pos < header:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if length >> 63:  # (closing: handed on plainly, wsproto fails it)
                    error = None if self._closing else "payload length's top bit set"
                    return self._give_up(items, buf, pos, error)
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            frame_end = pos + header + 4 + length
            if self._closing:
                # Failed for its size: drop all but the client's close (or anything
                # malformed), which goes on to close the connection.
                if opcode == _CLOSE or b0 & 0x70 or not b1 & 0x80 or opcode > _PONG:
                    return self._give_up(items, buf, pos)
                if frame_end > end:
                    self._discard = frame_end - end
                    pos = end
                    break
                pos = frame_end
                continue
            if b0 & 0x70:
                return self._give_up(items, buf, pos, "reserved bits set")
            if not b1 & 0x80:
                return self._give_up(items, buf, pos, "client frame not masked")
            if opcode > _PONG or _BINARY < opcode < _CLOSE:
                return self._give_up(items, buf, pos, f"unknown opcode {opcode:#x}")
            if opcode >= _CLOSE and (not fin or length > 125):
                return self._give_up(items, buf, pos, "control frame fragmented or too long")
            if opcode == _CLOSE:
                return self._give_up(items, buf, pos)
            if opcode < _CLOSE:
                size = length + self._fragment_bytes if opcode == _CONTINUATION else length
                if size > self.max_size:
                    self.failure = (1009, f"message over the {self.max_size}-byte limit")
                    items.append(Failure(*self.failure))
                    self._closing = True
                    continue  # the same frame again, now dropped by the closing branch
            else:
                size = 0
            if frame_end > end:
                break  # wait for the rest of this frame
            if opcode >= _CLOSE or self._fragmented or not fin:
                # Ping/pong, or a frame of a fragmented message: the full implementation
                # takes it (it answers pings, reassembles fragments). A data frame that
                # starts a message while one is open, or a continuation with none open, is
                # a protocol error.
                if opcode < _CLOSE:
                    if (opcode == _CONTINUATION) != self._fragmented:
                        return self._give_up(items, buf, pos, _OUT_OF_ORDER[opcode != 0])
                    self._fragmented = not fin
                    self._fragment_bytes = size if not fin else 0
                _append_raw(items, bytearray(buf[pos:frame_end]))
                pos = frame_end
                continue
            if opcode == _CONTINUATION:
                return self._give_up(items, buf, pos, _OUT_OF_ORDER[False])
            mask_at = pos + header
            payload = unmask(buf[mask_at + 4 : frame_end], buf[mask_at : mask_at + 4])
            if opcode == _TEXT:
                try:
                    items.append(payload.decode())
                except UnicodeDecodeError:
                    return self._give_up(items, buf, pos, "text frame not valid UTF-8", 1007)
            else:
                items.append((payload,))
            pos = frame_end
        if pos == 0:
            if buf is not self._buffer:
                self._buffer = bytearray(buf)  # a partial frame, kept (not copied again)
        elif pos < end:
            self._buffer = bytearray(buf[pos:])
        else:
            self._buffer = bytearray()
        return items

    def _give_up(
        self,
        items: list[Item],
        buf: bytes | bytearray,
        pos: int,
        error: str | None = None,
        code: int = 1002,
    ) -> list[Item]:
        """Hand on everything from ``pos`` and stop decoding for good (``error``: the frame
        at ``pos`` breaks the protocol: a :class:`Failure` goes before it)."""
        self.done = True
        self._buffer = bytearray()
        if error is None:
            _append_raw(items, bytearray(buf[pos:]))
        else:  # kept apart from raw bytes before it: the close frame goes between them
            self.failure = (code, error)
            items.append(Failure(code, error))
            items.append(bytearray(buf[pos:]))
        return items


#: Why a data frame is out of order, by whether it starts a message (opcode not 0).
_OUT_OF_ORDER = {
    False: "continuation frame with no message open",
    True: "new message inside a fragmented one",
}


def _append_raw(items: list[Item], raw: bytearray) -> None:
    """Add ``raw`` to the bytes to hand on, joining it to the previous item if that is raw
    too (consecutive control frames go to the full implementation in one piece)."""
    if items and isinstance(items[-1], bytearray):
        items[-1] += raw
    elif raw:
        items.append(raw)
