"""Clients racing the session lifecycle: ``session/new``, ``load``, ``resume``, ``list``,
``close``, ``delete``, ``prompt``, ``session/cancel``, ``$/cancel_request``, and drops and
reconnects under the same client id, on several connections, against the same sessions,
with the SQLite store; a bystander client prompts its own session throughout.

The random test runs a seeded script of these on the hub over in-memory streams with a
MockClock, then checks what every client got and what the store holds after it is
reopened; a few seeds run the same over real WebSockets to a real server. Run more
seeds by hand with ``RACE_SEEDS=0-500`` (the hub) and ``RACE_SERVER_SEEDS=0-50``."""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import random
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from punie_trio._paths import store_path
from punie_trio.hub import Limits, Manager
from punie_trio.store import STOP, MemoryStore, UnknownSessionError, _sql, open_sqlite_store
from punie_trio.worker import EchoModel, ScriptModel

from ..acp_schema import SchemaChecker
from ..client import AcpTestClient
from ..integration._support import acp_ws_client, settle_until, task_tree
from ..integration.conftest import StartServer
from ._hub import (
    AWAITING_META,
    CLIENT_ID_META,
    Link,
    expect_error,
    initialize,
    open_hub,
    prompt_params,
)

CLIENTS = ("ide-a", "ide-b")
#: What each seed does: the lifecycle methods (twice as many prompts), cancels and drops.
ACTIONS = (
    "new",
    "load",
    "resume",
    "list",
    "close",
    "delete",
    "prompt",
    "prompt",
    "cancel",
    "cancel_request",
    "drop",
    "sleep",
)
UPDATING = frozenset({"session/prompt", "session/load"})
STREAMED = frozenset({"agent_message_chunk", "agent_thought_chunk"})


def _seeds(variable: str = "RACE_SEEDS", default: int = 8) -> list[int]:
    """``default`` seeds, or those ``variable`` names (``N`` or ``FIRST-LAST``)."""
    spec = os.environ.get(variable)
    if not spec:
        return list(range(default))
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


def _random_turns(rng: random.Random) -> list[list[dict[str, Any]]]:
    """Three scripted turns of up to 30 steps (text, a thought, a sleep, a file read: from
    the disk, or from the client for one that advertises reading)."""
    turns: list[list[dict[str, Any]]] = []
    for t in range(3):
        steps: list[dict[str, Any]] = []
        for i in range(rng.randint(0, 30)):
            roll = rng.random()
            if roll < 0.1:
                steps.append({"sleep": rng.choice([0.01, 0.5, 2])})
            elif roll < 0.15:
                steps.append({"tool": "read_file", "input": {"path": "notes.txt"}})
            elif roll < 0.2:
                steps.append({"thought": f"think {t}-{i}"})
            else:
                steps.append({"text": f"t{t}-{i} "})
        turns.append(steps)
    return turns


@attrs.define(eq=False)
class Sent:
    """A request a racing client sent: on which link, and how much that link had received
    by then (what it receives later may answer it or stream for it)."""

    link: Link
    request_id: str
    method: str
    session_id: str | None
    at: int


@attrs.define(eq=False)
class Racer:
    client_id: str
    link: Link
    links: list[Link] = attrs.field(factory=list)
    dropped: set[Link] = attrs.field(factory=set)


def _answers(links: list[Link]) -> dict[str, list[tuple[Link, int, dict[str, Any]]]]:
    """Every answer over ``links``, by request id: (link, index in its received, answer)."""
    found: dict[str, list[tuple[Link, int, dict[str, Any]]]] = collections.defaultdict(list)
    for link in links:
        for i, m in enumerate(link.client.received):
            if "method" not in m and isinstance(m.get("id"), str):
                found[m["id"]].append((link, i, m))
    return found


async def _all_listed(client: AcpTestClient) -> list[str]:
    ids: list[str] = []
    params: dict[str, Any] = {}
    while True:
        page = await client.request("session/list", params)
        ids += [s["sessionId"] for s in page["sessions"]]
        if "nextCursor" not in page:
            return ids
        params = {"cursor": page["nextCursor"]}


class Peer(Protocol):
    """A racing client's connection: :class:`Link` on the hub, :class:`WsLink` on a server."""

    client: AcpTestClient

    async def drop(self) -> None: ...


@attrs.define(eq=False)
class WsLink:
    """A client over a real WebSocket to a real server (its own task, see
    :meth:`run`); ``drop`` closes the socket."""

    client: AcpTestClient
    dropping: trio.Event = attrs.field(factory=trio.Event)
    closed: trio.Event = attrs.field(factory=trio.Event)

    @staticmethod
    async def run(url: str, checker: SchemaChecker, task_status: trio.TaskStatus[WsLink]) -> None:
        """Connect, hand the link over, and close when it is dropped (or cancelled)."""
        closed = trio.Event()
        try:
            async with acp_ws_client(url, checker) as (client, _):
                link = WsLink(client, closed=closed)
                task_status.started(link)
                await link.dropping.wait()
        finally:
            closed.set()

    async def drop(self) -> None:
        self.dropping.set()
        await self.closed.wait()


@attrs.define(eq=False)
class Place:
    """Where a race runs: the hub over memory streams (MockClock time), or a real server
    (real time, its sleeps scaled down by ``scale``)."""

    manager: Manager
    nursery: trio.Nursery
    connect: Callable[[int], Awaitable[Any]]  # (a stream buffer: the hub's alone)
    #: After a drop: whether the hub has let the dropped connection go (None: come back
    #: at once, the take-over probe tells the old connection gone).
    gone: Callable[[Any], Callable[[], bool]] | None = None
    scale: float = 1.0
    #: Called at each quiet point of the race (every task blocked), to check the state.
    quiet: Callable[[Race], None] | None = None


def caps(rng: random.Random) -> dict[str, Any]:
    """A client's capabilities: reads files for the agent, or not."""
    return rng.choice([{}, {"fs": {"readTextFile": True, "writeTextFile": False}}])


def random_limits(rng: random.Random) -> Limits:
    return Limits(
        grace_seconds=rng.choice([0, 1, 5, 60]),
        detached_buffer=rng.choice([5, 50, 1000]),
        outbox_limit=rng.choice([2, 8, 256]),
        max_sessions_per_connection=rng.choice([3, 64]),
    )


@attrs.define(eq=False)
class Race:
    sent: list[Sent] = attrs.field(factory=list)
    racers: list[Racer] = attrs.field(factory=list)
    bystander: str = ""
    bystander_link: Any = None
    bystander_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def links(self) -> list[Any]:
        return [link for r in self.racers for link in r.links]

    def answers(self) -> dict[str, list[tuple[Any, int, dict[str, Any]]]]:
        return _answers(self.links())


async def _race(place: Place, rng: random.Random, root: str, race: Race) -> None:
    """Run a seed's script at ``place``, recording it in ``race``: lifecycle requests of
    two clients (each dropping and coming back under its client id) on their sessions,
    and a bystander prompting its own session throughout."""
    sent = race.sent
    racers = race.racers
    sessions: list[str] = []
    bystander_stops: list[str] = []
    manager = place.manager

    def send(racer: Racer, method: str, params: dict[str, Any], step: int) -> Any:
        request_id = f"{racer.client_id}:{method}:{step}"
        at = len(racer.link.client.received)
        sent.append(Sent(racer.link, request_id, method, params.get("sessionId"), at))
        return racer.link.client.send(
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        )

    def learn_sessions() -> None:
        for answers in race.answers().values():
            for _, _, m in answers:
                sid = m.get("result", {}).get("sessionId") if "result" in m else None
                if sid is not None and sid not in sessions:
                    sessions.append(sid)

    async def bystander(task_status: trio.TaskStatus[str]) -> None:
        link = race.bystander_link = await place.connect(64)
        await initialize(link.client)
        sid = await link.client.new_session(root)
        with trio.CancelScope() as race.bystander_scope:
            task_status.started(sid)
            while True:
                bystander_stops.append(await link.client.prompt(sid, "hello"))
                await trio.sleep(rng.choice([0.1, 1, 3]) * place.scale)

    race.bystander = await place.nursery.start(bystander)
    for client_id in CLIENTS:
        link = await place.connect(rng.choice([1, 4, 64]))
        await initialize(link.client, client_id=client_id, **caps(rng))
        sessions.append(await link.client.new_session(root))
        racers.append(Racer(client_id, link, [link]))
    for step in range(rng.randint(20, 80)):
        racer = rng.choice(racers)
        action = rng.choice(ACTIONS)
        sid = rng.choice(sessions)
        if action == "new":
            await send(racer, "session/new", {"cwd": root, "mcpServers": []}, step)
        elif action in ("load", "resume"):
            params = {"sessionId": sid, "cwd": root, "mcpServers": []}
            await send(racer, f"session/{action}", params, step)
        elif action == "list":
            await send(racer, "session/list", rng.choice([{}, {"cwd": root}]), step)
        elif action in ("close", "delete"):
            await send(racer, f"session/{action}", {"sessionId": sid}, step)
        elif action == "prompt":
            await send(racer, "session/prompt", prompt_params(sid, "go"), step)
        elif action == "cancel":
            await racer.link.client.notify("session/cancel", {"sessionId": sid})
        elif action == "cancel_request":
            got = _answers([racer.link])
            open_ids = [
                s.request_id for s in sent if s.link is racer.link and s.request_id not in got
            ]
            if open_ids:
                target = rng.choice(open_ids)
                await racer.link.client.notify("$/cancel_request", {"requestId": target})
        elif action == "sleep":
            await trio.sleep(rng.choice([0.001, 0.3, 3]) * place.scale)
        else:
            await racer.link.drop()
            racer.dropped.add(racer.link)
            if place.gone is not None:
                # (settle alone is not enough: a handler waiting on the store's thread
                # counts as blocked, and its connection is detached only when it ends)
                await settle_until(place.gone(racer.link))
            if rng.random() < 0.3:
                await trio.sleep(rng.choice([0.5, 2, 10]) * place.scale)
            got = race.answers()
            awaiting = [
                s.request_id
                for s in sent
                if s.method == "session/prompt"
                and s.request_id.startswith(racer.client_id + ":")
                and s.request_id not in got
            ]
            racer.link = await place.connect(rng.choice([1, 4, 64]))
            racer.links.append(racer.link)
            if rng.random() < 0.5:
                await initialize(
                    racer.link.client, client_id=racer.client_id, awaiting=awaiting, **caps(rng)
                )
            else:  # (what the client sends next is pipelined behind it)
                meta = {CLIENT_ID_META: racer.client_id, AWAITING_META: awaiting}
                init: dict[str, Any] = {
                    "protocolVersion": 1,
                    "_meta": meta,
                    "clientCapabilities": caps(rng),
                }
                await send(racer, "initialize", init, step)
        if rng.random() < 0.6:  # (else the next request is pipelined behind this one)
            await trio.testing.wait_all_tasks_blocked()
            if place.quiet is not None:
                place.quiet(race)
        learn_sessions()
        for session in manager.sessions.values():
            # Live on one connection at most: its owner is open, or it is away.
            assert session.owner is None or session.owner in manager.connections
        _check_closed_not_live(race, manager)
    await trio.sleep(100 * place.scale)  # (every turn ends, every grace period too)
    dropped = {link for r in racers for link in r.dropped}
    owed = [s for s in sent if s.link not in dropped or s.method == "session/prompt"]
    for _ in range(1000):  # (a handler on the store's thread counts as blocked)
        got = race.answers()
        if all(s.request_id in got for s in owed):
            break
        await trio.sleep(1 * place.scale)
    if place.quiet is not None:
        await trio.testing.wait_all_tasks_blocked()
        place.quiet(race)
    assert bystander_stops and set(bystander_stops) == {"end_turn"}


def _check_answers(
    sent: list[Sent],
    answers: dict[str, list[tuple[Link, int, dict[str, Any]]]],
    racers: list[Racer],
) -> None:
    dropped = {link for r in racers for link in r.dropped}
    for s in sent:
        got = answers.get(s.request_id, [])
        if s.method == "session/prompt":
            assert len(got) == 1, (s.request_id, got)
        elif s.link in dropped:
            assert len(got) <= 1, (s.request_id, got)
        else:
            assert len(got) == 1, (s.request_id, got)
        for link, _, m in got:
            if s.method != "session/prompt":
                assert link is s.link, (s.request_id, m)
            if "result" in m and s.method == "session/prompt":
                assert m["result"]["stopReason"] in ("end_turn", "cancelled"), m


def _check_closed_not_live(race: Race, manager: Manager) -> None:
    """A session closed on a connection still open is not live there, unless a load or
    resume of it was sent on that connection after the close."""
    answers = race.answers()
    for n, s in enumerate(race.sent):
        if s.method != "session/close" or s.session_id not in manager.sessions:
            continue
        conn = getattr(s.link, "connection", None)
        if conn is None or manager.sessions[s.session_id].owner is not conn:
            continue
        if not any("result" in m for _, _, m in answers.get(s.request_id, [])):
            continue
        reopened = [
            later
            for later in race.sent[n + 1 :]
            if later.link is s.link
            and later.session_id == s.session_id
            and later.method in ("session/load", "session/resume")
        ]
        assert reopened, (s.request_id, "answered, and the session is live on its connection")


def _check_after_delete(race: Race) -> None:
    """On the connection that was answered a delete: a list sent after that answer does
    not list the session, and a load, resume or prompt of it is refused."""
    answers = race.answers()
    for d in race.sent:
        if d.method != "session/delete":
            continue
        done = [i for link, i, m in answers.get(d.request_id, []) if "result" in m]
        if not done:
            continue
        for s in race.sent:
            if s.link is not d.link or s.at <= done[0]:
                continue
            for _, _, m in answers.get(s.request_id, []):
                if s.method == "session/list" and "result" in m:
                    listed = {x["sessionId"] for x in m["result"]["sessions"]}
                    assert d.session_id not in listed, (d.request_id, s.request_id)
                elif s.session_id == d.session_id and s.method in (
                    "session/load",
                    "session/resume",
                    "session/prompt",
                ):
                    assert "error" in m, (d.request_id, s.request_id, m)


def _streamed_turns(
    race: Race, answers: dict[str, list[tuple[Any, int, dict[str, Any]]]], session_id: str
) -> list[list[tuple[str, str]]]:
    """Each turn of ``session_id`` answered on the connection that sent its prompt, as it
    streamed there: its stop reason, then its message and thought chunks."""
    found: list[list[tuple[str, str]]] = []
    for s in race.sent:
        if s.method != "session/prompt" or s.session_id != session_id:
            continue
        got = [(i, m) for link, i, m in answers.get(s.request_id, []) if link is s.link]
        if not got or "result" not in got[0][1]:
            continue
        end, answer = got[0]
        # From the prompt's sending, or the last answer before this one there to a
        # prompt or load of the session (what streamed before is theirs).
        start = s.at
        for other in race.sent:
            if other.link is s.link and other.session_id == session_id and other.method in UPDATING:
                for link, i, m in answers.get(other.request_id, []):
                    if link is s.link and start <= i < end and "result" in m:
                        start = i + 1
        turn = [("stop", answer["result"]["stopReason"])]
        for m in s.link.client.received[start:end]:
            if m.get("method") == "session/update" and m["params"]["sessionId"] == session_id:
                update = m["params"]["update"]
                if update["sessionUpdate"] in STREAMED:
                    turn.append((update["sessionUpdate"], update["content"]["text"]))
        found.append(turn)
    return found


def _check_updates(
    sent: list[Sent],
    answers: dict[str, list[tuple[Link, int, dict[str, Any]]]],
    racers: list[Racer],
) -> None:
    """Each session's updates on a link come while a prompt or a load of it, sent on that
    link (or awaited from an earlier one), is unanswered there: none after its answer."""
    for racer in racers:
        for n, link in enumerate(racer.links):
            running: list[tuple[str | None, int, int]] = []  # (session, from, answered at)
            for s in sent:
                if s.method not in UPDATING:
                    continue
                got = answers.get(s.request_id, [])
                end = next((i for lk, i, _ in got if lk is link), None)
                if s.link is link:
                    running.append((s.session_id, s.at, end if end is not None else 1 << 60))
                elif (
                    s.method == "session/prompt"
                    and s.link in racer.links[:n]
                    and not any(lk in racer.links[:n] for lk, _, _ in got)
                ):  # (awaited by this connection: the backlog comes first)
                    running.append((s.session_id, 0, end if end is not None else 1 << 60))
            for i, m in enumerate(link.client.received):
                if m.get("method") != "session/update":
                    continue
                sid = m["params"]["sessionId"]
                assert any(r[0] == sid and r[1] <= i < r[2] for r in running), (
                    racer.client_id,
                    n,
                    i,
                    m,
                )


def _resources() -> tuple[int, list[str], int]:
    """Tasks, threads (but Trio's idle workers, which its cache keeps a while) and open
    file descriptors of this process, to compare before and after a race. Garbage is
    collected first: an earlier test's socket left in a reference cycle, collected during
    the race, closed its descriptor there (19 after, 20 before, in a full run)."""
    gc.collect()
    threads = sorted(t.name for t in threading.enumerate() if not t.name.startswith("Trio thread"))
    return sum(task_tree().values()), threads, len(os.listdir("/proc/self/fd"))


async def _check_after(race: Race, db: Path, checker: SchemaChecker, root: Path) -> None:
    """What the clients got, and the store once every connection has closed, reopened:
    whole and consistent with every answer, and a new hub on it lists what it holds and
    loads every session but the deleted ones."""
    answers = race.answers()
    _check_answers(race.sent, answers, race.racers)
    _check_updates(race.sent, answers, race.racers)
    _check_after_delete(race)
    sent = race.sent

    def answered(method: str) -> list[tuple[Sent, dict[str, Any]]]:
        return [
            (s, m)
            for s in sent
            if s.method == method
            for _, _, m in answers.get(s.request_id, [])
            if "result" in m
        ]

    created = {m["result"]["sessionId"] for _, m in answered("session/new")}
    created |= {sid for r in race.racers for sid in _first_sessions(r)}
    deleted = {str(s.session_id) for s, _ in answered("session/delete")}
    stops: dict[str | None, list[str]] = collections.defaultdict(list)
    for s, m in answered("session/prompt"):
        stops[s.session_id].append(m["result"]["stopReason"])

    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    async with open_sqlite_store(db) as store:
        listed: list[str] = []
        cursor = None
        while True:
            page, cursor = await store.list_sessions(cursor=cursor)
            listed += [r.id for r in page]
            if cursor is None:
                break
        # A delete (or a new) whose answer was lost with its connection may have been done;
        # one refused (or cancelled: -32800) was not.
        maybe_deleted = {
            s.session_id
            for s in sent
            if s.method == "session/delete"
            and not any("error" in m for _, _, m in answers.get(s.request_id, []))
        }
        unanswered_new = [
            s for s in sent if s.method == "session/new" and s.request_id not in answers
        ]
        assert len(listed) == len(set(listed))
        assert not set(listed) & deleted, (deleted, listed)
        assert (created - maybe_deleted) | {race.bystander} <= set(listed), (created, listed)
        assert len(set(listed) - created - {race.bystander}) <= len(unanswered_new)
        for sid in deleted:
            assert await store.get_session(sid) is None
            with pytest.raises(UnknownSessionError):
                await store.transcript(sid)
        for sid in listed:
            # Every turn stored whole (its entries, then one stop), numbered from 0, and
            # every stop reason a client was answered among them.
            entries = await store.transcript(sid)
            by_turn: dict[int, list[str]] = collections.defaultdict(list)
            for e in entries:
                by_turn[e.turn].append(e.kind)
            record = await store.get_session(sid)
            assert record is not None
            assert sorted(by_turn) == list(range(record.turns)), (sid, sorted(by_turn))
            for turn, kinds in by_turn.items():
                assert kinds[-1] == STOP and kinds.count(STOP) == 1, (sid, turn, kinds)
            stored = collections.Counter(e.payload["stopReason"] for e in entries if e.kind == STOP)
            assert not collections.Counter(stops[sid]) - stored, (sid, stops[sid], stored)
            turns: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
            for e in entries:
                if e.kind == STOP:
                    turns[e.turn].insert(0, ("stop", e.payload["stopReason"]))
                elif e.kind in STREAMED:
                    turns[e.turn].append((e.kind, e.payload["content"]["text"]))
            for streamed in _streamed_turns(race, answers, sid):
                assert streamed in turns.values(), (sid, streamed, turns)

        async with open_hub(root, checker, EchoModel(), store=store) as hub:
            link = await hub.connect()
            await initialize(link.client)
            assert sorted(await _all_listed(link.client)) == sorted(listed)
            for sid in listed:
                params = {"sessionId": sid, "cwd": str(hub.root), "mcpServers": []}
                assert await link.client.request("session/load", params) == {}
            for sid in deleted:
                params = {"sessionId": sid, "cwd": str(hub.root), "mcpServers": []}
                error = await expect_error(link.client, "session/load", params)
                assert error["code"] == -32002, error
            await link.drop()


@pytest.mark.parametrize("seed", _seeds())
async def test_random_lifecycle_races_on_the_hub(
    tmp_path: Path,
    acp_schema: SchemaChecker,
    autojump_clock: trio.testing.MockClock,
    seed: int,
) -> None:
    """Every request is answered once (validated against the schema), a prompt's updates
    come before its answer, a session is live on one connection at most, ``session/list``
    agrees with the store, a deleted session is gone from it with its turns and every
    other stays loadable, every answered turn is stored whole, and the bystander is
    served throughout; nothing is left running or open."""
    (tmp_path / "notes.txt").write_text("notes\n")
    before = _resources()
    rng = random.Random(seed)
    turns, limits = _random_turns(rng), random_limits(rng)
    db = tmp_path / "s.db"
    race = Race()
    async with (
        open_sqlite_store(db) as store,
        open_hub(tmp_path, acp_schema, ScriptModel(turns), limits=limits, store=store) as hub,
    ):

        def gone(link: Link) -> Callable[[], bool]:
            return lambda: link.connection not in hub.manager.connections

        async def connect(buffer: int) -> Link:
            return await hub.connect(buffer=buffer)

        place = Place(hub.manager, hub.nursery, connect, gone)
        await _race(place, rng, str(hub.root), race)
    await _check_after(race, db, acp_schema, tmp_path)
    await trio.testing.wait_all_tasks_blocked()
    assert _resources() == before


@pytest.mark.parametrize("seed", _seeds("RACE_SERVER_SEEDS", 3))
async def test_random_lifecycle_races_on_a_real_server(
    tmp_path: Path, acp_schema: SchemaChecker, start_server: StartServer, seed: int
) -> None:
    """As above over real WebSockets to a real server (its heartbeat tells a dropped
    connection gone when its client comes back at once), in real time: the script's
    sleeps and the grace period a hundredth of the hub test's."""
    scale = 0.01
    (tmp_path / "notes.txt").write_text("notes\n")
    before = _resources()
    rng = random.Random(seed)
    turns = [
        [{"sleep": step["sleep"] * scale} if "sleep" in step else step for step in turn]
        for turn in _random_turns(rng)
    ]
    limits = random_limits(rng)
    limits = attrs.evolve(limits, grace_seconds=limits.grace_seconds * scale)
    race = Race()
    async with start_server(ScriptModel(turns), limits=limits) as running:
        assert running.url is not None
        url = running.url
        async with trio.open_nursery() as nursery:

            async def connect(buffer: int) -> WsLink:
                link: WsLink = await nursery.start(WsLink.run, url, acp_schema)
                return link

            def quiet(race: Race) -> None:
                # (Real sockets: a drop is seen a little later, so the connections are
                # not counted against the links here.)
                _check_gauges(manager, _scraped(manager.metrics.render().decode()), None)

            manager = running.manager
            place = Place(manager, nursery, connect, scale=scale, quiet=quiet)
            root = str(Path(await trio.Path(tmp_path).resolve()))
            await _race(place, rng, root, race)
            nursery.cancel_scope.cancel()
        # Every client gone, every grace period over: a scrape counts nothing.
        await settle_until(lambda: not manager.connections)
        await trio.sleep(limits.grace_seconds)
        await settle_until(lambda: not manager.sessions and not manager._running_turns)
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.get("/metrics")
        scraped = _scraped(response.text)
        _check_gauges(manager, scraped, 0)
        assert not manager.workers
        _check_turn_counts(manager, scraped)
    await _check_after(race, store_path(tmp_path / "data"), acp_schema, tmp_path)
    await trio.testing.wait_all_tasks_blocked()
    assert _resources() == before


def _scraped(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a ``/metrics`` exposition, parsed as Prometheus parses it (a
    malformed one raises), by (name, labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _check_gauges(manager: Manager, scraped: dict[Any, float], connections: int | None) -> None:
    """The gauges a scrape shows are the server's state, and that state is whole:
    ``connections`` open connections (None: not known here), each live session held by
    one of them or kept for a client away within its grace period (none left behind by
    a drop, an expiry, a close or a delete), and one worker a root that has sessions,
    holding just those."""
    if connections is not None:
        assert len(manager.connections) == connections
    assert scraped[("punie_connections", ())] == len(manager.connections)
    assert scraped[("punie_sessions", ())] == len(manager.sessions)
    assert scraped[("punie_workers", ())] == len(manager.workers)
    away = set(manager._reattached)
    for session in manager.sessions.values():
        if session.owner is None:
            assert session.detached_client in away, (session.id, session.detached_client)
        else:
            assert session.owner in manager.connections, session.id
    by_root: dict[str, set[str]] = collections.defaultdict(set)
    for session in manager.sessions.values():
        by_root[session.root].add(session.id)
    assert {root: h.sessions for root, h in manager.workers.items()} == by_root
    held = {s.id for s in manager.sessions.values() if s.owner is None}
    assert scraped[("punie_sessions_in_grace", ())] == len(held)
    assert scraped[("punie_clients_in_grace", ())] == len(away)


def _check_turn_counts(manager: Manager, scraped: dict[Any, float]) -> None:
    """Each turn counted once, by its stop reason and in the latency histogram, once no
    turn runs: as many as were begun (a prompt refused at once begins none)."""
    begun = next(manager._turn_ids) - 1
    finished = sum(v for (name, _), v in scraped.items() if name == "punie_prompts_total")
    assert finished == begun
    assert scraped[("punie_prompt_latency_seconds_count", ())] == begun


@pytest.mark.parametrize("seed", _seeds("RACE_METRICS_SEEDS", 4))
async def test_metrics_follow_random_lifecycles_on_the_hub(
    tmp_path: Path,
    acp_schema: SchemaChecker,
    autojump_clock: trio.testing.MockClock,
    seed: int,
) -> None:
    """The random races of :func:`_race`, checking the gauges against the hub's state at
    each quiet point (every connection open, every session held or in grace, every
    worker with sessions), and at the end, once every client has left and every grace
    period has run out, that nothing is counted: no connection, session or worker is
    left, and each turn was counted once."""
    (tmp_path / "notes.txt").write_text("notes\n")
    rng = random.Random(seed)
    turns, limits = _random_turns(rng), random_limits(rng)
    race = Race()
    async with (
        open_sqlite_store(tmp_path / "s.db") as store,
        open_hub(tmp_path, acp_schema, ScriptModel(turns), limits=limits, store=store) as hub,
    ):
        manager = hub.manager

        def gone(link: Link) -> Callable[[], bool]:
            return lambda: link.connection not in manager.connections

        async def connect(buffer: int) -> Link:
            return await hub.connect(buffer=buffer)

        def quiet(race: Race) -> None:
            open_links = [r.link for r in race.racers if r.link not in r.dropped]
            scraped = _scraped(manager.metrics.render().decode())
            _check_gauges(manager, scraped, len(open_links) + 1)

        place = Place(manager, hub.nursery, connect, gone, quiet=quiet)
        await _race(place, rng, str(hub.root), race)
        race.bystander_scope.cancel()
        for racer in race.racers:
            await racer.link.drop()
        await race.bystander_link.drop()
        await trio.sleep(limits.grace_seconds + 1)
        await settle_until(lambda: not manager.connections and not manager._ending)
        scraped = _scraped(manager.metrics.render().decode())
        _check_gauges(manager, scraped, 0)
        assert not manager.sessions and not manager.workers
        _check_turn_counts(manager, scraped)


def _first_sessions(racer: Racer) -> list[str]:
    """The sessions a racer opened before the race (integer request ids)."""
    first = racer.links[0].client
    return [
        m["result"]["sessionId"]
        for m in first.received
        if isinstance(m.get("result"), dict)
        and "sessionId" in m["result"]
        and not isinstance(m.get("id"), str)
    ]


class HeldDeletes:
    """A memory store whose deletes, once begun, wait for the test (as the SQLite store's
    does on its thread: not interruptible once begun, the Store protocol)."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.entered = trio.Event()
        self.opened = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def delete_session(self, session_id: str) -> bool:
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.CancelScope(shield=True):
            self.entered.set()
            await self.opened.wait()
            found: bool = await self.inner.delete_session(session_id)
        return found


async def test_a_delete_cancelled_once_its_store_delete_began_says_it_was_done(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A ``$/cancel_request`` that comes while the store is deleting the session cannot
    stop it (a store's delete is not interruptible once begun). The client was answered
    -32800, "Request cancelled", of a session that was gone: it took the session for
    still there. The answer is now the delete's own result."""
    store = HeldDeletes()
    async with open_hub(tmp_path, acp_schema, EchoModel(), store=store) as hub:
        link = await hub.connect()
        await initialize(link.client)
        sid = await link.client.new_session(str(hub.root))
        request = {"jsonrpc": "2.0", "id": "del", "method": "session/delete"}
        await link.client.send({**request, "params": {"sessionId": sid}})
        await store.entered.wait()
        await link.client.notify("$/cancel_request", {"requestId": "del"})
        await hub.settle()
        store.opened.set()
        answer = await link.client.wait_for(lambda m: m.get("id") == "del")
        assert await store.inner.get_session(sid) is None
        assert answer.get("result") == {}, answer


async def test_a_new_session_cancelled_while_its_store_write_waits_leaves_nothing_open(
    tmp_path: Path, acp_schema: SchemaChecker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``session/new`` opens its session live, then stores it; the store's write waits
    while the owner thread deletes another session (or while a checkpoint settles the
    WAL), and a ``$/cancel_request`` then cancels it before anything is written. The
    client is answered -32800, so it never learns the id, but the session stayed open,
    live and never stored: it held a place of the connection's session limit (and of a
    client id's within grace, where every turn of it would fail to save) until the
    connection ended. Now it is dropped, as a store's failure drops it."""
    release = threading.Event()
    real_delete = _sql.delete_session

    def held_delete(conn: sqlite3.Connection, session_id: str) -> bool:
        release.wait(10)
        return real_delete(conn, session_id)

    monkeypatch.setattr(_sql, "delete_session", held_delete)
    limits = Limits(max_sessions_per_connection=1)
    async with (
        open_sqlite_store(store_path(tmp_path)) as store,
        open_hub(tmp_path, acp_schema, EchoModel(), store=store, limits=limits) as hub,
    ):
        link = await hub.connect()
        await initialize(link.client)
        old = await link.client.new_session(str(hub.root))
        await link.client.request("session/close", {"sessionId": old})
        await link.client.send(
            {"jsonrpc": "2.0", "id": "del", "method": "session/delete",
             "params": {"sessionId": old}}
        )  # fmt: skip
        await settle_until(lambda: store._writes_wait_for is not None)  # (held)
        await link.client.send(
            {"jsonrpc": "2.0", "id": "new", "method": "session/new",
             "params": {"cwd": str(hub.root), "mcpServers": []}}
        )  # fmt: skip
        await settle_until(lambda: len(hub.manager.sessions) == 1)  # (opened live)
        await hub.settle()  # (its write waits for the delete)
        await link.client.notify("$/cancel_request", {"requestId": "new"})
        answer = await link.client.wait_for(lambda m: m.get("id") == "new")
        assert answer["error"]["code"] == -32800, answer
        release.set()
        assert (await link.client.wait_for(lambda m: m.get("id") == "del")).get("result") == {}
        await hub.settle()
        assert [s.id for s in hub.manager.sessions.values()] == []
        assert (await store.list_sessions())[0] == []
        await link.client.new_session(str(hub.root))  # (the limit's one place is free)
