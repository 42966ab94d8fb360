"""Newline-delimited JSON over a Trio byte stream (stdio, pipes, sockets).

Error handling: a line longer than ``max_message_bytes`` is discarded up to its newline and
reported as :class:`MessageTooLarge`; the stream stays usable, so one bad line costs one error
answer, never the connection. A final line without a newline at EOF is still delivered
(held to the same limit).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from ._stream import HEAD_BYTES, MessageTooLarge

_CHUNK = 65536


@attrs.define(eq=False)
class NdjsonStream:
    """A :class:`MessageStream` over ``receive_stream``/``send_stream`` (they may be one object).

    Resource handling: :meth:`aclose` closes both underlying streams, idempotently.
    Error handling: a write that fails raises :class:`trio.BrokenResourceError` (the peer
    then ends the connection); the system's error behind the first is kept in
    :attr:`send_failure`, so that ``serve --stdio`` can say why the answers were lost (a
    full disk), which the connection's end alone does not tell.
    """

    receive_stream: trio.abc.ReceiveStream
    send_stream: trio.abc.SendStream
    max_message_bytes: int = 16 * 1024 * 1024
    _buffer: bytearray = attrs.field(factory=bytearray, init=False)
    _scanned: int = attrs.field(default=0, init=False)
    _discarding: bool = attrs.field(default=False, init=False)
    _head: bytes = attrs.field(default=b"", init=False)  # of the line being discarded
    _eof: bool = attrs.field(default=False, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    #: Why writing failed (the first time): the OSError behind the BrokenResourceError.
    send_failure: OSError | None = attrs.field(default=None, init=False)

    async def send_message(self, text: str) -> None:
        await self._send(text.encode() + b"\n")

    async def send_messages(self, texts: Sequence[str]) -> None:
        await self._send(("\n".join(texts) + "\n").encode())

    async def _send(self, data: bytes) -> None:
        try:
            await self.send_stream.send_all(data)
        except trio.BrokenResourceError as exc:
            if self.send_failure is None and isinstance(exc.__cause__, OSError):
                self.send_failure = exc.__cause__
            raise

    async def receive_message(self) -> bytes:
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                self._scanned = 0
                if self._discarding:
                    self._discarding = False
                    raise MessageTooLarge(self.max_message_bytes, self._head)
                if (message := self._message(line)) is not None:
                    return message
                continue
            self._scanned = len(self._buffer)
            if self._scanned > self.max_message_bytes + 1:  # (+1: a CRLF line's CR)
                # Drop what we have of the oversized line (its head aside) and skip to
                # its end.
                if not self._discarding:
                    self._head = bytes(self._buffer[:HEAD_BYTES])
                self._discarding = True
                self._buffer.clear()
                self._scanned = 0
            if self._eof:
                if self._discarding:
                    # The oversized line ends at EOF: its tail goes with it (it was once
                    # read as a message of its own, and a request hidden there was run).
                    self._discarding = False
                    self._buffer.clear()
                    self._scanned = 0
                    raise MessageTooLarge(self.max_message_bytes, self._head)
                # The last line, without its newline: bound as any line is (it was taken
                # one byte over the limit, which the cut above lets a line reach).
                rest = bytes(self._buffer)
                self._buffer.clear()
                self._scanned = 0
                if (message := self._message(rest)) is not None:
                    return message
                raise trio.EndOfChannel
            data = await self.receive_stream.receive_some(_CHUNK)
            if not data:
                self._eof = True
            else:
                self._buffer += data

    def _message(self, line: bytes) -> bytes | None:
        """The message a line (its newline taken off) holds; None for a blank line."""
        if line.endswith(b"\r"):  # CRLF: the CR is not part of the message
            line = line[:-1]
        if len(line) > self.max_message_bytes:
            raise MessageTooLarge(self.max_message_bytes, line[:HEAD_BYTES])
        return line if line and not line.isspace() else None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.send_stream.aclose()
        finally:
            if self.receive_stream is not self.send_stream:  # type: ignore[comparison-overlap]
                await self.receive_stream.aclose()


def stdio_stream(max_message_bytes: int = 16 * 1024 * 1024) -> NdjsonStream:
    """The process's stdin/stdout as an :class:`NdjsonStream`, taken over for good: from
    here on the stream holds the only descriptors of the client's pipes.

    Why: stdout must carry nothing but ACP, and stdin belongs to the client. Whatever else
    writes to fd 1 (a ``print``, a library, a process the server starts, such as the
    browser ``--open`` runs, which inherits fd 0 and 1) once went out into the ACP stream;
    a process reading stdin could take the client's requests. And closing the stream
    closed only a duplicate: fd 1 stayed open, so a client reading stdout to its end
    waited for as long as the process lived (with the HTTP server running, for good).
    So the pipes move to private descriptors (not inherited by child processes), fd 1
    becomes a copy of stderr (what is written there is seen, as a log line) and fd 0
    ``/dev/null``; closing the stream then really closes the pipes. Under ``--stdio`` the
    process's stdin and stdout are the client's; call this once, in the process that
    serves them (never in a test run's own process).
    """
    import os
    import sys

    # (os.dup makes descriptors that child processes do not inherit.) FdStream puts them
    # in non-blocking mode and restores it when it closes them.
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, 0)
        # Without a stderr at start (``2>&-``), descriptor 2 is whatever file was opened
        # next (the data directory's lock): nothing may be written into that.
        os.dup2(devnull if sys.__stderr__ is None else 2, 1)
    finally:
        os.close(devnull)
    return NdjsonStream(stdin, stdout, max_message_bytes)
