"""The sans-I/O client frame reader: what it decodes, what it hands on, at any split.

Frames are made by wsproto's client-side ``FrameProtocol`` (masked, as a client sends them),
so the reader is checked against the real encoding, not against its own idea of it.
"""

from __future__ import annotations

import os
import random

import pytest
from wsproto.frame_protocol import FrameProtocol, XorMaskerSimple

from punie_trio.web._frames import ClientFrameReader, close_frame, unmask

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


def masked_frame(first_byte: int, payload: bytes, *, masked: bool = True) -> bytes:
    mask = os.urandom(4)
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
        ("over the bound", client().send_data("x" * 1001, fin=True), None),
        ("close", masked_frame(0x88, b"\x03\xe8"), None),
    ],
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
    assert items[0] == "ok", name
    assert b"".join(items[1:]) == frame + good  # type: ignore[arg-type]
    assert reader.done and reader.failure == failure
    if failure is not None:
        assert items[-1].startswith(frame[:2])  # type: ignore[union-attr]


def test_a_protocol_error_after_a_control_frame_comes_apart_from_it() -> None:
    """The ping is handed on first (wsproto answers it), then the bad frame alone: the
    caller sends its close frame between the two, never ahead of the ping's pong."""
    ping = masked_frame(0x89, b"hb")
    bad = masked_frame(0x81, b"hi", masked=False)
    reader = ClientFrameReader(max_size=1000)
    assert reader.feed(ping + bad) == [bytearray(ping), bytearray(bad)]
    assert reader.failure == (1002, "client frame not masked")


def test_close_frame() -> None:
    assert close_frame(1002, "bad") == b"\x88\x05\x03\xeabad"
    long = close_frame(1007, "é" * 100)  # 200 bytes: cut to 122, a whole character
    assert long[1] == 2 + 122 and long[4:].decode() == "é" * 61


def test_a_message_over_the_bound_is_handed_on_from_its_header() -> None:
    big = client().send_data("x" * 2000, fin=True)
    reader = ClientFrameReader(max_size=1999)
    items = reader.feed(big[:10])  # the header alone decides
    assert items == [bytearray(big[:10])]
    assert reader.done


def test_partial_frames_wait_and_are_not_copied_quadratically() -> None:
    frame = client().send_data("q" * 300_000, fin=True)
    reader = ClientFrameReader(max_size=1 << 20)
    for start in range(0, len(frame) - 1, 65_536):
        items = reader.feed(frame[start : min(start + 65_536, len(frame) - 1)])
        assert items == []
    assert reader.buffered == len(frame) - 1
    assert reader.feed(frame[-1:]) == ["q" * 300_000]
    assert reader.buffered == 0
