"""An in-memory pair of :class:`MessageStream` endpoints, for unit tests.

The two directions are bounded memory channels (``buffer`` messages each; a full buffer makes
the sender wait, exactly like a slow socket).
"""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class MemoryMessageStream:
    _send: trio.MemorySendChannel[str]
    _receive: trio.MemoryReceiveChannel[str]

    async def send_message(self, text: str) -> None:
        await self._send.send(text)

    async def receive_message(self) -> str:
        return await self._receive.receive()

    async def aclose(self) -> None:
        # Both are idempotent; closing our send side gives the other end EndOfChannel.
        await self._send.aclose()
        await self._receive.aclose()


def memory_message_stream_pair(buffer: int = 64) -> tuple[MemoryMessageStream, MemoryMessageStream]:
    a_to_b_send, a_to_b_receive = trio.open_memory_channel[str](buffer)
    b_to_a_send, b_to_a_receive = trio.open_memory_channel[str](buffer)
    return (
        MemoryMessageStream(a_to_b_send, b_to_a_receive),
        MemoryMessageStream(b_to_a_send, a_to_b_receive),
    )
