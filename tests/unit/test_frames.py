"""The sans-I/O client frame reader: what it decodes, what it hands on, at any split.

Frames are made by wsproto's client-side ``FrameProtocol`` (masked, as a client sends them),
so the reader is checked against the real encoding, not against its own idea of it.
"""

from __future__ import annotations

import random

import pytest
from wsproto.frame_protocol import FrameProtocol, XorMaskerSimple

from punie_trio.web._frames import (
    FRAMES_PER_STEP,
    ClientFrameReader,
    Failure,
    Pong,
    close_frame,
    unmask,
)

Item = str | tuple[bytes] | bytearray | Failure | Pong


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


def test_pings_read_together_get_one_pong_to_the_last() -> None:
    """RFC 6455 section 5.5.3: an endpoint may answer only the most recent of the pings it
    has not answered yet. One pong per read, its payload the last ping's, byte for byte;
    the client's pongs are dropped; messages around them come through in order."""
    proto = client()
    data = (
        proto.send_data("one", fin=True)
        + proto.ping(b"hb")
        + proto.pong(b"x")
        + proto.ping(b"")
        + proto.send_data("two", fin=True)
        + proto.ping(bytes(range(125)))
        + proto.ping(b"\x00last\xff")
        + proto.send_data("three", fin=True)
    )
    reader = ClientFrameReader(max_size=1000)
    assert reader.feed(data) == ["one", "two", "three", Pong(b"\x00last\xff")]
    assert not reader.done and reader.buffered == 0
    assert reader.feed(proto.ping(bytes(range(125)))) == [Pong(bytes(range(125)))]


def test_each_read_answers_its_own_pings() -> None:
    """A ping whose frame completes in a later read is answered in that read: no ping goes
    unanswered while its pong could be sent, and a partial ping is not answered early."""
    proto = client()
    first, second = proto.ping(b"first"), proto.ping(b"second")
    reader = ClientFrameReader(max_size=1000)
    assert reader.feed(first + second[:3]) == [Pong(b"first")]
    assert reader.feed(second[3:]) == [Pong(b"second")]
    assert reader.feed(proto.pong(b"unsolicited")) == []


@pytest.mark.parametrize("sizes", [[1], [2, 3, 5], [7], [1 << 20]])
def test_pings_at_every_split_are_each_answered_once_complete(sizes: list[int]) -> None:
    proto = client()
    pings = [proto.ping(b"p%d" % i) for i in range(20)]
    out = feed_in_pieces(ClientFrameReader(max_size=1000), b"".join(pings), sizes)
    # Never a pong for a ping not read yet, the last one always answered, none twice.
    assert out[-1] == Pong(b"p19")
    assert all(isinstance(item, Pong) for item in out)
    numbers = [int(item.payload[1:]) for item in out if isinstance(item, Pong)]
    assert numbers == sorted(set(numbers))


def test_a_fragmented_message_is_joined_with_pings_between_answered() -> None:
    proto = client()
    fragments = (
        proto.send_data("fir", fin=False)
        + proto.ping(b"mid")
        + proto.send_data("", fin=False)
        + proto.send_data("st", fin=False)
        + proto.send_data("!", fin=True)
    )
    data = proto.send_data("before", fin=True) + fragments + proto.send_data("after", fin=True)
    reader = ClientFrameReader(max_size=1000)
    assert reader.feed(data) == ["before", "first!", "after", Pong(b"mid")]
    assert not reader.done and reader.buffered == 0
    # Cut anywhere, the same messages; the pong goes with the read that completed its ping.
    reader = ClientFrameReader(max_size=1000)
    assert feed_in_pieces(reader, data, [1]) == ["before", Pong(b"mid"), "first!", "after"]
    assert not reader.done


def test_fragments_binary_and_text_split_inside_a_character() -> None:
    proto = client()
    encoded = "é😀".encode()  # one fragment a byte: split inside both characters
    data = (
        proto.send_data(b"\x00", fin=False)
        + proto.send_data(b"\xff", fin=True)
        + b"".join(
            masked_frame(0x00 if i else 0x01, encoded[i : i + 1]) for i in range(len(encoded) - 1)
        )
        + masked_frame(0x80, encoded[-1:])
    )
    for sizes in ([1], [len(data)]):
        reader = ClientFrameReader(max_size=1000)
        assert feed_in_pieces(reader, data, sizes) == [(b"\x00\xff",), "é😀"]


def test_a_fragmented_text_message_not_utf8_fails_1007_when_whole() -> None:
    """Checked once the message is whole (wsproto checked fragment by fragment)."""
    first = masked_frame(0x01, b'{"a":"\xc3')
    last = masked_frame(0x80, b'\x28"}')
    after = client().send_data("ok", fin=True)
    reader = ClientFrameReader(max_size=1000)
    assert reader.feed(first) == []
    items = reader.feed(last + after)
    assert items == [Failure(1007, "text frame not valid UTF-8"), bytearray(last + after)]
    assert reader.done


@pytest.mark.parametrize(
    ("name", "frames", "reason"),
    [
        ("continuation first", [(0x80, b"x")], "continuation frame with no message open"),
        ("text inside", [(0x01, b"a"), (0x81, b"b")], "new message inside a fragmented one"),
        ("binary inside", [(0x02, b"a"), (0x02, b"b")], "new message inside a fragmented one"),
    ],
)
def test_fragments_out_of_order_fail_1002(
    name: str, frames: list[tuple[int, bytes]], reason: str
) -> None:
    data = b"".join(masked_frame(b0, payload) for b0, payload in frames)
    last = masked_frame(*frames[-1])
    reader = ClientFrameReader(max_size=1000)
    assert reader.feed(data) == [Failure(1002, reason), bytearray(last)], name
    assert reader.done


def test_a_close_inside_a_fragmented_message_goes_on_after_the_pong() -> None:
    first = masked_frame(0x01, b"half")
    ping = masked_frame(0x89, b"p")
    close = masked_frame(0x88, b"\x03\xe8")
    reader = ClientFrameReader(max_size=1000)
    assert reader.feed(first + ping + close) == [Pong(b"p"), bytearray(close)]
    assert reader.done and reader.failure is None


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
    """The ping is answered first, then the bad frame goes on alone: the caller sends its
    close frame between the two, never ahead of the ping's pong."""
    ping = masked_frame(0x89, b"hb")
    bad = masked_frame(0x81, b"hi", masked=False)
    reader = ClientFrameReader(max_size=1000)
    failure = Failure(1002, "client frame not masked")
    assert reader.feed(ping + bad) == [Pong(b"hb"), failure, bytearray(bad)]
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
    why = "message over the 1999-byte limit (2000 bytes)"  # (one frame: its size is known)
    assert reader.feed(big[:10]) == [Failure(1009, why)]
    assert reader.feed(big[10:1000]) == [] and reader.buffered == 0  # the rest: dropped
    ping = client().ping(b"hb")
    later = client().send_data("later", fin=True)
    close = client().close(1000)
    assert reader.feed(big[1000:] + later + ping) == []  # dropped too
    assert not reader.done
    assert reader.feed(later + close + later) == [bytearray(close + later)]
    assert reader.done and reader.failure == (1009, why)


def test_a_fragmented_message_is_bounded_by_its_fragments_together() -> None:
    proto = client()
    first = proto.send_data("a" * 600, fin=False)
    second = proto.send_data("b" * 600, fin=False)
    reader = ClientFrameReader(max_size=1000)
    assert reader.feed(first) == [] and reader.buffered == 0  # kept as the message so far
    why = "message over the 1000-byte limit (at least 1200 bytes)"  # (more may follow)
    assert reader.feed(second[:5]) == [Failure(1009, why)]
    assert reader.feed(second[5:]) == []
    # Under the bound, fragments go on, and the count starts over with the next message.
    reader = ClientFrameReader(max_size=1000)
    proto = client()
    frames = [proto.send_data("a" * 500, fin=False), proto.send_data("b" * 500, fin=True)]
    frames.append(proto.send_data("c" * 1000, fin=False))
    frames.append(proto.send_data("", fin=True))
    items = reader.feed(b"".join(frames))
    assert items == ["a" * 500 + "b" * 500, "c" * 1000] and reader.failure is None


def test_partial_frames_wait_and_are_not_copied_quadratically() -> None:
    frame = client().send_data("q" * 300_000, fin=True)
    reader = ClientFrameReader(max_size=1 << 20)
    for start in range(0, len(frame) - 1, 65_536):
        items = reader.feed(frame[start : min(start + 65_536, len(frame) - 1)])
        assert items == []
    assert reader.buffered == len(frame) - 1
    assert reader.feed(frame[-1:]) == ["q" * 300_000]
    assert reader.buffered == 0


# -- Bounded work per call ------------------------------------------------------------------


def test_a_call_decodes_at_most_step_frames_and_keeps_the_rest() -> None:
    """200 pings and 10 messages read at once: 64 frames per call (the caller checkpoints
    between calls), the backlog kept in order, one pong once the read is all decoded."""
    proto = client()
    pings = b"".join(proto.ping(b"%d" % i) for i in range(200))
    texts = b"".join(proto.send_data(f"m{i}", fin=True) for i in range(10))
    partial = proto.send_data("next", fin=True)
    reader = ClientFrameReader(max_size=1000)
    assert reader.step == FRAMES_PER_STEP == 64
    assert reader.feed() == [] and not reader.backlog  # nothing pending: a no-op
    data = texts + pings + partial[:3]
    calls = [reader.feed(data)]
    while reader.backlog:
        assert reader.buffered > 3
        calls.append(reader.feed())
    assert [len(call) for call in calls] == [10, 0, 0, 1]  # 210 frames: 64, 64, 64, 18
    assert calls[0] == [f"m{i}" for i in range(10)] and calls[-1] == [Pong(b"199")]
    assert reader.buffered == 3  # the partial frame waits
    assert reader.feed(partial[3:]) == ["next"] and not reader.backlog


def test_new_bytes_behind_a_backlog_keep_their_order() -> None:
    proto = client()
    reader = ClientFrameReader(max_size=1 << 20, step=2)
    first = b"".join(proto.send_data(f"a{i}", fin=True) for i in range(5))
    assert reader.feed(first) == ["a0", "a1"] and reader.backlog
    assert reader.feed(proto.send_data("b", fin=True)) == ["a2", "a3"]
    assert reader.feed() == ["a4", "b"] and not reader.backlog
    assert reader.feed() == [] and reader.buffered == 0


def test_a_fragment_flood_takes_bounded_memory_and_steps() -> None:
    """One message in 3,001 frames (1,000 of them empty), reassembled a step at a time; its
    parts are joined in one buffer as they come."""
    frames = [masked_frame(0x01, b"[")]
    for _ in range(1000):
        frames += [masked_frame(0x00, b"1"), masked_frame(0x00, b""), masked_frame(0x00, b",")]
    frames.append(masked_frame(0x80, b"0]"))
    reader = ClientFrameReader(max_size=1 << 20)
    calls = [reader.feed(b"".join(frames))]
    while reader.backlog:
        calls.append(reader.feed())
    assert len(calls) == -(-len(frames) // FRAMES_PER_STEP)
    assert calls[-1] == ["[" + "1," * 1000 + "0]"]
    assert all(call == [] for call in calls[:-1])
