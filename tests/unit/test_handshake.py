"""The handshake Hypercorn parses, as ``web/_handshake.py`` wraps it: a header it cannot
read makes the handshake invalid (naming the header) instead of raising."""

from __future__ import annotations

from typing import Any

import hypercorn.protocol.ws_stream as ws_stream
from hypercorn.protocol.ws_stream import WSStream

from punie_trio.web import _handshake
from punie_trio.web._handshake import _Handshake

SOUND = [
    (b"host", b"127.0.0.1"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits"),
]


def test_a_sound_handshake_is_read_as_hypercorn_reads_it() -> None:
    handshake = _Handshake(SOUND, "1.1")
    assert handshake.is_valid()
    assert handshake.undecodable is None
    assert handshake.extensions == ["permessage-deflate; client_max_window_bits"]


def test_a_non_ascii_header_makes_the_handshake_invalid_naming_the_first() -> None:
    headers = [
        *SOUND,
        (b"Sec-WebSocket-Protocol", "acp, \u00fc".encode()),
        (b"connection", b"\xff"),
    ]
    handshake = _Handshake(headers, "2")
    assert not handshake.is_valid()
    assert handshake.undecodable == ("Sec-WebSocket-Protocol", "acp, \u00fc".encode())
    # Only that handshake: the class's own check is untouched.
    assert _Handshake(SOUND, "1.1").is_valid()


def test_install_refuses_unknown_hypercorn(monkeypatch: Any) -> None:
    class Other:
        pass

    async def plain(self: WSStream, status_code: int) -> None:
        pass  # pragma: no cover - never called

    # (Hypercorn's own, whether or not an earlier test in this process installed ours.)
    monkeypatch.setattr(WSStream, "_send_error_response", plain)
    monkeypatch.setattr(ws_stream, "Handshake", Other)
    assert not _handshake.install()
    assert ws_stream.__dict__["Handshake"] is Other
    assert WSStream.__dict__["_send_error_response"] is plain
