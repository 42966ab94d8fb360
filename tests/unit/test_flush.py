"""``Manager._flush``: what a session kept for its absent owner goes out in order, by one
sender at a time, and an item whose send fails is kept, not lost.

The connection here is a stand-in with the three send methods ``_flush`` uses: each send
waits until the test lets it finish, so the test decides the order in which senders are
let through (a real outbox does not promise first come, first served to waiting senders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

from punie_trio.hub import ActiveTurn, Manager
from punie_trio.rpc import PeerClosed
from punie_trio.worker import EchoModel


@attrs.define(eq=False)
class GatedConnection:
    """Records what it was given; each send waits for :meth:`release` (newest first when
    asked) or fails with PeerClosed once :attr:`closed`."""

    sent: list[str] = attrs.field(factory=list)
    waiting: list[tuple[str, trio.Event]] = attrs.field(factory=list)
    closed: bool = False
    # The old answers these tests hand over: the client says it awaits them.
    awaiting: frozenset[Any] = frozenset({7, "p"})
    client_id: str | None = None

    def stop_awaiting(self, request_id: Any) -> None:
        self.awaiting = self.awaiting - {request_id}

    async def send_encoded(self, text: str) -> None:
        if self.closed:
            raise PeerClosed("the client is gone")
        gate = trio.Event()
        self.waiting.append((text, gate))
        await gate.wait()
        if self.closed:
            raise PeerClosed("the client is gone")
        self.sent.append(text)

    async def send_answer(
        self, request_id: Any, result: Any, error: Any, *, aside: bool = False
    ) -> None:
        await self.send_encoded(f"answer {request_id}")

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        await self.send_encoded(method)

    def has_in_flight(self, request_id: Any) -> bool:
        return False

    def release(self, newest_first: bool = False) -> None:
        _, gate = self.waiting.pop(-1 if newest_first else 0)
        gate.set()


async def _session(manager: Manager, root: Path, conn: Any) -> Any:
    """A live session owned by ``conn`` (registered as ``_open`` does for session/new)."""
    session = manager._open(conn, "sess_1", str(root), str(root), ())
    return session


async def test_one_sender_at_a_time_keeps_the_order(tmp_path: Path) -> None:
    """A relay delivering while a re-attaching connection sends the backlog waits for the
    backlog: once it popped the next item itself and could be let through first."""
    manager = Manager((str(tmp_path),), EchoModel())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        conn = GatedConnection()
        session = await _session(manager, tmp_path, conn)
        session.pending = [("update", f"old {i}") for i in range(3)]
        nursery.start_soon(manager._flush, session, conn)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(manager._deliver, session, "new")
        for _ in range(4):
            await trio.testing.wait_all_tasks_blocked()
            conn.release(newest_first=True)  # the least convenient order
        await trio.testing.wait_all_tasks_blocked()
        assert conn.sent == ["old 0", "old 1", "old 2", "new"]
        assert session.pending == [] and session.flush_done is None
        nursery.cancel_scope.cancel()


async def test_an_item_whose_send_fails_is_kept_for_the_next_sender(tmp_path: Path) -> None:
    """The owner's connection ends while the backlog goes out: the item being sent stays at
    the front (it was once popped and lost), followed by the rest."""
    manager = Manager((str(tmp_path),), EchoModel())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        conn = GatedConnection()
        session = await _session(manager, tmp_path, conn)
        session.pending = [("update", "a"), ("update", "b"), ("answer", 7, {}, None)]
        failed: list[BaseException] = []

        async def flush() -> None:
            try:
                await manager._flush(session, conn)
            except PeerClosed as exc:
                failed.append(exc)

        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()
        conn.release()  # "a" goes out
        await trio.testing.wait_all_tasks_blocked()
        conn.closed = True
        conn.release()  # "b" fails
        await trio.testing.wait_all_tasks_blocked()
        assert failed and conn.sent == ["a"]
        assert session.pending == [("update", "b"), ("answer", 7, {}, None)]
        assert session.flush_done is None  # the next sender is not kept waiting
        nursery.cancel_scope.cancel()


async def test_reload_required_stays_owed_when_its_send_fails(tmp_path: Path) -> None:
    """The flusher is cancelled while queuing reload_required (full outbox; e.g. the
    re-attaching client drops during initialize): the notice stays owed (it was once
    cleared first, so the next connection got a gap and no notice)."""
    manager = Manager((str(tmp_path),), EchoModel())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        conn = GatedConnection()
        session = manager._open(conn, "sess_1", str(tmp_path), str(tmp_path), ())
        session.overflowed = True
        session.pending = [("answer", 7, {}, None)]
        scope = trio.CancelScope()

        async def flush() -> None:
            with scope:
                await manager._flush(session, conn)

        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()
        assert [text for text, _ in conn.waiting] == ["answer 7"]  # what was kept, first
        conn.release()
        await trio.testing.wait_all_tasks_blocked()
        assert [text for text, _ in conn.waiting] == ["_punie-trio/reload_required"]
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert session.flush_done is None and session.pending == []
        assert conn.sent == ["answer 7"]
        assert session.overflowed
        nursery.cancel_scope.cancel()


async def test_an_orphan_answer_the_client_does_not_take_in_time_is_kept(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An orphaned turn's answer to a re-attached owner that takes nothing for
    PERSIST_TIMEOUT is kept for the next flush (it was once neither sent nor kept)."""
    manager = Manager((str(tmp_path),), EchoModel())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        conn = GatedConnection()
        session = manager._open(conn, "sess_1", str(tmp_path), str(tmp_path), ())
        turn = ActiveTurn(
            1, conn, request_id="p", orphaned=True, response={"stopReason": "end_turn"}
        )
        await manager._answer_orphan(session, turn)  # the gate never opens: times out
        conn.release()  # the client catches up
        await trio.testing.wait_all_tasks_blocked()
        kept = ("answer", "p", {"stopReason": "end_turn"}, None)
        assert conn.sent == ["answer p"] or kept in session.pending
        nursery.cancel_scope.cancel()


async def test_held_updates_the_client_does_not_take_in_time_are_kept(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A turn ends while another task's flush to a slow owner is under way: what is not
    sent within PERSIST_TIMEOUT is kept, in order (it was once dropped)."""
    manager = Manager((str(tmp_path),), EchoModel())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        conn = GatedConnection()
        session = manager._open(conn, "sess_1", str(tmp_path), str(tmp_path), ())
        session.pending = [("update", "old")]
        nursery.start_soon(manager._flush, session, conn)
        await trio.testing.wait_all_tasks_blocked()
        await manager._deliver_held(session, ["held 1", "held 2"])
        while conn.waiting:
            conn.release()
            await trio.testing.wait_all_tasks_blocked()
        kept = [p[1] for p in session.pending]
        assert conn.sent + kept == ["old", "held 1", "held 2"], (conn.sent, kept)
        nursery.cancel_scope.cancel()


async def test_what_a_dropped_connection_never_wrote_goes_back_to_its_sessions(
    tmp_path: Path,
) -> None:
    """``_keep_unsent``: a session's updates, its last prompt's answer and the errors of
    its prompts refused at once go in front of its backlog, in order; answers to other
    requests, other sessions' updates and refusals do not."""
    from punie_trio.acp import updates

    manager = Manager((str(tmp_path),), EchoModel())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        conn = GatedConnection()
        mine = manager._open(conn, "sess_1", str(tmp_path), str(tmp_path), ())
        mine.answered_id = 5
        mine.pending = [("update", "kept while tearing down")]

        def update(session_id: str, n: int) -> str:
            return updates.notification_prefix(session_id) + f'{{"n":{n}}}}}}}'

        texts = [
            update("sess_1", 1),
            '{"jsonrpc":"2.0","id":4,"result":{"sessions":[]}}',  # session/list: not ours
            update("sess_other", 2),
            update("sess_1", 3),
            '{"jsonrpc":"2.0","id":5,"result":{"stopReason":"end_turn"}}',
            '{"jsonrpc":"2.0","id":6,"error":{"code":-32600,"message":"Rate limit"}}',
            '{"jsonrpc":"2.0","id":7,"error":{"code":-32600,"message":"Rate limit"}}',
            '{"jsonrpc":"2.0","id":8,"error":{"code":-32002,"message":"not found"}}',
        ]
        refused = {6: "sess_1", 7: "sess_other"}  # (8: not a refused prompt)
        manager._keep_unsent([mine], texts, refused)
        assert mine.pending == [
            ("update", texts[0]),
            ("update", texts[3]),
            ("message", texts[4], 5),
            ("message", texts[5], 6),
            ("update", "kept while tearing down"),
        ]
        nursery.cancel_scope.cancel()


async def test_an_awaited_answer_kept_after_a_timeout_is_still_delivered(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The first send of an awaited old answer times out (the client reads nothing for
    PERSIST_TIMEOUT); it is kept, and the next flush still sends it. Its id was once
    taken off the awaited list before the send, so the next flush dropped it (found in
    review)."""
    manager = Manager((str(tmp_path),), EchoModel())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        conn = GatedConnection()  # awaits "p"
        session = manager._open(conn, "sess_1", str(tmp_path), str(tmp_path), ())
        turn = ActiveTurn(
            1, conn, request_id="p", orphaned=True, response={"stopReason": "end_turn"}
        )
        await manager._answer_orphan(session, turn)  # the gate never opens: times out
        assert session.pending == [("answer", "p", {"stopReason": "end_turn"}, None)]
        assert "p" in conn.awaiting
        conn.waiting.clear()  # (the timed-out send's gate)
        nursery.start_soon(manager._deliver, session, "next update")
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if not conn.waiting:
                break
            conn.release()
        assert conn.sent == ["answer p", "next update"]
        assert "p" not in conn.awaiting and session.answered_id == "p"
        nursery.cancel_scope.cancel()


async def test_an_awaited_answer_being_flushed_is_not_refused_as_unanswerable(
    tmp_path: Path,
) -> None:
    """``refuse_unanswerable`` answers each awaited id nothing will answer. An answer a
    flush has taken (waiting for room in the outbox) is in neither the session's backlog
    nor a running turn: decided then, its id was refused, and the real answer followed
    under the same id. It waits for the flush, then finds the id answered."""
    manager = Manager((str(tmp_path),), EchoModel())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        conn = GatedConnection()  # awaits 7 and "p"
        session = await _session(manager, tmp_path, conn)
        session.pending = [("answer", "p", {"stopReason": "end_turn"}, None)]
        nursery.start_soon(manager._flush, session, conn)
        await trio.testing.wait_all_tasks_blocked()
        assert session.pending == []  # (taken, waiting for room)
        nursery.start_soon(manager.refuse_unanswerable, conn)
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if not conn.waiting:
                break
            conn.release()
        assert conn.sent == ["answer p", "answer 7"]  # 7: nothing answers it
        assert conn.awaiting == frozenset()
        nursery.cancel_scope.cancel()
