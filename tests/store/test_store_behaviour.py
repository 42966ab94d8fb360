"""The store contract, run against every implementation (``store`` is parametrised)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trio

from punie_trio.store import (
    STOP,
    SessionRecord,
    Store,
    StoreError,
    TranscriptEntry,
    UnknownSessionError,
)

from .conftest import StepClock, make_record, sample_turn, text_update


async def test_create_and_get_round_trip(store: Store) -> None:
    rec = make_record(title="hello", turns=0)
    await store.create_session(rec)
    assert await store.get_session("s1") == rec
    assert await store.get_session("nope") is None


async def test_duplicate_id_is_an_error(store: Store) -> None:
    await store.create_session(make_record())
    with pytest.raises(StoreError, match="already exists"):
        await store.create_session(make_record(title="other"))
    got = await store.get_session("s1")
    assert got is not None and got.title is None


async def test_config_is_detached_from_callers(store: Store) -> None:
    config: dict[str, Any] = {"model": "m1"}
    await store.create_session(make_record(config=config))
    config["model"] = "changed"
    got = await store.get_session("s1")
    assert got is not None and got.config == {"model": "m1"}
    got.config["model"] = "mutated"
    again = await store.get_session("s1")
    assert again is not None and again.config == {"model": "m1"}


async def test_unserialisable_config_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="JSON"):
        await store.create_session(make_record(config={"x": {1, 2}}))
    assert await store.get_session("s1") is None


async def test_update_changes_only_given_fields(store: Store) -> None:
    await store.create_session(make_record(title="t"))
    await store.update_session("s1", mode="ask", config={"model": "m2"})
    got = await store.get_session("s1")
    assert got == make_record(title="t", mode="ask", config={"model": "m2"})
    await store.update_session("s1", title=None, client_id=None, updated_at=555.0)
    got = await store.get_session("s1")
    assert got == make_record(
        title=None, mode="ask", config={"model": "m2"}, client_id=None, updated_at=555.0
    )


async def test_update_additional_directories(store: Store) -> None:
    """session/load may give a session other extra roots; the store keeps the new list."""
    await store.create_session(make_record(additional_directories=("/a", "/b")))
    await store.update_session("s1", additional_directories=["/c"])
    got = await store.get_session("s1")
    assert got == make_record(additional_directories=("/c",))
    await store.update_session("s1", additional_directories=())
    got = await store.get_session("s1")
    assert got is not None and got.additional_directories == ()
    await store.update_session("s1", additional_directories=(d for d in ["/e", "/f"]))
    got = await store.get_session("s1")
    assert got is not None and got.additional_directories == ("/e", "/f")
    for bad in ("/d", None, [1]):
        with pytest.raises(StoreError, match="sequence of strings"):
            await store.update_session("s1", additional_directories=bad)  # type: ignore[arg-type]


async def test_update_unknown_session(store: Store) -> None:
    with pytest.raises(UnknownSessionError):
        await store.update_session("ghost", title="x")
    with pytest.raises(UnknownSessionError):
        await store.update_session("ghost")


async def test_update_refuses_non_object_config(store: Store) -> None:
    await store.create_session(make_record())
    with pytest.raises(StoreError):
        await store.update_session("s1", config=["not", "a", "dict"])  # type: ignore[arg-type]


async def _seed(store: Store) -> None:
    # Two pairs share an updated_at, to exercise the id tie-break.
    for sid, updated, cwd in [
        ("a", 10.0, "/x"),
        ("b", 30.0, "/y"),
        ("c", 20.0, "/x"),
        ("d", 30.0, "/x"),
        ("e", 20.0, "/y"),
        ("f", 5.0, "/x"),
    ]:
        await store.create_session(make_record(sid, cwd=cwd, updated_at=updated))


async def test_list_is_newest_first_with_id_tie_break(store: Store) -> None:
    await _seed(store)
    page, cursor = await store.list_sessions()
    assert [r.id for r in page] == ["d", "b", "e", "c", "a", "f"]
    assert cursor is None


async def test_list_pagination_visits_each_session_once(store: Store) -> None:
    await _seed(store)
    for limit in (1, 2, 4, 5, 6):
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page, cursor = await store.list_sessions(cursor=cursor, limit=limit)
            assert len(page) <= limit
            seen += [r.id for r in page]
            pages += 1
            if cursor is None:
                break
        assert seen == ["d", "b", "e", "c", "a", "f"], limit
        assert pages == -(-6 // limit)


async def test_list_cwd_filter(store: Store) -> None:
    await _seed(store)
    page, cursor = await store.list_sessions(cwd="/x", limit=2)
    assert [r.id for r in page] == ["d", "c"]
    page, cursor = await store.list_sessions(cwd="/x", cursor=cursor, limit=2)
    assert [r.id for r in page] == ["a", "f"]
    assert cursor is None
    assert await store.list_sessions(cwd="/nowhere") == ([], None)


async def test_list_roots_filter_in_the_query_so_pages_stay_full(store: Store) -> None:
    """``roots`` keeps sessions whose cwd is a root or lies under one (by whole path
    components), before paging: every page is full and the last one has no cursor."""
    cwds = ["/p/a", "/p/ab", "/p/a/deep", "/q", "/p/a", "/elsewhere", "/p/ab/x", "/p/a"]
    for i, cwd in enumerate(cwds):
        await store.create_session(make_record(f"s{i}", cwd=cwd, updated_at=float(i)))
    page, cursor = await store.list_sessions(roots=["/p/a"], limit=2)
    assert [r.id for r in page] == ["s7", "s4"]
    page, cursor = await store.list_sessions(roots=["/p/a"], cursor=cursor, limit=2)
    assert ([r.id for r in page], cursor) == (["s2", "s0"], None)
    page, _ = await store.list_sessions(roots=["/q", "/p/ab"], cwd="/p/ab/x")
    assert [r.id for r in page] == ["s6"]
    assert await store.list_sessions(roots=[]) == ([], None)
    page, _ = await store.list_sessions(roots=["/"])
    assert len(page) == len(cwds)
    # (SQLite's substr counts characters as Python does, past the BMP too.)
    for i, cwd in enumerate(["/r/\u00e9\U0001f600/x", "/r/\u00e9\U0001f600x"], start=len(cwds)):
        await store.create_session(make_record(f"s{i}", cwd=cwd, updated_at=float(i)))
    page, _ = await store.list_sessions(roots=["/r/\u00e9\U0001f600"])
    assert [r.id for r in page] == [f"s{len(cwds)}"]


async def test_list_keyset_cursor_survives_a_touched_session(store: Store) -> None:
    await _seed(store)
    page, cursor = await store.list_sessions(limit=2)
    assert [r.id for r in page] == ["d", "b"]
    # "c" becomes the newest while the client pages: the rest neither repeats nor skips.
    await store.update_session("c", updated_at=99.0)
    page, cursor = await store.list_sessions(cursor=cursor, limit=10)
    assert [r.id for r in page] == ["e", "a", "f"]


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode()


_BAD_CURSORS = ["", "!!!", "bm90IGpzb24=", "WzEsMiwzXQ==", "WyJ4IiwieSJd"] + [
    _b64(raw)
    for raw in (
        "[1" + "0" * 400 + ', "x"]',  # no float holds it (an OverflowError once)
        '[1e999, "x"]',
        '[true, "x"]',
        '[1.5, "\\ud800"]',  # an id SQLite could not take
        '[1.5, "a\\u0000b"]',
    )
]


@pytest.mark.parametrize("cursor", _BAD_CURSORS)
async def test_list_invalid_cursor(store: Store, cursor: str) -> None:
    await _seed(store)
    with pytest.raises(StoreError, match="invalid cursor"):
        await store.list_sessions(cursor=cursor)


@pytest.mark.parametrize("limit", [0, -1])
async def test_list_invalid_limit(store: Store, limit: int) -> None:
    with pytest.raises(StoreError, match="limit"):
        await store.list_sessions(limit=limit)


async def test_append_turn_orders_entries_and_bumps_session(store: Store, clock: StepClock) -> None:
    await store.create_session(make_record())
    await store.append_turn("s1", 0, sample_turn(0, n=2))
    await store.append_turn("s1", 1, sample_turn(1, n=1))
    rec = await store.get_session("s1")
    assert rec is not None
    assert rec.turns == 2
    assert rec.updated_at == clock() - 1  # the clock's previous reading: turn 1's commit
    entries = await store.transcript("s1")
    assert [e.seq for e in entries] == list(range(7))
    assert [e.turn for e in entries] == [0, 0, 0, 0, 1, 1, 1]
    assert [(e.kind, e.payload) for e in entries] == sample_turn(0, n=2) + sample_turn(1, n=1)
    assert all(isinstance(e, TranscriptEntry) and e.session_id == "s1" for e in entries)


async def test_a_turn_records_the_title_it_gives_with_it(store: Store, clock: StepClock) -> None:
    """``append_turn(..., title=)`` names the session in the turn's own commit (the hub's
    first turn); the turn count and times derive as for any turn, and other sessions of
    the same group keep their titles."""
    await store.create_session(make_record())
    await store.create_session(make_record("s2", title="kept"))
    async with trio.open_nursery() as nursery:  # (one group commit for the sqlite store)
        nursery.start_soon(lambda: store.append_turn("s1", 0, sample_turn(0), title="Fix bug"))
        nursery.start_soon(lambda: store.append_turn("s2", 0, sample_turn(0)))
    s1, s2 = await store.get_session("s1"), await store.get_session("s2")
    assert s1 is not None and (s1.title, s1.turns) == ("Fix bug", 1)
    assert s2 is not None and (s2.title, s2.turns) == ("kept", 1)
    await store.append_turn("s1", 1, sample_turn(1))  # no title: left as it is
    s1 = await store.get_session("s1")
    assert s1 is not None and (s1.title, s1.turns) == ("Fix bug", 2)
    assert s1.updated_at == clock() - 1
    with pytest.raises(StoreError, match="title"):
        await store.append_turn("s1", 2, sample_turn(2), title=3)  # type: ignore[arg-type]
    assert [r.title for r in (await store.list_sessions())[0]] == ["Fix bug", "kept"]


async def test_turns_and_updated_at_follow_the_last_write(store: Store, clock: StepClock) -> None:
    """A session's ``turns`` and ``updated_at`` reflect the turns appended after its last
    metadata write, and the last write wins, whichever kind it was (SQLite derives them
    from its turn rows since schema version 3; the memory store sets them)."""
    await store.create_session(make_record(updated_at=100.0, turns=2))
    await store.append_turn("s1", 2, sample_turn(2))
    await store.append_turn("s1", 3, [])
    rec = await store.get_session("s1")
    assert rec is not None and (rec.turns, rec.updated_at) == (4, clock() - 1)
    await store.update_session("s1", title="named")  # keeps turns and updated_at
    rec = await store.get_session("s1")
    assert rec is not None and (rec.title, rec.turns, rec.updated_at) == ("named", 4, clock() - 2)
    await store.update_session("s1", updated_at=50.0)  # older than the turns: still wins
    rec = await store.get_session("s1")
    assert rec is not None and (rec.turns, rec.updated_at) == (4, 50.0)
    assert [(r.id, r.turns, r.updated_at) for r in (await store.list_sessions())[0]] == [
        ("s1", 4, 50.0)
    ]
    await store.append_turn("s1", 6, sample_turn(6))  # a gap
    rec = await store.get_session("s1")
    assert rec is not None and (rec.turns, rec.updated_at) == (7, clock() - 1)
    assert (await store.list_sessions())[0] == [rec]
    with pytest.raises(StoreError, match="already has turn 5"):
        await store.append_turn("s1", 5, [])


async def test_list_order_and_pages_follow_appended_turns(store: Store, clock: StepClock) -> None:
    await _seed(store)  # d b e c a f, all older than any turn
    for sid in ("f", "c", "a"):
        await store.append_turn(sid, 0, sample_turn(0))  # newest last: a, then c, then f
    order = ["a", "c", "f", "d", "b", "e"]
    for cwd, expected in [(None, order), ("/x", ["a", "c", "f", "d"]), ("/y", ["b", "e"])]:
        for limit in (1, 2, 3, 6):
            seen: list[str] = []
            cursor: str | None = None
            while True:
                page, cursor = await store.list_sessions(cwd=cwd, cursor=cursor, limit=limit)
                assert len(page) <= limit
                seen += [r.id for r in page]
                if cursor is None:
                    break
            assert seen == expected, (cwd, limit)
    page, _ = await store.list_sessions(limit=1)
    assert (page[0].id, page[0].turns, page[0].updated_at) == ("a", 1, clock() - 1)
    # A session given a turn between two pages keeps, for the pages after the first, the
    # place it had when the listing began: it is listed once, where the client expected it
    # (it once moved to the front, ahead of the cursor, and that listing never showed it).
    # The rest neither repeats nor skips; a fresh listing puts it first.
    page, cursor = await store.list_sessions(limit=3)
    assert [r.id for r in page] == ["a", "c", "f"]
    await store.append_turn("e", 0, sample_turn(0))
    await store.append_turn("c", 1, sample_turn(1))  # listed already: not again
    page, cursor = await store.list_sessions(cursor=cursor, limit=10)
    assert [r.id for r in page] == ["d", "b", "e"]
    assert page[2].turns == 1  # with its new values
    assert [r.id for r in (await store.list_sessions())[0]] == ["c", "e", "a", "f", "d", "b"]


async def test_a_cursor_of_the_older_form_pages_on_without_repeating(store: Store) -> None:
    """A listing paged with a cursor minted before cursors carried the listing's moment
    (``[updated_at, id]``, from a server before the upgrade) goes on as such cursors did,
    positions as they are now: it lists each session after it once. (Its next cursor took
    its own page's newest time as the moment, and a session listed before the old cursor
    came back on a later page.)"""
    for i, sid in enumerate("ABCD"):
        await store.create_session(make_record(sid, created_at=100.0 + i, updated_at=100.0 + i))
    for sid in "ABCD":
        await store.append_turn(sid, 0, sample_turn(0))
    await store.append_turn("A", 1, sample_turn(1))
    full, _ = await store.list_sessions(limit=50)
    assert [r.id for r in full] == ["A", "D", "C", "B"]
    old = base64.urlsafe_b64encode(json.dumps([full[0].updated_at, "A"]).encode()).decode()
    seen: list[str] = []
    cursor: str | None = old
    while cursor is not None:
        page, cursor = await store.list_sessions(cursor=cursor, limit=1)
        seen += [r.id for r in page]
    assert seen == ["D", "C", "B"]


async def test_list_pages_with_a_cwd_filter_miss_no_session_touched_meanwhile(
    store: Store, clock: StepClock
) -> None:
    """An IDE pages through one project's sessions while its agent works: every session of
    the cwd that existed when the listing began is listed exactly once, however many of
    them get turns between the pages; one created meanwhile waits for the next listing."""
    for i in range(12):
        cwd = "/x" if i % 3 else "/y"
        await store.create_session(make_record(f"s{i:02d}", cwd=cwd, updated_at=float(i)))
    for limit in (1, 2, 3, 5):
        expected = [r.id for r in (await store.list_sessions(cwd="/x", limit=100))[0]]
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page, cursor = await store.list_sessions(cwd="/x", cursor=cursor, limit=limit)
            seen += [r.id for r in page]
            pages += 1
            # Between pages: the oldest session of /x and one already seen get turns, and
            # a new session appears.
            for sid in (expected[-1], seen[0]):
                rec = await store.get_session(sid)
                assert rec is not None
                await store.append_turn(sid, rec.turns, sample_turn(rec.turns))
            await store.create_session(
                make_record(f"new{limit}-{pages}", cwd="/x", created_at=clock(), updated_at=clock())
            )
            if cursor is None:
                break
        assert sorted(seen) == sorted(expected) and len(seen) == len(expected), limit


async def test_payloads_replay_byte_for_byte(store: Store) -> None:
    await store.create_session(make_record())
    update = {
        "sessionUpdate": "tool_call",
        "toolCallId": "call_1_1",
        "title": "Lire « fichier » \U0001f600",
        "kind": "read",
        "status": "pending",
        "rawInput": {"z": 1, "a": [0.1, 1e300, -0.0, 12345678901234567890, None, True]},
        "locations": [{"path": "/proj/a.py", "line": 3}],
    }
    streamed = json.dumps(update)
    await store.append_turn("s1", 0, [("tool_call", update), (STOP, {"stopReason": "cancelled"})])
    update["status"] = "mutated after append"
    entries = await store.transcript("s1")
    assert json.dumps(entries[0].payload) == streamed
    assert entries[1].payload == {"stopReason": "cancelled"}
    entries[0].payload["title"] = "mutated after read"
    again = await store.transcript("s1")
    assert json.dumps(again[0].payload) == streamed


async def test_pre_encoded_payloads_are_stored_as_given(store: Store) -> None:
    await store.create_session(make_record())
    encoded = '{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"é"}}'
    await store.append_turn(
        "s1", 0, [("agent_message_chunk", encoded), (STOP, {"stopReason": "end_turn"})]
    )
    entries = await store.transcript("s1")
    assert entries[0].payload_json == encoded
    assert entries[0].payload == json.loads(encoded)
    assert entries[1].payload_json == '{"stopReason":"end_turn"}'


async def test_newlines_and_tabs_inside_json_round_trip(store: Store) -> None:
    """Only a raw newline in JSON text is refused: inside strings JSON escapes them, and a
    raw tab (whitespace between tokens) is kept as given."""
    await store.create_session(make_record())
    update = text_update("agent_message_chunk", "line 1\n\tline 2\r\n\u2028end\t")
    encoded = '{"sessionUpdate":\t"agent_message_chunk","content":{"text":"a\\nb"}}'
    await store.append_turn(
        "s1", 0, [("agent_message_chunk", update), ("agent_message_chunk", encoded)]
    )
    entries = await store.transcript("s1")
    assert [e.payload for e in entries] == [update, json.loads(encoded)]
    assert entries[1].payload_json == encoded
    assert [e.seq for e in entries] == [0, 1]


async def test_empty_turn_still_counts(store: Store) -> None:
    await store.create_session(make_record())
    await store.append_turn("s1", 0, [])
    rec = await store.get_session("s1")
    assert rec is not None and rec.turns == 1
    assert await store.transcript("s1") == []


async def test_turn_gap_is_allowed_but_rewrite_is_not(store: Store) -> None:
    await store.create_session(make_record())
    await store.append_turn("s1", 2, sample_turn(2))
    rec = await store.get_session("s1")
    assert rec is not None and rec.turns == 3
    with pytest.raises(StoreError, match="already has turn 1"):
        await store.append_turn("s1", 1, sample_turn(1))


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([("agent_message_chunk", text_update("user_message_chunk", "x"))], "sessionUpdate"),
        ([("plan", {"entries": []})], "sessionUpdate"),
        ([("stop", {"reason": "end_turn"})], "stopReason"),
        ([("", {"sessionUpdate": ""})], "kind"),
        ([("plan", ["not", "a", "dict"])], "JSON object"),
        ([("plan", '["encoded", "but", "not", "an", "object"]')], "JSON object"),
        ([("plan",)], "pair"),
        ([("plan", {"sessionUpdate": "plan", "entries": [float("nan")]})], "JSON"),
        ([("plan", {"sessionUpdate": "plan", "x": object()})], "JSON"),
        # A stored turn is one text of "kind TAB payload" lines: neither may break it.
        ([("plan\tx", {"sessionUpdate": "plan\tx"})], "tab or newline"),
        ([("plan\n", {"sessionUpdate": "plan\n"})], "tab or newline"),
        ([("plan", '{"sessionUpdate": "plan",\n "entries": []}')], "raw newline"),
    ],
)
async def test_invalid_entries_write_nothing(store: Store, entries: Any, match: str) -> None:
    await store.create_session(make_record())
    good = sample_turn(0)
    with pytest.raises(StoreError, match=match):
        await store.append_turn("s1", 0, [*good, *entries])
    rec = await store.get_session("s1")
    assert rec == make_record()
    assert await store.transcript("s1") == []


@pytest.mark.parametrize("turn", [-1, True, 1.0])
async def test_invalid_turn_index(store: Store, turn: Any) -> None:
    await store.create_session(make_record())
    with pytest.raises(StoreError, match="turn"):
        await store.append_turn("s1", turn, [])


async def test_unknown_session_for_turns_and_transcript(store: Store) -> None:
    with pytest.raises(UnknownSessionError) as info:
        await store.append_turn("ghost", 0, sample_turn(0))
    assert info.value.session_id == "ghost"
    with pytest.raises(UnknownSessionError):
        await store.transcript("ghost")


async def test_delete_removes_session_and_transcript(store: Store) -> None:
    await store.create_session(make_record("s1"))
    await store.create_session(make_record("s2"))
    await store.append_turn("s1", 0, sample_turn(0))
    await store.append_turn("s2", 0, sample_turn(0))
    assert await store.delete_session("s1") is True
    assert await store.delete_session("s1") is False
    assert await store.get_session("s1") is None
    with pytest.raises(UnknownSessionError):
        await store.transcript("s1")
    # A new session reusing the id starts with an empty transcript.
    await store.create_session(make_record("s1"))
    assert await store.transcript("s1") == []
    assert len(await store.transcript("s2")) == 5


async def test_concurrent_turns_on_many_sessions(store: Store) -> None:
    ids = [f"s{i}" for i in range(8)]
    for sid in ids:
        await store.create_session(make_record(sid))

    async def run_session(sid: str) -> None:
        for turn in range(5):
            await store.append_turn(sid, turn, sample_turn(turn))

    async with trio.open_nursery() as nursery:
        for sid in ids:
            nursery.start_soon(run_session, sid)
    for sid in ids:
        entries = await store.transcript(sid)
        assert [(e.kind, e.payload) for e in entries] == [
            item for turn in range(5) for item in sample_turn(turn)
        ]
        assert [e.seq for e in entries] == list(range(25))


async def test_closed_store_refuses_work_and_close_is_idempotent(store: Store) -> None:
    await store.create_session(make_record())
    await store.aclose()
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.get_session("s1")
    with pytest.raises(StoreError, match="closed"):
        await store.append_turn("s1", 0, sample_turn(0))


async def test_session_record_fields() -> None:
    rec = SessionRecord(id="x", root="/r", cwd="/r")
    assert (rec.client_id, rec.title, rec.mode, rec.config, rec.turns) == (None, None, None, {}, 0)
    assert rec.additional_directories == ()


async def test_transcript_rows_are_the_transcript_as_of_the_first_page(store: Store) -> None:
    await store.create_session(make_record())
    for turn in range(3):
        await store.append_turn("s1", turn, sample_turn(turn))  # 5 entries each
    whole = await store.transcript("s1")
    pages = []
    async for page in store.transcript_rows("s1", page_size=4):
        pages.append(page)
        if len(pages) == 1:  # a turn committed while paging is not part of this read
            await store.append_turn("s1", 3, sample_turn(3))
    assert [len(p) for p in pages] == [4, 4, 4, 3]
    assert [r for p in pages for r in p] == [(e.seq, e.kind, e.payload_json) for e in whole]
    assert len(await store.transcript("s1")) == 20


@pytest.mark.parametrize("page_size", [1, 2, 3, 5, 6, 7, 100])
async def test_transcript_rows_pages_cut_anywhere(store: Store, page_size: int) -> None:
    """Pages hold exactly ``page_size`` entries (the last one fewer), whatever the turns'
    lengths: the SQLite store cuts its one-row-per-turn storage at any entry."""
    await store.create_session(make_record())
    await store.append_turn("s1", 0, sample_turn(0, n=4))  # 6 entries
    await store.append_turn("s1", 1, [])  # no entries
    await store.append_turn("s1", 3, sample_turn(3, n=0))  # 2 entries, after a gap
    await store.append_turn("s1", 4, sample_turn(4, n=1))  # 3 entries
    whole = [(e.seq, e.kind, e.payload_json) for e in await store.transcript("s1")]
    assert [seq for seq, _, _ in whole] == list(range(11))
    pages = [page async for page in store.transcript_rows("s1", page_size=page_size)]
    assert [r for p in pages for r in p] == whole
    assert all(len(p) == page_size for p in pages[:-1]) and 0 < len(pages[-1]) <= page_size


async def test_transcript_rows_of_unknown_or_empty_sessions(store: Store) -> None:
    with pytest.raises(UnknownSessionError):
        async for _ in store.transcript_rows("nope"):
            pass  # pragma: no cover
    await store.create_session(make_record())
    assert [p async for p in store.transcript_rows("s1")] == []
    with pytest.raises(StoreError, match="limit"):
        async for _ in store.transcript_rows("s1", page_size=0):
            pass  # pragma: no cover
