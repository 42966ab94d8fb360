"""``/metrics`` as an operator of many IDEs reads it: the gauges follow every lifecycle
path of a session (drops kept within grace, grace expiry, a client back within grace,
close, delete, load, refusals, shutdown) back to the server's real state, each counter
counts each event once (an answer sent again on a client's return is not a second
error), and the exposition is valid Prometheus text that shows no token and no path.

The random lifecycles' version of the gauge checks is in ``test_races.py``
(``test_metrics_follow_random_lifecycles_on_the_hub``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from wsproto.events import AcceptConnection, Request

from punie_trio._metrics import LIMITS, Metrics
from punie_trio._paths import store_path
from punie_trio.acp import STOP_REASONS
from punie_trio.hub import Limits, Manager
from punie_trio.rpc import ERROR_NAMES, Peer
from punie_trio.store import MemoryStore, StoreError
from punie_trio.web._heartbeat import PROBE_WITHIN
from punie_trio.worker import ScriptModel

from ..acp_schema import SchemaChecker
from ..integration._support import acp_ws_client, settle_until, ws_url
from ..integration.conftest import StartServer
from ..integration.test_heartbeat import RawClient, settle
from ..models import RefusesBad
from ..unit.test_load import load_params
from ..unit.test_peer import Dispatcher, start_peer
from ._hub import expect_error, initialize, open_hub, prompt_params
from .test_auth import (
    TOKEN,
    acp_client,
    bearer,
    handshake_request,
    origin,
    raw_handshake,
    rejected,
)
from .test_reconnect import open_raw_session, send_unread

GAUGES = (
    "punie_connections",
    "punie_sessions",
    "punie_workers",
    "punie_sessions_in_grace",
    "punie_clients_in_grace",
)


def _parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A ``/metrics`` exposition as Prometheus parses it (a malformed one raises), by
    (name, labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scraped(manager: Manager) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return _parsed(manager.metrics.render().decode())


def new_params(cwd: str) -> dict[str, Any]:
    return {"cwd": cwd, "mcpServers": []}


def errors(manager: Manager, code: int) -> float:
    return sum(
        v
        for (name, labels), v in scraped(manager).items()
        if name == "punie_errors_total" and ("code", str(code)) in labels
    )


async def test_an_unwritten_error_answer_sent_on_the_clients_return_counts_once(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """An error answer queued for a connection that dropped before writing it is kept
    for the client's return and sent then, awaited: one error answer, counted once in
    ``punie_errors_total`` (it was counted as it was queued, and again as it was sent)."""
    async with open_hub(
        tmp_path, acp_schema, ScriptModel([]), limits=Limits(grace_seconds=60)
    ) as hub:
        raw, _ = await open_raw_session(hub, "ide")  # (a stream buffer of one)
        await send_unread(raw, "l", "session/list", {}, acp_schema)  # (fills the buffer)
        await send_unread(raw, "x", "nope/nope", {}, acp_schema)  # (its answer stays queued)
        assert errors(hub.manager, -32601) == 1
        await raw.aclose()
        await hub.settle()
        again = await hub.connect()
        await initialize(again.client, client_id="ide", awaiting=["x"])
        answer = await again.client.wait_for(lambda m: m.get("id") == "x")
        assert answer["error"]["code"] == -32601
        await hub.settle()
        assert errors(hub.manager, -32601) == 1


async def test_an_error_answer_lost_in_flight_and_sent_again_counts_once(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A prompt cancelled by ``$/cancel_request`` is answered -32800; the answer is
    written and lost in flight (the client drops unread), and sent again to the client
    back awaiting it: one error answer, counted once."""
    model = ScriptModel([[{"text": "a"}, {"sleep": 5}]])
    async with open_hub(tmp_path, acp_schema, model, limits=Limits(grace_seconds=60)) as hub:
        raw, session = await open_raw_session(hub, "ide", buffer=64)
        await send_unread(raw, "p", "session/prompt", prompt_params(session, "go"), acp_schema)
        cancel = {"jsonrpc": "2.0", "method": "$/cancel_request", "params": {"requestId": "p"}}
        await raw.send_message(json.dumps(cancel))
        await hub.settle()
        assert hub.manager.sessions[session].turn is None
        assert errors(hub.manager, -32800) == 1
        await raw.aclose()
        await hub.settle()
        again = await hub.connect()
        await initialize(again.client, client_id="ide", awaiting=["p"])
        answer = await again.client.wait_for(lambda m: m.get("id") == "p")
        assert answer["error"]["code"] == -32800
        await hub.settle()
        assert errors(hub.manager, -32800) == 1


async def raw_client(url: str, token: str) -> RawClient:
    """A WebSocket client that answers nothing by itself (no pongs), with the token."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    client = RawClient(await trio.open_tcp_stream(host, int(port)))
    await client.stream.send_all(client.ws.send(Request(host=host, target=f"/acp?token={token}")))
    while not any(isinstance(e, AcceptConnection) for e in client.events):
        client._take(await client.stream.receive_some(65536))
    return client


def with_id(client_id: str) -> dict[str, Any]:
    return {"protocolVersion": 1, "_meta": {"punie-trio/clientId": client_id}}


async def test_the_gauges_follow_every_lifecycle_path_on_a_real_server(
    start_server: StartServer,
    tmp_path: Path,
    acp_schema: SchemaChecker,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Scraped over HTTP after each step, ``punie_connections``, ``punie_sessions`` and
    ``punie_workers`` are what the server holds: refused requests (the sessions limit,
    the path policy, a load of a session open elsewhere) and refused upgrades (401, 403,
    a full server's refusal on probation) change nothing; a load of a live session does
    not count it twice; close
    and delete take theirs away; a drop keeps the sessions within grace, a client back
    (also through the take-over of its half-open connection) takes them without a
    second count, the grace's end drops them; and the shutdown leaves nothing."""
    limits = Limits(grace_seconds=60, max_connections=3, max_sessions_per_connection=2)
    auth = [bearer(TOKEN)]

    async def gauges(http: httpx.AsyncClient) -> tuple[float, ...]:
        await settle()
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        got = _parsed(response.text)
        return tuple(got[(name, ())] for name in GAUGES)

    async with (
        start_server(limits=limits, token=TOKEN) as running,
        httpx.AsyncClient(base_url=str(running.url)) as http,
    ):
        assert running.url is not None
        url = ws_url(running.url)
        cwd = str(tmp_path)
        assert await gauges(http) == (0, 0, 0, 0, 0)
        async with acp_client(url, acp_schema, auth) as a:
            await a.request("initialize", with_id("ide"))
            first = await a.new_session(cwd)
            second = await a.new_session(cwd)
            assert await gauges(http) == (1, 2, 1, 0, 0)
            # Refused: a third session (the limit), a cwd outside the roots.
            assert (await expect_error(a, "session/new", new_params(cwd)))["code"] == -32600
            assert (await expect_error(a, "session/new", new_params("/")))["code"] == -32602
            # Loaded while live here: the same session, counted once.
            assert await a.request("session/load", load_params(first, tmp_path)) == {}
            assert await gauges(http) == (1, 2, 1, 0, 0)
            async with acp_client(url, acp_schema, auth) as b:
                await b.initialize()
                refused = await expect_error(b, "session/load", load_params(first, tmp_path))
                assert refused["code"] == -32600  # (open on another connection)
                assert await gauges(http) == (2, 2, 1, 0, 0)
                # Refused upgrades: no token, a foreign Origin. The server full: let in
                # on probation (a client id is held here), refused without one, closed.
                assert (await rejected(url)).status_code == 401
                evil = [origin("http://evil.example"), bearer(TOKEN)]
                assert (await rejected(url, evil)).status_code == 403
                async with acp_client(url, acp_schema, auth) as c:
                    await c.initialize()
                    async with acp_client(url, acp_schema, auth) as over:
                        assert await gauges(http) == (4, 2, 1, 0, 0)  # (open, on probation)
                        init = {"protocolVersion": 1}
                        refused = await expect_error(over, "initialize", init)
                        assert "Connection limit reached" in refused["message"]
                        await over.closed.wait()
                    assert await gauges(http) == (3, 2, 1, 0, 0)
                    limits_hit = running.manager.metrics.tallies.limits
                    assert limits_hit["max_connections"] == 1  # (turned away once)
                assert await gauges(http) == (2, 2, 1, 0, 0)
            # Close, and delete.
            assert await a.request("session/close", {"sessionId": second}) == {}
            third = await a.new_session(cwd)
            assert await a.request("session/delete", {"sessionId": third}) == {}
            assert await gauges(http) == (1, 1, 1, 0, 0)
        # Dropped under a client id: its session is kept within grace.
        assert await gauges(http) == (0, 1, 1, 1, 1)
        # Back within grace, on a connection that then goes half-open.
        silent = await raw_client(running.url, TOKEN)
        await silent.send_json(
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": with_id("ide")}
        )
        await settle()
        assert running.manager.sessions[first].owner is not None
        assert await gauges(http) == (1, 1, 1, 0, 0)
        async with acp_client(url, acp_schema, auth) as back:
            await back.send(
                {"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": with_id("ide")}
            )
            await settle()
            assert await gauges(http) == (2, 1, 1, 0, 0)  # (probing the silent one)
            mock_clock.jump(PROBE_WITHIN)
            await settle_until(lambda: any(m.get("id") == "init" for m in back.received))
            assert running.manager.sessions[first].owner in running.manager.connections
            assert await gauges(http) == (1, 1, 1, 0, 0)
        silent.peek.close()
        await silent.stream.aclose()
        assert await gauges(http) == (0, 1, 1, 1, 1)
        mock_clock.jump(limits.grace_seconds)  # (the grace period ends)
        assert await gauges(http) == (0, 0, 0, 0, 0)
        async with acp_client(url, acp_schema, auth) as d:
            await d.request("initialize", with_id("other"))
            await d.new_session(cwd)
            assert await gauges(http) == (1, 1, 1, 0, 0)
            running.closing.set()  # (shutdown, the client still connected)
            await settle_until(lambda: not running.manager.connections)
    assert _parsed(running.manager.metrics.render().decode())[("punie_sessions", ())] == 0
    got = _parsed(running.manager.metrics.render().decode())
    assert tuple(got[(name, ())] for name in GAUGES) == (0, 0, 0, 0, 0)


async def test_the_exposition_is_prometheus_text_without_tokens_or_paths(
    start_server: StartServer, tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """What a scraper gets: Prometheus text (parsed as Prometheus parses it), with its
    content type, for GET and HEAD (no body); 401 with a reason and a challenge without
    the token (with it, or public). Nothing a client sent shows in it: neither a token
    (right or wrong), nor a path, a method name or a prompt."""
    secret_dir = tmp_path / "secret-project-dir"
    secret_dir.mkdir()
    sent = ["wrong-token-7f3a", TOKEN * 3, "secret-project-dir", "x/secret-method", "secret-words"]
    async with (
        start_server(token=TOKEN * 3) as running,
        httpx.AsyncClient(base_url=str(running.url)) as http,
    ):
        url = ws_url(str(running.url))
        assert (await rejected(url, [bearer("wrong-token-7f3a")])).status_code == 401
        async with acp_client(url, acp_schema, [bearer(TOKEN * 3)]) as client:
            await client.initialize()
            session = await client.new_session(str(secret_dir))
            assert await client.prompt(session, "secret-words") == "end_turn"
            await expect_error(client, "x/secret-method", {})
            await expect_error(client, "session/new", new_params("/secret-project-dir/x"))
            await expect_error(client, "session/load", load_params("sess_x", secret_dir))
        unauthorized = await http.get("/metrics", params={"token": "wrong-token-7f3a"})
        assert unauthorized.status_code == 401
        assert "wrong-token-7f3a" not in unauthorized.text
        assert unauthorized.headers["www-authenticate"].startswith("Bearer ")
        auth = {"Authorization": f"Bearer {TOKEN * 3}"}
        response = await http.get("/metrics", headers=auth)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        got = _parsed(response.text)
        assert got[("punie_prompts_total", (("stop_reason", "end_turn"),))] == 1
        for text in sent:
            assert text not in response.text, text
        head = await http.head("/metrics", headers=auth)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"] == response.headers["content-type"]
        assert (await http.head("/metrics")).status_code == 401


def limits_hit(manager: Manager) -> dict[str, float]:
    """``punie_limits_hit_total`` by limit, those hit only."""
    return {
        dict(labels)["limit"]: v
        for (name, labels), v in scraped(manager).items()
        if name == "punie_limits_hit_total" and v
    }


async def test_each_limit_hit_is_counted_once_under_its_name(
    tmp_path: Path, acp_schema: SchemaChecker, autojump_clock: trio.testing.MockClock
) -> None:
    """A refused session (its connection's limit), a prompt over the size limit, a tool
    call over its rate limit and a prompt over the prompt rate: each counted once in
    ``punie_limits_hit_total`` under the limit's option name, nothing else counted; the
    series are there, at 0, before any is hit."""
    (tmp_path / "f.txt").write_text("data")
    model = ScriptModel([[{"tool": "read_file", "input": {"path": "f.txt"}}, {"text": "x"}]])
    limits = Limits(
        max_prompt_bytes=16,
        max_sessions_per_connection=1,
        prompts_per_minute=2,
        tool_calls_per_minute=1,
    )
    async with open_hub(tmp_path, acp_schema, model, limits=limits) as hub:
        series = [
            dict(labels)["limit"]
            for (name, labels), _ in scraped(hub.manager).items()
            if name == "punie_limits_hit_total"
        ]
        assert set(series) == set(LIMITS) and limits_hit(hub.manager) == {}
        a = await hub.connect()
        await initialize(a.client)
        session = await a.client.new_session(str(hub.root))
        assert (await expect_error(a.client, "session/new", new_params(str(hub.root))))[
            "code"
        ] == -32600
        too_long = prompt_params(session, "x" * 17)
        assert (await expect_error(a.client, "session/prompt", too_long))["code"] == -32602
        assert limits_hit(hub.manager) == {"max_sessions_per_connection": 1, "max_prompt_bytes": 1}
        assert await a.client.prompt(session, "read") == "end_turn"
        assert await a.client.prompt(session, "read again") == "end_turn"  # (its read refused)
        over = await expect_error(a.client, "session/prompt", prompt_params(session, "more"))
        assert "Rate limit" in over["message"]
        assert limits_hit(hub.manager) == {
            "max_sessions_per_connection": 1,
            "max_prompt_bytes": 1,
            "tool_calls_per_minute": 1,
            "prompts_per_minute": 1,
        }


async def test_the_limits_of_clients_that_do_not_keep_up_are_counted(
    tmp_path: Path, acp_schema: SchemaChecker, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that reads nothing holds its turn's updates at its outbox's bound (counted
    as ``outbox``, each time a producer waits); away, its updates past the detached
    buffer make it reload (``detached_buffer``, once a session); and a client away that
    loses its grace early to the connection limit counts as ``max_connections``."""
    model = ScriptModel([[step for i in range(10) for step in ({"text": f"{i} "}, {"sleep": 1})]])
    limits = Limits(outbox_limit=2, detached_buffer=3, max_connections=2, grace_seconds=60)
    async with open_hub(tmp_path, acp_schema, model, limits=limits) as hub:
        raw, session = await open_raw_session(hub, "ide")  # (a stream buffer of one)
        await send_unread(raw, "p", "session/prompt", prompt_params(session, "go"), acp_schema)
        await trio.sleep(10)  # (the turn's updates come 1 s apart: the relay waits)
        assert limits_hit(hub.manager) == {"outbox": 1}  # (once: it waits on)
        await raw.aclose()  # (the turn runs on, its updates kept past the buffer)
        await hub.settle()
        assert limits_hit(hub.manager) == {"outbox": 1, "detached_buffer": 1}
        got = scraped(hub.manager)
        assert got[("punie_sessions_in_grace", ())] == 1
        assert got[("punie_clients_in_grace", ())] == 1
        for client_id in ("two", "three"):  # (away: 1 + 2 clients > 2 connections)
            link = await hub.connect()
            await initialize(link.client, client_id=client_id)
            await link.client.new_session(str(hub.root))
            await link.drop()
            await hub.settle()
        assert limits_hit(hub.manager)["max_connections"] == 1  # ("ide" lost its grace)
        got = scraped(hub.manager)
        assert got[("punie_sessions_in_grace", ())] == 2
        assert got[("punie_clients_in_grace", ())] == 2


async def test_too_many_concurrent_requests_is_counted() -> None:
    """The peer's bound on requests in flight is counted through its observer."""
    metrics = Metrics()
    release = trio.Event()

    async def slow(params: Any) -> Any:
        await release.wait()

    async with trio.open_nursery() as nursery:
        dispatcher = Dispatcher({"slow": slow})
        _, raw = await start_peer(nursery, dispatcher, max_concurrent_requests=1, observer=metrics)
        await raw.send({"id": 1, "method": "slow"})
        await raw.send({"id": 2, "method": "slow"})
        assert (await raw.recv())["id"] == 2
        assert metrics.tallies.limits["concurrent_requests"] == 1
        release.set()
        nursery.cancel_scope.cancel()


class FailingStore:
    """A memory store whose writes named in ``failing`` raise :class:`StoreError`."""

    def __init__(self, *failing: str) -> None:
        self.inner = MemoryStore()
        self.failing = set(failing)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name not in self.failing:
            return method

        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise StoreError(f"{name}: disk I/O error")

        return fail


async def test_store_failures_are_counted_by_operation(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A turn the store failed to save, a session it failed to create, a list it failed to
    read and a delete it failed to do: each counted once in ``punie_store_failures_total``
    under its operation (each answered with its error, the server serving on)."""
    store = FailingStore("append_turn", "list_sessions", "delete_session")
    async with open_hub(tmp_path, acp_schema, ScriptModel([[{"text": "x"}]]), store=store) as hub:
        link = await hub.connect()
        await initialize(link.client)
        session = await link.client.new_session(str(hub.root))
        failed = await expect_error(link.client, "session/prompt", prompt_params(session, "go"))
        assert "not saved" in failed["message"]
        assert (await expect_error(link.client, "session/list", {}))["code"] == -32603
        delete = {"sessionId": session}
        assert (await expect_error(link.client, "session/delete", delete))["code"] == -32603
        store.failing.add("create_session")
        assert (await expect_error(link.client, "session/new", new_params(str(hub.root))))[
            "code"
        ] == -32603
        failures = {
            dict(labels)["operation"]: v
            for (name, labels), v in scraped(hub.manager).items()
            if name == "punie_store_failures_total"
        }
        assert failures == {
            "turn": 1,
            "create_session": 1,
            "update_session": 0,
            "delete_session": 1,
            "read": 1,
        }


def counted(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A counter's nonzero series in a scraped exposition, by labels."""
    return {labels: v for (n, labels), v in _parsed(text).items() if n == name and v}


async def test_refused_upgrades_and_requests_are_counted_by_reason(
    start_server: StartServer, acp_schema: SchemaChecker, tmp_path: Path
) -> None:
    """Each upgrade refused before the ACP connection (a bad key, no token, a foreign
    Origin, a rebindable Host, a path that is not ACP's, the server full) is counted once
    under its status and reason, and so are the plain requests the token or the Host
    check refuse; a refused upgrade takes no connection. With the SQLite store, its size
    on disk (the database and its WAL) is a gauge."""
    async with (
        start_server(token=TOKEN, limits=Limits(max_connections=1)) as running,
        httpx.AsyncClient(base_url=str(running.url)) as http,
    ):
        url = ws_url(str(running.url))
        host = str(running.url).removeprefix("http://")
        auth = f"Authorization: Bearer {TOKEN}"
        bad_key = handshake_request(host, auth).replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"abc")
        address, port = host.rsplit(":", 1)
        async with await trio.open_tcp_stream(address, int(port)) as stream:
            await stream.send_all(bad_key)
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 400 ")
        assert (await rejected(url)).status_code == 401
        assert (await rejected(url, [bearer("wrong")])).status_code == 401
        assert (
            await rejected(url, [origin("http://evil.example"), bearer(TOKEN)])
        ).status_code == 403
        evil = f"evil.example:{port}"
        assert (await raw_handshake(str(running.url), evil, auth)).startswith(b"HTTP/1.1 403 ")
        assert (await raw_handshake(str(running.url), host, auth, path="/health")).startswith(
            b"HTTP/1.1 404 "
        )
        async with acp_client(url, acp_schema, [bearer(TOKEN)]) as client:
            await client.initialize()
            assert (await rejected(url, [bearer(TOKEN)])).status_code == 503
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/health", headers={"Host": evil})).status_code == 403
        assert (await http.get("/metrics", headers={"Host": evil})).status_code == 403
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert counted(response.text, "punie_upgrades_refused_total") == {
            (("reason", "bad_handshake"), ("status", "400")): 1,
            (("reason", "token"), ("status", "401")): 2,
            (("reason", "origin"), ("status", "403")): 1,
            (("reason", "host"), ("status", "403")): 1,
            (("reason", "not_found"), ("status", "404")): 1,
            (("reason", "full"), ("status", "503")): 1,
        }
        assert counted(response.text, "punie_http_refused_total") == {
            (("reason", "token"), ("status", "401")): 1,
            (("reason", "host"), ("status", "403")): 2,
        }
        assert counted(response.text, "punie_limits_hit_total") == {
            (("limit", "max_connections"),): 1
        }
        assert counted(response.text, "punie_connections") == {}
        db = store_path(tmp_path / "data")
        on_disk = sum([(await trio.Path(f"{db}{end}").stat()).st_size for end in ("", "-wal")])
        assert _parsed(response.text)[("punie_store_bytes", ())] == on_disk > 0


def test_every_labelled_series_is_there_at_0_from_the_start() -> None:
    """The docs promise every series from the start, at 0 until its first event: a
    ``rate()`` or ``increase()`` over a series that appears only with its first event
    misses that event (the first cancelled turn, the first -32603). The turns by stop
    reason (ACP's five) and the errors by code (those the server sends) are there too,
    not only the tallies."""
    got = _parsed(Metrics().render().decode())
    prompts = {
        dict(labels)["stop_reason"]: v
        for (n, labels), v in got.items()
        if n == "punie_prompts_total"
    }
    assert prompts == dict.fromkeys(STOP_REASONS, 0)
    errors_by_code = {
        (dict(labels)["code"], dict(labels)["name"]): v
        for (n, labels), v in got.items()
        if n == "punie_errors_total"
    }
    assert errors_by_code == {(str(code), name): 0 for code, name in ERROR_NAMES.items()}


async def test_the_memory_store_has_no_size(
    start_server: StartServer, acp_schema: SchemaChecker
) -> None:
    """No file, no ``punie_store_bytes`` series (0 would read as an empty store)."""
    async with start_server(store="memory") as running:
        assert "punie_store_bytes" not in running.manager.metrics.render().decode()
        async with acp_ws_client(str(running.url), acp_schema) as (client, _):
            await client.initialize()


async def test_a_delete_whose_store_read_fails_says_so_and_deletes_nothing(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A ``session/delete`` of a session not live here reads it from the store first;
    that read failing (a disk error) was taken for "not there", and the delete answered
    ``{}``, done, with the session still stored. It is -32603 naming the trouble now,
    counted as a failed read, and the session stays (a delete that works then removes it)."""
    store = FailingStore()
    async with open_hub(tmp_path, acp_schema, ScriptModel([[{"text": "x"}]]), store=store) as hub:
        link = await hub.connect()
        await initialize(link.client)
        session = await link.client.new_session(str(hub.root))
        assert await link.client.request("session/close", {"sessionId": session}) == {}
        store.failing.add("get_session")
        answer = await link.client.request_raw("session/delete", {"sessionId": session})
        assert answer.get("error", {}).get("code") == -32603, answer
        assert "disk I/O error" in answer["error"]["message"]
        assert await store.inner.get_session(session) is not None
        failures = scraped(hub.manager)
        assert failures[("punie_store_failures_total", (("operation", "read"),))] == 1
        store.failing.clear()
        assert await link.client.request("session/delete", {"sessionId": session}) == {}
        assert await store.inner.get_session(session) is None


async def test_a_turn_whose_model_failed_is_counted_as_a_model_failure(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """A model that raises: its turn is answered -32603 and recorded with the stop reason
    its worker gave it (``end_turn``, with the error), so ``punie_prompts_total`` alone
    showed a failing model as turns that ended well; ``punie_model_failures_total``
    counts it."""
    async with open_hub(tmp_path, acp_schema, RefusesBad()) as hub:
        link = await hub.connect()
        await initialize(link.client)
        session = await link.client.new_session(str(hub.root))
        assert await link.client.prompt(session, "fine") == "end_turn"
        failed = await expect_error(link.client, "session/prompt", prompt_params(session, "boom"))
        assert "the model failed" in failed["message"]
        got = scraped(hub.manager)
        assert got[("punie_model_failures_total", ())] == 1
        assert got[("punie_prompts_total", (("stop_reason", "end_turn"),))] == 2


@attrs.define(eq=False)
class BreaksAfter:
    """A message stream that takes ``ok`` messages, then breaks (a connection lost in the
    middle of the writer's batch); it never receives anything."""

    ok: int
    sent: list[str] = attrs.field(factory=list)

    async def send_message(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if len(self.sent) >= self.ok:
            raise trio.BrokenResourceError("connection lost")
        self.sent.append(text)

    async def receive_message(self) -> str:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_the_messages_written_before_a_connection_breaks_are_counted() -> None:
    """The writer writes a batch one message at a time (a WebSocket's way); the stream
    breaking at the second, the first had been written but was not counted in
    ``punie_messages_out_total`` (only a whole batch was)."""
    metrics = Metrics()
    stream = BreaksAfter(ok=1)
    async with trio.open_nursery() as nursery:
        peer = Peer(stream, Dispatcher({}), observer=metrics)
        nursery.start_soon(peer.run)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(3):  # (queued together: one batch)
            await peer.notify("note", {"n": n})
        await trio.testing.wait_all_tasks_blocked()
    assert len(stream.sent) == 1
    assert _parsed(metrics.render().decode())[("punie_messages_out_total", ())] == 1
