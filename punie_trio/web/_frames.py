"""Reading a WebSocket client's frames (RFC 6455 section 5), sans-I/O.

:class:`ClientFrameReader` takes the bytes a client sends after the upgrade and splits them
into the messages it decodes itself, the pongs to send, and bytes it hands on, untouched,
to a full WebSocket implementation (wsproto, under Hypercorn). It decodes every masked
frame with no reserved bits and a known opcode, within the size bound:

- text and binary messages, in one frame or fragmented (RFC 6455 section 5.4: the
  fragments are joined here, with pings between them answered as anywhere else);
- pings, answered with a :class:`Pong` item. Pings read together (one call) are answered
  with one pong, to the last of them, as section 5.5.3 allows: a client that sends pings
  faster than it reads costs one pong per socket read, not one per ping;
- pongs, dropped (the server needs nothing of them: bytes heard are what the heartbeat
  watches).

Everything else is passed on whole:

- a close frame, and everything after it;
- anything the reader would have to reject (an unmasked frame, reserved bits, an unknown
  opcode, a control frame over 125 bytes or not final, frames out of order in a
  fragmented message, a text message that is not UTF-8): that frame and everything after
  it, so the full implementation fails the connection as it would without this reader.
  Ahead of them goes a :class:`Failure` naming the close code (1002, or 1007 for text
  that is not UTF-8: checked once the message is whole, where wsproto checked fragment by
  fragment) and reason: wsproto finds the same error, but Hypercorn then closes the TCP
  connection without the close frame RFC 6455 section 7.1.7 asks for (stock Hypercorn
  0.18 too), so the caller sends it.

A message over the size bound is a ``Failure(1009)`` of the reader's own (see
:class:`ClientFrameReader`).

Bounded work per call: :meth:`ClientFrameReader.feed` decodes at most
:attr:`ClientFrameReader.step` frames (:data:`FRAMES_PER_STEP`) and keeps the rest
(:attr:`ClientFrameReader.backlog`) for the next call, so a caller that checkpoints
between calls lets other tasks run however many small frames one read brought (a flood of
tiny pings or fragments held the event loop for hundreds of milliseconds).

The bytes handed on always start on a frame boundary outside any message, so the full
implementation sees a well-formed stream in which some complete messages are missing,
and its state is the same as if it had read them. Messages, pongs and passed-on bytes come
out in the order they arrived, but for pongs: one goes once the bytes read together have
been decoded (after the messages read with its pings; ahead of a close or failure).

No I/O and no clock: :meth:`ClientFrameReader.feed` is a pure function of the bytes so far.
"""

from __future__ import annotations

import attrs

__all__ = [
    "FRAMES_PER_STEP",
    "ClientFrameReader",
    "Failure",
    "Item",
    "Pong",
    "close_frame",
    "unmask",
]

_TEXT = 0x1
_BINARY = 0x2
_CONTINUATION = 0x0
_CLOSE = 0x8
_PING = 0x9
_PONG = 0xA

#: The most frames one :meth:`ClientFrameReader.feed` call decodes (the rest waits for the
#: next call). About 0.1 ms of work for small frames; a read of ACP messages seldom holds
#: more, so the common path pays no extra scheduler pass.
FRAMES_PER_STEP = 64


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


@attrs.frozen
class Pong:
    """A :meth:`ClientFrameReader.feed` item: send a pong with this payload (the last
    ping's, exactly) here."""

    payload: bytes


Item = str | tuple[bytes] | bytearray | Failure | Pong


class ClientFrameReader:
    """Splits a client's bytes into decoded messages, pongs, and bytes for the full
    implementation.

    :meth:`feed` returns a list of items in arrival order: a ``str`` (a text message), a
    ``bytes`` wrapped in a 1-tuple (a binary message: ``(data,)``), a :class:`Pong`, a
    ``bytearray`` (raw bytes to hand on) or a :class:`Failure`. A partial frame at the end
    is kept for the next call; so are the whole frames past :attr:`step` (then
    :attr:`backlog` is true: call ``feed(b"")`` to go on).

    ``max_size`` bounds a message in bytes (one frame, or the frames of a fragmented one).
    A message over it is a ``Failure(1009)`` as soon as the header that crosses the bound
    arrives: it is neither buffered nor handed on. The reader then discards what the client
    sends (the rest of that message, further messages, pings) until its close frame, which
    it hands on with everything after it, so the full implementation finishes the closing
    handshake. (Hypercorn bounds a message in characters, not bytes: a message of 4-byte
    characters got four times the bound through, and as many bytes again in memory.)
    A fragmented message's parts are kept in one ``bytearray`` (empty fragments add
    nothing), so its memory is bounded by ``max_size`` however many fragments it has.
    """

    __slots__ = (
        "_backlog", "_buffer", "_closing", "_discard", "_message", "_opcode", "_ping",
        "_start", "done", "failure", "max_size", "step",
    )  # fmt: skip

    def __init__(self, max_size: int, step: int = FRAMES_PER_STEP) -> None:
        self.max_size = max_size
        #: The most frames one :meth:`feed` decodes.
        self.step = step
        #: Bytes not decoded yet (a partial frame, or frames past the step) from ``_start``.
        self._buffer = bytearray()
        self._start = 0
        self._backlog = False
        #: The open fragmented message's opcode (text or binary; 0: none open) and payload.
        self._opcode = 0
        self._message = bytearray()
        #: The last ping not answered yet: its mask and masked payload (None: none).
        self._ping: bytes | bytearray | None = None
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
        """Bytes received and not decoded yet (a partial frame, or a :attr:`backlog`)."""
        return len(self._buffer) - self._start

    @property
    def message_bytes(self) -> int:
        """Payload bytes of the fragmented message being joined (0: none open)."""
        return len(self._message)

    @property
    def backlog(self) -> bool:
        """Whether the last :meth:`feed` stopped at :attr:`step` frames with whole frames
        possibly left: ``feed(b"")`` decodes the next ones."""
        return self._backlog

    def feed(self, data: bytes | bytearray = b"") -> list[Item]:
        """Take ``data``; return the items it (and any backlog) completes, at most
        :attr:`step` frames' worth (then see :attr:`backlog` and :attr:`done`)."""
        if self.done:
            return [bytearray(data)] if data else []
        if self._discard and data:
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            data = data[dropped:]
        # Parse straight from ``data`` when nothing is waiting (the usual case: no copy).
        buf: bytes | bytearray
        pos = self._start
        if len(self._buffer) > pos:
            if data:
                if pos:
                    del self._buffer[:pos]
                    pos = 0
                self._buffer += data
            buf = self._buffer
        else:
            buf = data
            pos = 0
        return self._parse(buf, pos)

    def _parse(self, buf: bytes | bytearray, pos: int) -> list[Item]:
        items: list[Item] = []
        end = len(buf)
        frames = 0
        step = self.step
        self._backlog = False
        while end - pos >= 2:
            if frames >= step:
                self._backlog = True
                break
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
                frames += 1
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
            if opcode >= _CLOSE:
                if not fin or length > 125:
                    return self._give_up(items, buf, pos, "control frame fragmented or too long")
                if opcode == _CLOSE:
                    return self._give_up(items, buf, pos)
                if frame_end > end:
                    break  # wait for the rest of this frame
                if opcode == _PING:
                    self._ping = buf[pos + header : frame_end]
                frames += 1
                pos = frame_end
                continue
            # A data frame: a message, or a fragment of one. A frame that starts a message
            # while one is open, or a continuation with none open, is a protocol error.
            if (opcode == _CONTINUATION) != bool(self._opcode):
                return self._give_up(items, buf, pos, _OUT_OF_ORDER[opcode != _CONTINUATION])
            size = length + len(self._message)
            if size > self.max_size:
                self._flush_pong(items)
                # (Its size is known for a whole message in one frame; of a fragmented
                # one, what has come and this fragment.)
                whole = fin and opcode != _CONTINUATION
                sized = f"{size} bytes" if whole else f"at least {size} bytes"
                self.failure = (1009, f"message over the {self.max_size}-byte limit ({sized})")
                items.append(Failure(*self.failure))
                self._closing = True
                self._opcode = 0
                self._message = bytearray()
                continue  # the same frame again, now dropped by the closing branch
            if frame_end > end:
                break  # wait for the rest of this frame
            mask_at = pos + header
            payload = unmask(buf[mask_at + 4 : frame_end], buf[mask_at : mask_at + 4])
            frames += 1
            if not fin:
                if opcode:  # the first fragment
                    self._opcode = opcode
                self._message += payload
                pos = frame_end
                continue
            if opcode == _CONTINUATION:  # the last fragment
                opcode = self._opcode
                self._message += payload
                payload = bytes(self._message)
                self._opcode = 0
                self._message = bytearray()
            if opcode == _TEXT:
                try:
                    items.append(payload.decode())
                except UnicodeDecodeError:
                    return self._give_up(items, buf, pos, "text frame not valid UTF-8", 1007)
            else:
                items.append((payload,))
            pos = frame_end
        if not self._backlog:
            self._flush_pong(items)  # the bytes read together are decoded
        if pos >= end:
            self._buffer = bytearray()
            self._start = 0
        elif buf is self._buffer:
            self._start = pos
        else:
            self._buffer = bytearray(buf[pos:])  # kept once, however many steps it takes
            self._start = 0
        return items

    def _flush_pong(self, items: list[Item]) -> None:
        """Answer the last ping not answered yet, if any (RFC 6455 section 5.5.3)."""
        ping = self._ping
        if ping is not None:
            self._ping = None
            items.append(Pong(unmask(ping[4:], ping[:4])))

    def _give_up(
        self,
        items: list[Item],
        buf: bytes | bytearray,
        pos: int,
        error: str | None = None,
        code: int = 1002,
    ) -> list[Item]:
        """Hand on everything from ``pos`` and stop decoding for good (``error``: the frame
        at ``pos`` breaks the protocol: a :class:`Failure` goes before it). A ping read
        before it is answered first."""
        self._flush_pong(items)
        self.done = True
        self._backlog = False
        self._buffer = bytearray()
        self._start = 0
        self._message = bytearray()
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
