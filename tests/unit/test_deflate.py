"""``BoundedPerMessageDeflate`` driven through wsproto's own frame parser (no server): a
compressed message inflates to at most the limit plus one byte, and one over the limit is
never handed on whole or cut short."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import pytest
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode, ParseFailed

from punie_trio.web._deflate import BoundedPerMessageDeflate

LIMIT = 64 * 1024


@pytest.fixture
def bounded(monkeypatch: pytest.MonkeyPatch) -> Iterator[BoundedPerMessageDeflate]:
    monkeypatch.setattr(BoundedPerMessageDeflate, "limit", LIMIT)
    extension = BoundedPerMessageDeflate()
    extension.finalize("permessage-deflate")  # as the server's handshake accepts it
    yield extension


def compressed_frame(text: str, *, masked: bool = True) -> bytes:
    """One final text frame holding ``text`` deflated (RFC 7692: RSV1 set, the empty
    block's tail dropped), masked as a client's frames are."""
    deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    payload = deflate.compress(text.encode()) + deflate.flush(zlib.Z_SYNC_FLUSH)
    payload = payload[:-4]
    client = FrameProtocol(client=True, extensions=[])
    frame = client._serialize_frame(Opcode.TEXT, payload, fin=True)
    return bytes([frame[0] | 0x40]) + frame[1:]  # RSV1: compressed


def parse(extension: BoundedPerMessageDeflate, data: bytes) -> tuple[str, bool]:
    server = FrameProtocol(client=False, extensions=[extension])
    server.receive_bytes(data)
    text, finished = "", False
    for frame in server.received_frames():
        text += frame.payload
        finished = finished or frame.frame_finished
    return text, finished


def test_a_message_under_the_limit_is_inflated_whole(bounded: BoundedPerMessageDeflate) -> None:
    text = '{"jsonrpc": "2.0"}' + "x" * (LIMIT - 100)
    assert parse(bounded, compressed_frame(text)) == (text, True)


def test_a_bomb_inflates_no_more_than_the_limit_and_never_finishes(
    bounded: BoundedPerMessageDeflate,
) -> None:
    inflated: list[int] = []
    with pytest.raises(ParseFailed) as info:
        server = FrameProtocol(client=False, extensions=[bounded])
        server.receive_bytes(compressed_frame("a" * (64 * LIMIT)))
        for frame in server.received_frames():
            inflated.append(len(frame.payload))
            assert not frame.message_finished
    assert info.value.code == CloseReason.MESSAGE_TOO_BIG
    assert sum(inflated) <= LIMIT + 1


def test_multibyte_text_over_the_limit_is_refused_at_its_end(
    bounded: BoundedPerMessageDeflate,
) -> None:
    """Hypercorn's own bound counts characters: 3-byte characters can pass it with bytes
    over the limit, so the extension itself refuses the message when it ends."""
    text = "\u20ac" * LIMIT  # 3 bytes each: three times the limit in bytes
    with pytest.raises(ParseFailed) as info:
        parse(bounded, compressed_frame(text))
    assert info.value.code == CloseReason.MESSAGE_TOO_BIG


def test_a_ping_between_compressed_fragments_leaves_the_message_compressed(
    bounded: BoundedPerMessageDeflate,
) -> None:
    """A control frame may come between a message's fragments (RFC 6455 5.4). wsproto's
    extension took the ping for the message's kind and forgot, at its end, that the message
    was compressed: the fragments after it were read as they came (a review)."""
    text = '{"jsonrpc": "2.0", "x": "' + "abc" * 2000 + '"}'
    deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    payload = (deflate.compress(text.encode()) + deflate.flush(zlib.Z_SYNC_FLUSH))[:-4]
    third = len(payload) // 3
    client = FrameProtocol(client=True, extensions=[])
    first = client._serialize_frame(Opcode.TEXT, payload[:third], fin=False)
    data = (
        bytes([first[0] | 0x40]) + first[1:]  # RSV1 on the first frame only
        + client._serialize_frame(Opcode.PING, b"a")
        + client._serialize_frame(Opcode.CONTINUATION, payload[third : 2 * third], fin=False)
        + client._serialize_frame(Opcode.PING, b"b")
        + client._serialize_frame(Opcode.CONTINUATION, payload[2 * third :], fin=True)
    )  # fmt: skip
    server = FrameProtocol(client=False, extensions=[bounded])
    server.receive_bytes(data)
    message, pings = "", []
    for frame in server.received_frames():
        if frame.opcode is Opcode.PING:
            pings.append(frame.payload)
        else:
            message += frame.payload
    assert pings == [b"a", b"b"]
    assert message == text
