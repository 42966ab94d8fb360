"""Transports: each implements :class:`MessageStream` (send/receive one JSON-RPC text)."""

from ._memory import MemoryMessageStream, memory_message_stream_pair
from ._ndjson import NdjsonStream, stdio_stream
from ._stream import (
    HEAD_BYTES,
    BatchSender,
    MessageStream,
    MessageTooLarge,
    NotSent,
    NowSender,
)

__all__ = [
    "HEAD_BYTES",
    "BatchSender",
    "MemoryMessageStream",
    "MessageStream",
    "MessageTooLarge",
    "NdjsonStream",
    "NotSent",
    "NowSender",
    "memory_message_stream_pair",
    "stdio_stream",
]
