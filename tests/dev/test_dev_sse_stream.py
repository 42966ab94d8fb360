"""``stream_events`` below the ASGI server: in-memory receive/send, MockClock for time."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import trio
import trio.testing

from punie_trio.web.dev._broadcast import Broadcaster
from punie_trio.web.dev._sse import stream_events


@attrs.define(eq=False)
class FakeClient:
    """The ASGI side of one request: ``receive`` blocks until :meth:`leave`; ``send`` records."""

    messages: list[dict[str, Any]] = attrs.field(factory=list)
    sent_at: list[float] = attrs.field(factory=list)
    _left: trio.Event = attrs.field(factory=trio.Event)
    _arrived: trio.Event = attrs.field(factory=trio.Event)

    async def receive(self) -> dict[str, Any]:
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        await trio.lowlevel.checkpoint()
        self.messages.append(dict(message))
        self.sent_at.append(trio.current_time())
        self._arrived.set()

    def leave(self) -> None:
        self._left.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    @property
    def ended(self) -> bool:
        return bool(self.messages) and self.messages[-1].get("more_body") is False

    async def wait_for(self, needle: bytes) -> None:
        while needle not in self.body:
            self._arrived = trio.Event()
            await self._arrived.wait()


async def test_opening_and_events() -> None:
    hub = Broadcaster()
    client = FakeClient()
    closing = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: stream_events(hub, None, client.receive, client.send, closing=closing)
        )
        await client.wait_for(b"\n\n")
        start = client.messages[0]
        assert start["status"] == 200
        assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
        assert (b"cache-control", b"no-cache") in start["headers"]
        assert client.body.startswith(b"retry: 1000\n: ")
        hub.publish_reload("reload", ("index.html",))
        await client.wait_for(b"event: reload")
        assert f'id: {hub.run}.1\nevent: reload\ndata: {{"action":"reload"'.encode() in client.body
        client.leave()
    assert client.ended
    assert hub.subscriber_count == 0


async def test_keepalive_every_interval(autojump_clock: trio.testing.MockClock) -> None:
    hub = Broadcaster()
    client = FakeClient()
    closing = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: stream_events(
                hub, None, client.receive, client.send, closing=closing, keepalive=15.0
            )
        )
        await trio.sleep(15.0 * 3 + 1)
        keepalives = [
            at
            for m, at in zip(client.messages, client.sent_at, strict=True)
            if m.get("body") == b": keepalive\n\n"
        ]
        assert len(keepalives) == 3
        gaps = [b - a for a, b in itertools.pairwise(keepalives)]
        assert all(abs(g - 15.0) < 0.01 for g in gaps)
        # An event resets the timer: no keepalive right after it.
        hub.publish_reload("reload-css", ("a.css",))
        await client.wait_for(b"reload-css")
        count = client.body.count(b"keepalive")
        await trio.sleep(14.0)
        assert client.body.count(b"keepalive") == count
        client.leave()


async def test_disconnect_removes_subscriber(autojump_clock: trio.testing.MockClock) -> None:
    hub = Broadcaster()
    client = FakeClient()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: stream_events(hub, None, client.receive, client.send, closing=trio.Event())
            )
            await client.wait_for(b"\n\n")
            assert hub.subscriber_count == 1
            client.leave()
    assert hub.subscriber_count == 0
    assert client.ended  # the response was still ended (shielded final send)


async def test_closing_ends_streams_with_shutdown_event() -> None:
    hub = Broadcaster()
    closing = trio.Event()
    clients = [FakeClient() for _ in range(3)]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(
                    lambda c=client: stream_events(hub, None, c.receive, c.send, closing=closing)
                )
            for client in clients:
                await client.wait_for(b"\n\n")
            closing.set()
    for client in clients:
        assert client.ended
        assert client.body.endswith(b'event: shutdown\ndata: {"generation":0}\n\n')
    assert hub.subscriber_count == 0


async def test_catch_up_from_since() -> None:
    hub = Broadcaster()
    hub.publish_reload("reload-css", ("a.css",))  # generation 1: the page has this
    hub.publish_reload("reload-css", ("b.css",))
    hub.publish_reload("reload", ("index.html",))
    client = FakeClient()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: stream_events(hub, 1, client.receive, client.send, closing=trio.Event())
        )
        await client.wait_for(b"event: reload")
        client.leave()
    assert (
        f"id: {hub.run}.3\n".encode()
        + b'event: reload\ndata: {"action":"reload","paths":["b.css","index.html"],'
        b'"generation":3}\n\n'
    ) in client.body
    assert client.body.count(b"event: reload") == 1  # merged, not replayed one by one


async def test_slow_subscriber_does_not_block_others() -> None:
    """A subscriber whose send is stuck only accumulates merged state."""
    hub = Broadcaster()
    stuck = trio.Event()
    got_third = trio.Event()
    slow_messages: list[Any] = []

    async def slow_send(message: Any) -> None:
        slow_messages.append(message)
        if len(slow_messages) == 3:
            got_third.set()
        if len(slow_messages) >= 2:
            await stuck.wait()

    async def never_leaves() -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError

    fast = FakeClient()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: stream_events(hub, None, never_leaves, slow_send, closing=trio.Event())
        )
        nursery.start_soon(
            lambda: stream_events(hub, None, fast.receive, fast.send, closing=trio.Event())
        )
        await fast.wait_for(b"\n\n")
        for i in range(50):
            hub.publish_reload("reload-css" if i % 2 else "reload", (f"{i}.css",))
            await fast.wait_for(f"id: {hub.run}.{i + 1}\n".encode())
        assert len(slow_messages) == 2  # stuck on its opening, never growing a queue
        stuck.set()
        await got_third.wait()
        # Everything it missed arrives as one merged event: the strongest action, all paths.
        merged = slow_messages[2]["body"]
        assert merged.startswith(f"id: {hub.run}.50\n".encode() + b'event: reload\ndata: {"action"')
        assert merged.count(b".css") == 50
        fast.leave()
        nursery.cancel_scope.cancel()
