"""The sans-I/O client frame reader: what it decodes, what it hands on, at any split.

Frames are made by wsproto's client-side ``FrameProtocol`` (masked, as a client sends them),
so the reader is checked against the real encoding, not against its own idea of it.
"""

from __future__ import annotations

import random

import pytest
from wsproto.frame_protocol import FrameProtocol, XorMaskerSimple

from punie_trio.web._frames import ClientFrameReader, Failure, close_frame, unmask

Item = str | tuple[bytes] | bytearray


def client() -> FrameProtocol:
    return FrameProtocol(client=True, extensions=[])


def feed_in_pieces(reader: ClientFrameReader, data: bytes, sizes: list[int]) -> list[Item]:
    """Feed ``data`` cut at ``sizes`` (cycled); return every item, raw runs joined."""
    out: list[Item] = []
    pos = 0
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        i += 1
        items = reader.feed(data[pos : pos + size])
        pos += size
        for item in items:
            if isinstance(item, bytearray) and out and isinstance(out[-1], bytearray):
                out[-1] += item
            else:
                out.append(item)
    return out


TEXTS = ["", "a", "é" * 70, "y" * 125, "y" * 126, "z" * 65_535, "z" * 65_536, "w" * 70_000]


@pytest.mark.parametrize("sizes", [[1], [2, 3, 5], [4096], [1 << 20]])
def test_messages_at_every_split(sizes: list[int]) -> None:
    proto = client()
    data = b"".join(proto.send_data(text, fin=True) for text in TEXTS)
    data += proto.send_data(b"\x00\xffbinary", fin=True)
    reader = ClientFrameReader(max_size=1 << 20)
    assert feed_in_pieces(reader, data, sizes) == [*TEXTS, (b"\x00\xffbinary",)]
    assert reader.buffered == 0
    assert not reader.done


def test_unmask_matches_wsproto() -> None:
    rng = random.Random(7)
    for n in [0, 1, 3, 4, 5, 125, 1000, 65_537]:
        payload = rng.randbytes(n)
        mask = rng.randbytes(4)
        assert unmask(payload, mask) == bytes(XorMaskerSimple(mask).process(bytearray(payload)))


def test_ping_and_pong_are_handed_on_and_reading_goes_on() -> None:
    proto = client()
    ping = proto.ping(b"hb")
    pong = proto.pong(b"x")
    data = proto.send_data("one", fin=True) + ping + pong + proto.send_data("two", fin=True)
    reader = ClientFrameReader(max_size=1000)
    items = reader.feed(data)
    assert items == ["one", bytearray(ping + pong), "two"]
    assert not reader.done


def test_a_fragmented_message_is_handed_on_whole_then_reading_resumes() -> None:
    proto = client()
    fragments = (
        proto.send_data("fir", fin=False)
        + proto.ping(b"")
        + proto.send_data("st", fin=False)
        + proto.send_data("!", fin=True)
    )
    data = proto.send_data("before", fin=True) + fragments + proto.send_data("after", fin=True)
    for sizes in ([1], [len(data)]):
        reader = ClientFrameReader(max_size=1000)
        assert feed_in_pieces(reader, data, sizes) == ["before", bytearray(fragments), "after"]
        assert not reader.done


def test_close_hands_on_everything_after_it_for_good() -> None:
    proto = client()
    close = proto.close(1000, "bye")
    later = client().send_data("late", fin=True)
    reader = ClientFrameReader(max_size=1000)
    items = reader.feed(proto.send_data("last", fin=True) + close + later)
    assert items == ["last", bytearray(close + later)]
    assert reader.done
    # From then on every byte is handed on as it is.
    assert reader.feed(b"anything") == [bytearray(b"anything")]
    assert reader.done


#: RFC 6455's example mask: fixed, so test ids and failures are the same on every run.
MASK = b"\x37\xfa\x21\x3d"


def masked_frame(first_byte: int, payload: bytes, *, masked: bool = True) -> bytes:
    mask = MASK
    n = len(payload)
    if masked:
        return bytes((first_byte, 0x80 | n)) + mask + unmask(payload, mask)
    return bytes((first_byte, n)) + payload


@pytest.mark.parametrize(
    ("name", "frame", "failure"),
    [
        ("invalid UTF-8", masked_frame(0x81, b"\xff\xfe"), (1007, "text frame not valid UTF-8")),
        ("unmasked", masked_frame(0x81, b"hi", masked=False), (1002, "client frame not masked")),
        ("reserved bit", masked_frame(0xC1, b"hi"), (1002, "reserved bits set")),
        ("unknown data opcode", masked_frame(0x83, b"hi"), (1002, "unknown opcode 0x3")),
        ("unknown control opcode", masked_frame(0x8B, b""), (1002, "unknown opcode 0xb")),
        (
            "continuation with none open",
            masked_frame(0x80, b"hi"),
            (1002, "continuation frame with no message open"),
        ),
        (
            "fragmented control frame",
            masked_frame(0x09, b""),
            (1002, "control frame fragmented or too long"),
        ),
        (
            "control frame too long",
            bytes((0x89, 0x80 | 126)) + (200).to_bytes(2, "big") + b"mask" + b"x" * 200,
            (1002, "control frame fragmented or too long"),
        ),
        (
            "length's top bit",
            bytes((0x82, 0x80 | 127)) + (1 << 63).to_bytes(8, "big") + b"mask",
            (1002, "payload length's top bit set"),
        ),
        ("close", masked_frame(0x88, b"\x03\xe8"), None),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_anything_to_reject_is_handed_on_for_good(
    name: str, frame: bytes, failure: tuple[int, str] | None
) -> None:
    """The full implementation then fails the connection with its own close code; for a
    protocol error the reader also names the code and reason (Hypercorn sends no close
    frame for those), and hands the bad frame on as an item of its own."""
    good = client().send_data("ok", fin=True)
    reader = ClientFrameReader(max_size=1000)
    items = reader.feed(good + frame + good)
    if failure is None:
        assert items == ["ok", bytearray(frame + good)], name
    else:
        assert items == ["ok", Failure(*failure), bytearray(frame + good)], name
    assert reader.done and reader.failure == failure


def test_a_protocol_error_after_a_control_frame_comes_apart_from_it() -> None:
    """The ping is handed on first (wsproto answers it), then the bad frame alone: the
    caller sends its close frame between the two, never ahead of the ping's pong."""
    ping = masked_frame(0x89, b"hb")
    bad = masked_frame(0x81, b"hi", masked=False)
    reader = ClientFrameReader(max_size=1000)
    failure = Failure(1002, "client frame not masked")
    assert reader.feed(ping + bad) == [bytearray(ping), failure, bytearray(bad)]
    assert reader.failure == (1002, "client frame not masked")


def test_close_frame() -> None:
    assert close_frame(1002, "bad") == b"\x88\x05\x03\xeabad"
    long = close_frame(1007, "é" * 100)  # 200 bytes: cut to 122, a whole character
    assert long[1] == 2 + 122 and long[4:].decode() == "é" * 61


def test_a_message_over_the_bound_fails_at_its_header_and_is_never_kept() -> None:
    """The bound is in bytes, decided by the header (Hypercorn counts characters: 4-byte
    ones got four times the bound through). Nothing of the message is kept or handed on;
    then everything but the client's close is dropped, and the close goes on with what
    follows it (wsproto finishes the closing handshake)."""
    big = client().send_data("😀" * 500, fin=True)  # 2,000 bytes, 500 characters
    reader = ClientFrameReader(max_size=1999)
    assert reader.feed(big[:10]) == [Failure(1009, "message over the 1999-byte limit")]
    assert reader.feed(big[10:1000]) == [] and reader.buffered == 0  # the rest: dropped
    ping = client().ping(b"hb")
    later = client().send_data("later", fin=True)
    close = client().close(1000)
    assert reader.feed(big[1000:] + later + ping) == []  # dropped too
    assert not reader.done
    assert reader.feed(later + close + later) == [bytearray(close + later)]
    assert reader.done and reader.failure == (1009, "message over the 1999-byte limit")


def test_a_fragmented_message_is_bounded_by_its_fragments_together() -> None:
    proto = client()
    first = proto.send_data("a" * 600, fin=False)
    second = proto.send_data("b" * 600, fin=False)
    reader = ClientFrameReader(max_size=1000)
    assert reader.feed(first) == [bytearray(first)]  # wsproto reassembles fragments
    assert reader.feed(second[:5]) == [Failure(1009, "message over the 1000-byte limit")]
    assert reader.feed(second[5:]) == []
    # Under the bound, fragments go on, and the count starts over with the next message.
    reader = ClientFrameReader(max_size=1000)
    proto = client()
    frames = [proto.send_data("a" * 500, fin=False), proto.send_data("b" * 500, fin=True)]
    frames.append(proto.send_data("c" * 1000, fin=False))
    items = reader.feed(b"".join(frames))
    assert items == [bytearray(b"".join(frames))] and reader.failure is None


def test_partial_frames_wait_and_are_not_copied_quadratically() -> None:
    frame = client().send_data("q" * 300_000, fin=True)
    reader = ClientFrameReader(max_size=1 << 20)
    for start in range(0, len(frame) - 1, 65_536):
        items = reader.feed(frame[start : min(start + 65_536, len(frame) - 1)])
        assert items == []
    assert reader.buffered == len(frame) - 1
    assert reader.feed(frame[-1:]) == ["q" * 300_000]
    assert reader.buffered == 0
