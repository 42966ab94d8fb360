"""Every ``serve`` option a client can see the effect of, given by the config file, by its
``PUNIE_*`` variable over the file, and by its flag over both, through a real
``punie-trio serve`` on port 0 each: the value read back from the running server must be
the winning place's. (``test_config.py`` checks that every option resolves so; this checks
that the resolved value reaches the server.)

Each place gives each option a value of its own, and what the server does tells which one
it took: the host it binds, the root a refused ``session/new`` names, the chunks of an
``echo:N`` model, the limit a refused prompt names, and so on.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from ..acp_schema import SchemaChecker
from ..integration._support import (
    ServerProcess,
    acp_ws_client,
    command_process,
    server_env,
    ws_url,
)
from ._hub import expect_error, prompt_params

PLACES = ("file", "env", "flag")
#: The host each place binds (the loopback network is all 127.x).
HOSTS = {"default": "127.0.0.1", "file": "127.0.0.2", "env": "127.0.0.3", "flag": "127.0.0.4"}
#: What each place sets a number-valued option to, and the default.
NUMBERS = {
    "max_prompt_bytes": (1001, 1002, 1003, 1048576),
    "max_sessions_per_connection": (2, 3, 4, 64),
    "prompts_per_minute": (5, 6, 7, 120),
    "max_connections": (2, 3, 4, 256),
    "max_message_bytes": (100_000, 200_000, 300_000, 16 * 1024 * 1024),
}


def _values(root: Path) -> dict[str, tuple[Any, str, Any]]:
    """Each option: (its TOML value in the file, its variable's text, its flag's value or
    True for an on/off flag)."""
    return {
        "host": (HOSTS["file"], HOSTS["env"], HOSTS["flag"]),
        "project": (
            [str(root / "project-file")],
            str(root / "project-env"),
            str(root / "project-flag"),
        ),
        "data_dir": (str(root / "data-file"), str(root / "data-env"), str(root / "data-flag")),
        "model": ("echo:2", "echo:3", "echo:4"),
        "log_level": ("INFO", "error", "debug"),
        "store": ("memory", "sqlite", "memory"),
        "token": ("token-file", "token-env", "token-flag"),
        "allow_origin": (["http://file.test"], "http://env.test", "http://flag.test"),
        "allow_host": (["file.test"], "env.test", "flag.test"),
        "metrics_public": (True, "off", True),
        "site": (str(root / "site-file"), str(root / "site-env"), str(root / "site-flag")),
        **{name: (file, str(env), str(flag)) for name, (file, env, flag, _) in NUMBERS.items()},
    }


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else str(value)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port in use: the places that lose give it, so a wrong winner cannot start.
    Taken on every address: the places give hosts other than 127.0.0.1, where a port
    taken on 127.0.0.1 alone was free (to a wrong winner, and to the winner's port 0:
    CI once saw the server on 127.0.0.3 get this very port number)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _command(root: Path, winner: str, busy_port: int) -> tuple[list[str], dict[str, str]]:
    """``serve`` with every place up to ``winner`` setting every option (none: defaults)."""
    places = PLACES[: PLACES.index(winner) + 1] if winner != "default" else ()
    env = {**server_env(), "XDG_CONFIG_HOME": str(root / "xdg-config")}
    env["XDG_DATA_HOME"] = str(root / "xdg-data")
    lines = ["[serve]"]
    argv: list[str] = []
    for place in places:
        port = 0 if place == winner else busy_port
        if place == "file":
            lines.append(f"port = {port}")
        elif place == "env":
            env["PUNIE_PORT"] = str(port)
        else:
            argv += ["--port", str(port)]
    if winner == "default":
        argv += ["--port", "0", "--project", str(root / "project-default")]  # (8765 may be in use)
    for name, given in _values(root).items():
        for place in places:
            value = given[PLACES.index(place)]
            if place == "file":
                lines.append(f"{name.replace('_', '-')} = {_toml(value)}")
            elif place == "env":
                env["PUNIE_" + name.upper()] = value
            else:
                flag = "--" + name.replace("_", "-")
                argv += [flag] if value is True else [flag, value]
    config = root / "config.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "punie_trio", "serve", "--config", str(config), *argv]
    return command, env


async def _opens_acp(url: str, token: str, origin: str | None = None) -> bool:
    headers = [(b"authorization", f"Bearer {token}".encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    try:
        async with open_websocket_url(ws_url(url), extra_headers=headers):
            return True
    except ConnectionRejected:
        return False


def _which(found: Any, table: dict[str, Any]) -> str:
    """The place whose value ``found`` is (``table``: place -> value)."""
    return next((place for place, value in table.items() if value == found), repr(found))


async def _hold(url: str, token: str, *, task_status: trio.TaskStatus[None]) -> None:
    headers = [(b"authorization", f"Bearer {token}".encode())]
    async with open_websocket_url(ws_url(url), extra_headers=headers):
        task_status.started()
        await trio.sleep_forever()


async def _read_back(
    server: ServerProcess, root: Path, acp_schema: SchemaChecker, winner: str
) -> dict[str, str]:
    """Which place each option's value came from, as the running server shows it."""
    url = server.url
    got: dict[str, str] = {}
    host = url.removeprefix("http://").rsplit(":", 1)[0]
    got["host"] = _which(host, HOSTS)
    data_dirs = {p: root / f"data-{p}" for p in PLACES} | {"default": root / "xdg-data/punie-trio"}
    logs = [p for p, d in data_dirs.items() if (d / "punie-trio.log").exists()]
    got["data_dir"] = ",".join(logs)
    data_dir = data_dirs[logs[0]] if logs else root
    tokens = {p: f"token-{p}" for p in PLACES}
    opened = [p for p, t in tokens.items() if await _opens_acp(url, t)]
    got["token"] = ",".join(opened) or "default"
    token = tokens[opened[0]] if opened else (data_dir / "token").read_text().strip()
    origins = {p: f"http://{p}.test" for p in PLACES}
    allowed = [p for p, o in origins.items() if await _opens_acp(url, token, o)]
    got["allow_origin"] = ",".join(allowed) or "default"
    got["store"] = "sqlite" if (data_dir / "sessions.sqlite3").exists() else "memory"
    async with httpx.AsyncClient(base_url=url) as http:
        hosts = [
            p
            for p in PLACES
            if (await http.get("/health", headers={"host": f"{p}.test"})).status_code == 200
        ]
        got["allow_host"] = ",".join(hosts) or "default"
        metrics = await http.get("/metrics")
        got["metrics_public"] = {200: "on", 401: "off"}.get(metrics.status_code, str(metrics))
        page = await http.get("/")
        served = re.search(r"site-(\w+)", page.text)
        got["site"] = served.group(1) if served else f"none ({page.status_code})"
    async with acp_ws_client(url, acp_schema, token=token) as (client, _):
        await client.initialize()
        await client.notify("x/unknown_notification")  # (logged at debug level)
        refused = await expect_error(client, "session/new", {"cwd": "/", "mcpServers": []})
        roots = re.findall(r"project-(\w+)", refused["message"])
        got["project"] = ",".join(roots)
        session = await client.new_session(str(root / f"project-{roots[0]}"))
        await client.prompt(session, "a b c d e f g h i j k l")
        chunks = [u for u in client.updates(session) if u["sessionUpdate"] == "agent_message_chunk"]
        got["model"] = {1: "default", 2: "file", 3: "env", 4: "flag"}.get(len(chunks), "?")
        limits = {
            name: dict(zip((*PLACES, "default"), v, strict=True)) for name, v in NUMBERS.items()
        }
        # (Over every place's limit, or over the default's.)
        big = "x" * (1_048_577 if winner == "default" else 1004)
        error = await expect_error(client, "session/prompt", prompt_params(session, big))
        limit = re.search(r"over the (\d+)-byte limit", error["message"])
        got["max_prompt_bytes"] = _which(
            int(limit.group(1)) if limit else 0, limits["max_prompt_bytes"]
        )
        sessions = 1
        while sessions <= 64:
            answer = await client.request_raw(
                "session/new", {"cwd": str(root / f"project-{roots[0]}"), "mcpServers": []}
            )
            if "error" in answer:
                break
            sessions += 1
        got["max_sessions_per_connection"] = _which(sessions, limits["max_sessions_per_connection"])
        prompts = 1
        while prompts <= 120:
            answer = await client.request_raw("session/prompt", prompt_params(session, "hi"))
            if "error" in answer:
                break
            prompts += 1
        got["prompts_per_minute"] = _which(prompts, limits["prompts_per_minute"])
    # The debug line is in the log file (written as it is logged) once the server answered
    # what came after it; the INFO line on stderr comes before the listening line.
    log = (data_dir / "punie-trio.log").read_text(encoding="utf-8")
    if "ignored notification x/unknown_notification" in log:
        got["log_level"] = "debug"
    else:
        got["log_level"] = "info" if " INFO " in server.stderr else "warning or error"
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            try:
                await nursery.start(_hold, url, token)
            except ConnectionRejected as exc:
                full = re.search(rb"limit reached \((\d+)\)", exc.body or b"")
                got["max_connections"] = _which(
                    int(full.group(1)) if full else 0, limits["max_connections"]
                )
                break
        else:
            got["max_connections"] = "default"
        nursery.cancel_scope.cancel()
    closed_at = "default"
    for size, place in zip((150_000, 250_000, 350_000), PLACES, strict=True):
        try:
            async with open_websocket_url(
                ws_url(url), extra_headers=[(b"authorization", f"Bearer {token}".encode())]
            ) as ws:
                await ws.send_message(
                    json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x", "params": "y" * size})
                )
                while json.loads(await ws.get_message()).get("id") is None:
                    pass  # (a message over the bound: its -32600, id null, then the 1009)
        except ConnectionClosed as exc:
            if exc.reason.code == 1009:
                closed_at = place
                break
    got["max_message_bytes"] = closed_at
    return got


#: What each option reads back as, by the place that set it (the same name when it names
#: the place itself).
EXPECTED = {
    "metrics_public": {"default": "off", "file": "on", "env": "off", "flag": "on"},
    "store": {"default": "sqlite", "file": "memory", "env": "sqlite", "flag": "memory"},
    "log_level": {
        "default": "warning or error",
        "file": "info",
        "env": "warning or error",
        "flag": "debug",
    },
    "site": {"default": "none (404)"},
}


@pytest.mark.parametrize("winner", ["default", "file", "env", "flag"])
async def test_every_observable_option_reaches_the_server_from_the_place_that_wins(
    tmp_path: Path, busy_port: int, acp_schema: SchemaChecker, winner: str
) -> None:
    root = Path(await trio.Path(tmp_path).resolve())
    for place in ("default", *PLACES):
        (root / f"project-{place}").mkdir()
        site = root / f"site-{place}"
        site.mkdir()
        (site / "index.html").write_text(f"<html><body>site-{place}</body></html>")
    command, env = _command(root, winner, busy_port)
    with trio.fail_after(60):
        cwd = str(root / "project-default")
        async with command_process(command, env, stdin=subprocess.DEVNULL, cwd=cwd) as server:
            assert not server.url.endswith(f":{busy_port}")
            got = await _read_back(server, root, acp_schema, winner)
    # Every option the places set is read back (and the port: it started on 0, not on
    # the busy port the losing places gave).
    assert set(got) == set(_values(root))
    assert got == {name: EXPECTED.get(name, {}).get(winner, winner) for name in got}
