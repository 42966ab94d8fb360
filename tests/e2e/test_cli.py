"""The ``punie-trio`` command line, as real subprocesses (``python -m punie_trio``)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from punie_trio import __version__
from punie_trio.rpc import ErrorResponse, Notification, Request, Response, parse

TIMEOUT = 60.0
PUNIE = [sys.executable, "-m", "punie_trio"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # Isolated from the user's PUNIE_* variables and config file.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PUNIE_")}
    return dict(clean, PUNIE_DATA_DIR=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path / "cfg"))


def punie(*args: str, env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PUNIE, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def serve_stdio(
    env: dict[str, str], tmp_path: Path, stdin: bytes, **kwargs: Any
) -> subprocess.CompletedProcess[bytes]:
    """``punie-trio serve --stdio --no-http`` for ``tmp_path``, fed ``stdin`` up to EOF;
    stdout and stderr captured as bytes."""
    return subprocess.run(
        [*PUNIE, "serve", "--stdio", "--no-http", "--project", str(tmp_path)],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
        **kwargs,
    )


# -- version and help -------------------------------------------------------------------------


def test_version(env: dict[str, str]) -> None:
    done = punie("--version", env=env)
    assert done.returncode == 0
    assert done.stdout.strip() == f"punie-trio {__version__}"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["sessions"],
        ["sessions", "list"],
        ["sessions", "show"],
        ["sessions", "export"],
        ["token"],
    ],
    ids=lambda c: " ".join(c) or "top",
)
def test_help(env: dict[str, str], command: list[str]) -> None:
    done = punie(*command, "--help", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: punie-trio")
    assert " ".join(["punie-trio", *command]) in done.stdout.splitlines()[0]


def test_serve_help_lists_every_flag(env: dict[str, str]) -> None:
    out = punie("serve", "--help", env=env).stdout
    for flag in (
        "--host",
        "--port",
        "--stdio",
        "--no-http",
        "--project",
        "--model",
        "--log-level",
        "--data-dir",
        "--max-message-bytes",
        "--max-prompt-bytes",
        "--max-sessions-per-connection",
        "--shutdown-timeout",
        "--site",
        "--build",
        "--watch",
        "--ignore",
        "--no-watch",
        "--open",
    ):
        assert flag in out, flag


def test_no_command_is_usage_error(env: dict[str, str]) -> None:
    done = punie(env=env)
    assert done.returncode == 2
    assert "usage: punie-trio" in done.stderr
    assert done.stdout == ""


# -- serve: bad usage -------------------------------------------------------------------------


def test_serve_unknown_model(env: dict[str, str], tmp_path: Path) -> None:
    done = punie(
        "serve", "--stdio", "--no-http", "--model", "bogus", "--project", str(tmp_path), env=env
    )
    assert done.returncode != 0
    assert "bogus" in done.stderr
    assert done.stdout == ""


def test_serve_missing_script(env: dict[str, str], tmp_path: Path) -> None:
    done = punie("serve", "--stdio", "--no-http", "--model", "script:/nonexistent/x.json", env=env)
    assert done.returncode == 2
    assert "punie-trio: error:" in done.stderr
    assert "/nonexistent/x.json" in done.stderr
    assert done.stdout == ""


def test_serve_invalid_script_names_the_place(env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "bad.json"
    script.write_text(json.dumps([[{"text": "ok"}, {"sleep": "soon"}]]), encoding="utf-8")
    done = punie("serve", "--stdio", "--no-http", "--model", f"script:{script}", env=env)
    assert done.returncode == 2
    assert "turns[0][1].sleep" in done.stderr


def test_serve_no_http_needs_stdio(env: dict[str, str]) -> None:
    done = punie("serve", "--no-http", env=env)
    assert done.returncode == 2
    assert "--no-http needs --stdio" in done.stderr


def test_serve_project_must_be_a_directory(env: dict[str, str], tmp_path: Path) -> None:
    done = punie("serve", "--stdio", "--no-http", "--project", str(tmp_path / "nope"), env=env)
    assert done.returncode == 2
    assert "not a directory" in done.stderr


def test_a_project_named_twice_is_one_root(env: dict[str, str], tmp_path: Path) -> None:
    """``--project P --project P/`` (or P through a link) gave the server P twice, and a
    refusal listed it as often: "outside the project roots (P, P, P)"."""
    project = (tmp_path / "project").resolve()
    (project / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(project)
    given = [str(project), f"{project}/", str(tmp_path / "link"), str(project / "sub")]
    agent = StdioAgent([arg for path in given for arg in ("--project", path)], env)
    try:
        assert agent.request("initialize", {"protocolVersion": 1})["result"]
        refused = agent.request("session/new", {"cwd": "/", "mcpServers": []})
        assert refused["error"]["message"] == (
            f"Invalid params: cwd '/' is outside the project roots ({project}, {project}/sub)"
        )
        assert agent.close_stdin_and_wait() == 0
    finally:
        agent.kill()


@pytest.mark.parametrize("case", ["symlink-loop", "too-long", "nul-in-config", "not-utf8"])
def test_serve_project_that_cannot_be_served_is_a_clear_error(
    env: dict[str, str], tmp_path: Path, case: str
) -> None:
    """A ``--project`` that cannot be resolved (a symlink loop, a name too long, a NUL from
    the config file) was a traceback and exit 1; one whose path is not UTF-8 was served,
    though no client can send it as a session's cwd (JSON text is UTF-8), and every
    session/new was then refused as "outside the project roots". Each is exit 2 naming
    the project now, before anything is served."""
    args = ["serve", "--stdio", "--no-http"]
    if case == "symlink-loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        args += ["--project", str(tmp_path / "loop")]
        expected = "cannot be resolved"
    elif case == "too-long":
        args += ["--project", str(tmp_path / ("x" * 300))]
        expected = "cannot be resolved"
    elif case == "nul-in-config":
        config = tmp_path / "config.toml"
        config.write_text('project = ["/tmp/a\\u0000b"]\n')
        args += ["--config", str(config)]
        expected = "config.toml: project must not contain a NUL character"  # (named by its file)
    else:
        project = tmp_path / os.fsdecode(b"caf\xe9")
        project.mkdir()
        args += ["--project", str(project)]
        expected = "is not UTF-8"
    done = punie(*args, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    prefix = "punie-trio: error: " + ("" if case == "nul-in-config" else "--project ")
    assert done.stderr.startswith(prefix)
    assert expected in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "70000"],
        ["--max-prompt-bytes", "0"],
        ["--log-level", "loud"],
        ["--shutdown-timeout", "-1"],
        ["--shutdown-timeout", "nan"],
        ["--grace-seconds", "nan"],
        ["--host", ""],
        ["--token", ""],
        ["--token", " spaced "],
        ["--bogus-flag"],
    ],
)
def test_serve_bad_flag_values(env: dict[str, str], args: list[str]) -> None:
    done = punie("serve", "--stdio", "--no-http", *args, env=env)
    assert done.returncode == 2
    assert "usage:" in done.stderr


def test_a_flag_that_is_not_a_number_names_the_rule(env: dict[str, str]) -> None:
    """argparse's own message named our function ("invalid _port value")."""
    done = punie("serve", "--port", "abc", env=env)
    assert done.returncode == 2
    assert "argument --port: must be an integer, got 'abc'" in done.stderr
    assert "_port" not in done.stderr


@pytest.mark.parametrize(
    ("in_the_way", "message", "extra"),
    [
        ("punie-trio.log", "cannot write the log file", []),
        ("sessions.sqlite3", "cannot open session store", []),
        ("token", "cannot write the token file", []),
        # With a configured token nothing is written: the file an earlier start generated
        # is removed (it said "cannot write the token file", which nothing had tried).
        ("token", "cannot remove the token file an earlier start generated", ["--token", "t"]),
    ],
)
def test_serve_a_directory_where_a_data_file_goes_is_a_message(
    env: dict[str, str], tmp_path: Path, in_the_way: str, message: str, extra: list[str]
) -> None:
    """Each once gave a traceback (and the token case left a stray file with a live token)."""
    data = Path(env["PUNIE_DATA_DIR"])
    (data / in_the_way).mkdir(parents=True)
    done = punie("serve", "--stdio", "--no-http", "--project", str(tmp_path), *extra, env=env)
    assert done.returncode == 1
    assert message in done.stderr and str(data / in_the_way) in done.stderr
    assert "Traceback" not in done.stderr
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a database, just text\n" * 200, "file is not a database"),
        (None, "not a punie-trio session store (it holds other)"),
    ],
)
def test_serve_names_a_store_it_cannot_open_once(
    env: dict[str, str], tmp_path: Path, content: bytes | None, reason: str
) -> None:
    """The message said it twice: "cannot open the session store: PATH: cannot open session
    store: file is not a database" (serve's words, then the store's, which name the path
    and the store already)."""
    data = Path(env["PUNIE_DATA_DIR"])
    data.mkdir(parents=True)
    store = data / "sessions.sqlite3"
    if content is None:
        with sqlite3.connect(store) as conn:
            conn.execute("CREATE TABLE other (a)")
        conn.close()
    else:
        store.write_bytes(content)
    done = punie("serve", "--stdio", "--no-http", "--project", str(tmp_path), env=env)
    assert done.returncode == 1
    assert done.stderr.startswith(f"punie-trio: error: {store}: ")
    assert reason in done.stderr
    assert done.stderr.count("session store") == 1


def test_serve_a_fifo_where_the_log_file_goes_is_a_message_not_a_hang(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A FIFO named ``punie-trio.log`` in the data directory made ``serve`` wait at start
    for ever, for a reader of the FIFO (an audit, 2026-12-07). It is named now, exit 1."""
    data = Path(env["PUNIE_DATA_DIR"])
    data.mkdir(parents=True, exist_ok=True)
    os.mkfifo(data / "punie-trio.log")
    done = punie("serve", "--stdio", "--no-http", "--project", str(tmp_path), env=env)
    assert done.returncode == 1
    assert "cannot write the log file" in done.stderr
    assert "is not a regular file (a FIFO)" in done.stderr
    assert "Traceback" not in done.stderr


def _as_another_user() -> list[str]:
    """The command prefix that runs a child without root's right to write any file (empty
    when the tests do not run as root); skips when that is not possible here."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    try:
        probe = subprocess.run([*prefix, *PUNIE, "--version"], capture_output=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("running as root without setpriv: cannot make a file read-only")
    if probe.returncode != 0:
        pytest.skip("cannot run punie-trio as another user here")
    return prefix


@contextlib.contextmanager
def _served_once(
    env: dict[str, str], *extra: str
) -> Iterator[tuple[Path, dict[str, str], list[str]]]:
    """A data directory where ``serve --stdio --no-http`` (and ``extra``) ran once, under a
    temporary directory other users may enter (not under tmp_path: pytest keeps its base
    directory closed to them): (data directory, env, the serve arguments)."""
    with tempfile.TemporaryDirectory(prefix="punie-ro-") as holder:
        root = Path(holder)
        root.chmod(0o755)
        data, project = root / "data", root / "project"
        project.mkdir()
        env = dict(env, PUNIE_DATA_DIR=str(data), XDG_CONFIG_HOME=str(root / "cfg"))
        args = ["serve", "--stdio", "--no-http", "--project", str(project), *extra]
        assert punie(*args, env=env).returncode == 0
        yield data, env, args


def test_serve_a_read_only_store_is_a_message(env: dict[str, str]) -> None:
    """SQLite opens a write-protected store read-only without a word: the server used to
    start and then answer every ``session/new`` with -32603."""
    prefix = _as_another_user()
    with _served_once(env) as (data, env, args):
        store = data / "sessions.sqlite3"
        before = store.read_bytes()
        data.chmod(0o777)  # only the store is write-protected: the log and token are not
        for file in data.iterdir():
            file.chmod(0o666)
        store.chmod(0o444)
        done = subprocess.run(
            [*prefix, *PUNIE, *args], env=env, capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert f"{store}: the session store is read-only" in done.stderr
        assert "Traceback" not in done.stderr
        assert store.read_bytes() == before


def test_a_configured_token_removes_a_stale_generated_one(
    env: dict[str, str], tmp_path: Path
) -> None:
    """``serve --token X`` once left an earlier start's DATA_DIR/token in place, and
    ``punie-trio token`` then showed a token the server refused."""
    data = Path(env["PUNIE_DATA_DIR"])
    data.mkdir()
    (data / "token").write_text("old-generated\n")
    args = ["serve", "--stdio", "--no-http", "--project", str(tmp_path), "--token", "mine"]
    assert punie(*args, env=env).returncode == 0
    assert not (data / "token").exists()
    done = punie("token", env=env)
    assert done.returncode == 1 and "no token at" in done.stderr


def test_the_config_file_may_be_named_by_punie_config(env: dict[str, str], tmp_path: Path) -> None:
    """docs/cli.md says a flag can also be set as ``PUNIE_<NAME>``, ``--config`` among them,
    but ``$PUNIE_CONFIG`` was ignored without a word: serve ran on the defaults (the
    platform's data directory, a generated token), and ``token`` looked there too. It
    names the file now, for serve and the read-only commands (``--config`` beats it); set
    but empty, or naming no file, it is exit 2, as ``--config`` is."""
    env = {k: v for k, v in env.items() if k != "PUNIE_DATA_DIR"}
    data = tmp_path / "from-env-config"
    config = tmp_path / "punie.toml"
    config.write_text(f'data-dir = "{data}"\ntoken = "s3cret"\n')
    config.chmod(0o600)
    env = dict(env, PUNIE_CONFIG=str(config))
    args = ["serve", "--stdio", "--no-http", "--project", str(tmp_path)]
    done = punie(*args, env=env)
    assert done.returncode == 0, done.stderr
    assert (data / "sessions.sqlite3").exists() and not (data / "token").exists()
    done = punie("token", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"token from: {config}\ntoken: s3cret\n"
    other = tmp_path / "other.toml"
    other.write_text(f'data-dir = "{tmp_path / "other"}"\n')
    done = punie("token", "--config", str(other), env=env)
    assert done.returncode == 1 and f"no token at {tmp_path / 'other' / 'token'}" in done.stderr
    done = punie("token", env=dict(env, PUNIE_CONFG=str(other)))
    assert "$PUNIE_CONFG is not a punie-trio variable" in done.stderr
    assert "did you mean $PUNIE_CONFIG?" in done.stderr
    for value, said in [
        ("", "$PUNIE_CONFIG is set but empty"),
        (str(tmp_path / "none.toml"), f"config file {tmp_path / 'none.toml'} does not exist"),
    ]:
        for command in (args, ["token"], ["sessions", "list"]):
            done = punie(*command, env=dict(env, PUNIE_CONFIG=value))
            assert done.returncode == 2, (command, done.stderr)
            assert done.stderr.startswith("punie-trio: error: ") and said in done.stderr
    # (Checked under --config too, as every variable is under its flag.)
    done = punie("token", "--config", str(other), env=dict(env, PUNIE_CONFIG=""))
    assert done.returncode == 2 and "$PUNIE_CONFIG is set but empty" in done.stderr


def test_a_missing_config_file_named_by_punie_config_names_the_variable(
    env: dict[str, str], tmp_path: Path
) -> None:
    """``PUNIE_CONFIG`` naming no file was ``config file PATH does not exist``, as for
    ``--config PATH``: but a variable set in a shell's profile is nowhere on the command
    line, and docs/configuration.md has every error name where the bad value came from.
    The message names the variable now."""
    missing = tmp_path / "gone.toml"
    for command in (["serve", "--stdio", "--no-http"], ["token"], ["sessions", "list"]):
        done = punie(*command, env=dict(env, PUNIE_CONFIG=str(missing)))
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.startswith(
            f"punie-trio: error: $PUNIE_CONFIG: config file {missing} does not exist"
        ), (command, done.stderr)
    done = punie("token", "--config", str(missing), env=env)  # (the flag: as it was)
    assert done.stderr.startswith(f"punie-trio: error: config file {missing} does not exist")


@pytest.mark.parametrize("command", [["serve"], ["token"], ["sessions", "list"]])
def test_the_help_of_config_names_punie_config(env: dict[str, str], command: list[str]) -> None:
    """``--config``'s help gave the platform's file as its default, as before
    ``$PUNIE_CONFIG`` was read: the variable, which comes first, was in no help."""
    done = punie(*command, "--help", env=env)
    assert done.returncode == 0
    assert "$PUNIE_CONFIG" in " ".join(done.stdout.split())


def test_a_misspelt_environment_variable_is_warned_about(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A misspelt flag or config key is an error, but ``PUNIE_PROT=9000`` was ignored
    without a word and serve ran on its default port. A near miss of an option's variable
    is now named with the one meant; other ``PUNIE_*`` names (the benchmarks set their
    own) are left alone, and the run goes on."""
    args = ["serve", "--stdio", "--no-http", "--project", str(tmp_path)]
    env = dict(env, PUNIE_PROT="9000", PUNIE_GRACE_SECOND="5", PUNIE_BENCH_GC="1")
    done = punie(*args, env=env)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning:" in line]
    assert warnings == [
        "punie-trio: warning: $PUNIE_GRACE_SECOND is not a punie-trio variable and is "
        "ignored; did you mean $PUNIE_GRACE_SECONDS?",
        "punie-trio: warning: $PUNIE_PROT is not a punie-trio variable and is ignored; "
        "did you mean $PUNIE_PORT?",
    ], done.stderr


def test_a_token_in_a_config_file_others_can_read_is_warned_about(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Editors create files 0644: a token in such a config file was readable by every
    local user, and ``serve`` said nothing (``punie-trio token`` warns so of its token
    file). Also where a flag or the environment overrides it, and never showing it."""
    config = tmp_path / "punie.toml"
    config.write_text('token = "s3cret-from-file"\n')
    config.chmod(0o644)
    args = ["serve", "--stdio", "--no-http", "--project", str(tmp_path), "--config", str(config)]
    done = punie(*args, env=env)
    assert done.returncode == 0, done.stderr
    assert (
        f"punie-trio: warning: {config} holds the token and is readable by others (mode "
        f"0644); `chmod 600 {config}`, or give the token in $PUNIE_TOKEN"
    ) in done.stderr
    assert "s3cret-from-file" not in done.stderr
    # The token taken from elsewhere: the file's is readable all the same (a secret to
    # others, and the token of the next start without the flag or the variable). It
    # once got no warning.
    for extra, environ, overrides in [
        (["--token", "flag"], {}, "--token"),
        ([], {"PUNIE_TOKEN": "env"}, "$PUNIE_TOKEN"),
    ]:
        done = punie(*args, *extra, env={**env, **environ})
        assert done.returncode == 0, done.stderr
        assert done.stderr == (
            f"punie-trio: warning: {config} holds a token and is readable by others (mode "
            f"0644), though {overrides} overrides it; `chmod 600 {config}`, or take the "
            "token out of it\n"
        )
    # Private: no warning, wherever the token is taken from.
    config.chmod(0o600)
    for extra, environ in [([], {}), (["--token", "flag"], {}), ([], {"PUNIE_TOKEN": "env"})]:
        done = punie(*args, *extra, env={**env, **environ})
        assert done.returncode == 0 and "warning" not in done.stderr, (extra, environ)
    # `punie-trio token`, printing the file's token, warns as serve does.
    config.chmod(0o644)
    done = punie("token", "--config", str(config), env=env)
    assert done.returncode == 0 and done.stdout.endswith("token: s3cret-from-file\n")
    assert done.stderr == (
        f"punie-trio: warning: {config} holds the token and is readable by others (mode "
        f"0644); `chmod 600 {config}`, or give the token in $PUNIE_TOKEN\n"
    )


# -- serve --stdio --no-http ------------------------------------------------------------------


class StdioAgent:
    """A ``serve --stdio --no-http`` subprocess, talked to line by line."""

    def __init__(self, args: list[str], env: dict[str, str], *, http: bool = False) -> None:
        # (With ``http``: the HTTP server runs too, on a port the system picks.)
        transports = ["--port", "0"] if http else ["--no-http"]
        self.proc = subprocess.Popen(
            [*PUNIE, "serve", "--stdio", *transports, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.stdout_lines: queue.Queue[bytes | None] = queue.Queue()
        self.stdout_all: list[bytes] = []
        self.stderr_all: list[bytes] = []
        self._stderr_changed = threading.Condition()
        self._stderr_ended = False
        self._reading = threading.Event()
        self._reading.set()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(
                target=self._pump, args=(self.proc.stdout, self.stdout_lines), daemon=True
            ),
            threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self._ids = iter(range(1, 1_000_000))

    def _pump(self, stream: IO[bytes], out: queue.Queue[bytes | None]) -> None:
        for line in stream:
            self.stdout_all.append(line)
            out.put(line)
            self._reading.wait()
        out.put(None)

    def stop_reading(self) -> None:
        """Read no more of stdout (after the line being read): the agent's writes fill
        the pipe, as with a client that stopped reading."""
        self._reading.clear()

    def _drain(self, stream: IO[bytes]) -> None:
        for line in stream:
            with self._stderr_changed:
                self.stderr_all.append(line)
                self._stderr_changed.notify_all()
        with self._stderr_changed:
            self._stderr_ended = True
            self._stderr_changed.notify_all()

    def wait_stderr(self, text: bytes) -> bytes:
        """The first stderr line holding ``text``, waiting for it (up to TIMEOUT)."""
        with self._stderr_changed:
            found = self._stderr_changed.wait_for(
                lambda: self._stderr_ended or any(text in line for line in self.stderr_all),
                timeout=TIMEOUT,
            )
            lines = [line for line in self.stderr_all if text in line]
        assert found and lines, f"no {text!r} on stderr:\n{self.stderr_text()}"
        return lines[0]

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, msg: dict[str, Any]) -> None:
        self.send_raw(json.dumps({"jsonrpc": "2.0", **msg}).encode() + b"\n")

    def receive(self) -> dict[str, Any]:
        line = self.stdout_lines.get(timeout=TIMEOUT)
        assert line is not None, "agent closed stdout"
        msg: dict[str, Any] = json.loads(line)
        return msg

    def request(self, method: str, params: Any) -> dict[str, Any]:
        """Send a request; return its answer (notifications before it are skipped)."""
        request_id = next(self._ids)
        self.send({"id": request_id, "method": method, "params": params})
        while True:
            msg = self.receive()
            if msg.get("id") == request_id and "method" not in msg:
                return msg

    def close_stdin_and_wait(self) -> int:
        """The exit status, once stdout and stderr are read to their end (the readers
        joined: the process may exit before they have taken its last lines)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        status = self.proc.wait(timeout=TIMEOUT)
        for reader in self._readers:
            reader.join(timeout=TIMEOUT)
        return status

    def stderr_text(self) -> str:
        return b"".join(self.stderr_all).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reading.set()
        for reader in self._readers:
            reader.join(timeout=TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def stdio_agent(env: dict[str, str], tmp_path: Path) -> Iterator[StdioAgent]:
    project = tmp_path / "project"
    project.mkdir()
    agent = StdioAgent(["--project", str(project)], env)
    agent.project = project  # type: ignore[attr-defined]
    try:
        yield agent
    finally:
        agent.kill()


def test_a_log_line_quoting_what_a_client_sent_is_cut(stdio_agent: StdioAgent) -> None:
    """Answers to requests nobody sent are logged with their id: 20 of them with a 1 MiB
    id once wrote 21 MB to stderr (the log file rotates; stderr does not)."""
    agent = stdio_agent
    agent.request("initialize", {"protocolVersion": 1})
    for n in range(5):
        agent.send({"id": f"{n}" + "x" * 1_000_000, "result": {}})
    assert agent.close_stdin_and_wait() == 0
    lines = [line for line in agent.stderr_all if b"unknown or finished request id" in line]
    assert len(lines) == 5
    assert all(len(line) < 2_200 for line in lines)
    assert b"... (1,000,0" in lines[0]  # says how long the message was


def test_stdout_is_pure_acp_and_stderr_has_the_logs(stdio_agent: StdioAgent) -> None:
    agent = stdio_agent
    project: Path = agent.project  # type: ignore[attr-defined]
    init = agent.request("initialize", {"protocolVersion": 1})
    assert init["result"]["protocolVersion"] == 1
    session = agent.request("session/new", {"cwd": str(project), "mcpServers": []})
    session_id = session["result"]["sessionId"]
    text = "print('hi')\nand a second line"
    prompt = agent.request(
        "session/prompt", {"sessionId": session_id, "prompt": [{"type": "text", "text": text}]}
    )
    assert prompt["result"] == {"stopReason": "end_turn"}
    # Garbage in gets a JSON-RPC error out, never a traceback on stdout.
    agent.send_raw(b"this is not json\n")
    assert agent.receive()["error"]["code"] == -32700
    # An error without an id from the client is logged (a warning: shown by default).
    agent.send({"id": None, "error": {"code": -32603, "message": "client confused"}})
    refused = agent.request("session/new", {"cwd": "relative", "mcpServers": []})
    assert refused["error"]["code"] == -32602
    assert agent.close_stdin_and_wait() == 0

    lines = b"".join(agent.stdout_all).split(b"\n")
    assert lines[-1] == b""  # every message ends with a newline
    messages = [parse(line) for line in lines[:-1]]
    assert all(isinstance(m, Request | Notification | Response | ErrorResponse) for m in messages)
    updates = [
        m.params["update"]
        for m in messages
        if isinstance(m, Notification) and m.method == "session/update" and m.params
    ]
    assert "".join(u["content"]["text"] for u in updates[:-1]) == text
    # The first answer names the session after the prompt's first line.
    assert updates[-1] == {"sessionUpdate": "session_info_update", "title": "print('hi')"}
    stderr = agent.stderr_text()
    assert "without an id" in stderr
    assert "WARNING" in stderr


def test_every_bad_line_on_stdin_gets_its_error_and_the_agent_reads_on(
    env: dict[str, str], tmp_path: Path
) -> None:
    """What a client may write on stdin, line by line, as ``serve --stdio`` reads it: a
    byte-order mark, CRLF, blank lines, a batch, JSON that is no object, bad UTF-8, a line
    over --max-message-bytes, a last line without its newline. Each bad one gets its
    error naming the problem (a JSON type as JSON names it: it said "got NoneType"), and
    the request after it is answered."""
    limits = ["--max-message-bytes", "300", "--max-prompt-bytes", "200"]
    agent = StdioAgent(["--project", str(tmp_path), *limits], env)
    try:
        init = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":1}}'
        agent.send_raw(b"\xef\xbb\xbf" + init + b"\r\n\r\n  \t \n\n")
        assert agent.receive()["result"]["protocolVersion"] == 1
        listed = {"jsonrpc": "2.0", "method": "session/list", "params": {}}

        def refused(line: bytes) -> dict[str, Any]:
            agent.send_raw(line + b"\n")
            error = agent.receive()
            agent.send({**listed, "id": "next"})  # and the agent reads on
            assert agent.receive() == {"jsonrpc": "2.0", "id": "next", "result": {"sessions": []}}
            return error

        batch = refused(json.dumps([{**listed, "id": 2}]).encode())
        assert batch["id"] == 2 and batch["error"] == {
            "code": -32600,
            "message": "Batch requests are not supported: send each message on its own (a "
            "line, or a frame)",
        }
        for text, kind in [
            (b"42", "a number"), (b'"text"', "a string"), (b"null", "null"),
            (b"true", "a boolean"), (b"[]", None),
        ]:  # fmt: skip
            answer = refused(text)
            assert answer["id"] is None and answer["error"]["code"] == -32600, text
            if kind is not None:
                expected = f"Invalid request: expected a JSON object, got {kind}"
                assert answer["error"]["message"] == expected
        bad = refused(b'{"jsonrpc":"2.0","method":"session/list","params":{"cwd":"\xff"}}')
        assert bad["id"] is None and bad["error"]["code"] == -32700
        assert "can't decode byte 0xff" in bad["error"]["message"]
        big = refused(json.dumps({**listed, "id": 3, "params": {"cwd": "/" * 400}}).encode())
        assert big["id"] == 3 and big["error"] == {
            "code": -32600,
            "message": "Invalid request: message exceeds the 300-byte limit",
        }
        agent.send_raw(json.dumps({**listed, "id": 4}).encode())  # no newline, then EOF
        assert agent.close_stdin_and_wait() == 0
        assert json.loads(agent.stdout_all[-1]) == {
            "jsonrpc": "2.0", "id": 4, "result": {"sessions": []}
        }  # fmt: skip
        assert all(line.endswith(b"\n") for line in agent.stdout_all)
    finally:
        agent.kill()


def test_a_request_or_answer_that_is_not_json_is_told_apart_by_its_id(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Over stdio, a client's line whose JSON breaks after its id (bad UTF-8 in a file's
    text): a request gets its -32700 under its id, and the client's answer to the
    server's ``fs/read_text_file`` fails that tool call at once, saying why. The request's
    -32700 had a null id (the client waited for its answer for good), and the tool call
    waited out --client-call-timeout, then said "client did not answer"."""
    (tmp_path / "notes.txt").write_text("notes", encoding="utf-8")
    script = tmp_path / "tool.json"
    turn = [{"tool": "read_file", "input": {"path": "notes.txt"}}, {"text": "done"}]
    script.write_text(json.dumps({"turns": [turn]}), encoding="utf-8")
    args = ["--project", str(tmp_path), "--model", f"script:{script}"]
    agent = StdioAgent([*args, "--client-call-timeout", "3600"], env)
    try:
        caps = {"fs": {"readTextFile": True}}
        agent.request("initialize", {"protocolVersion": 1, "clientCapabilities": caps})
        agent.send_raw(
            b'{"jsonrpc":"2.0","id":"bad","method":"session/list","params":{"cwd":"\xff"}}\n'
        )
        refused = agent.receive()
        assert refused["id"] == "bad" and refused["error"]["code"] == -32700, refused
        session = agent.request("session/new", {"cwd": str(tmp_path), "mcpServers": []})
        session_id = session["result"]["sessionId"]
        prompt = {"sessionId": session_id, "prompt": [{"type": "text", "text": "go"}]}
        agent.send({"id": "p", "method": "session/prompt", "params": prompt})
        while (read := agent.receive()).get("method") != "fs/read_text_file":
            pass
        answer = f'{{"jsonrpc":"2.0","id":{json.dumps(read["id"])},"result":{{"content":"'
        agent.send_raw(answer.encode() + b'caf\xe9"}}\n')
        told = agent.receive()
        assert told["id"] is None and told["error"]["code"] == -32700, told
        updates = []
        while "method" in (msg := agent.receive()):
            updates.append(msg["params"]["update"])
        assert msg == {"jsonrpc": "2.0", "id": "p", "result": {"stopReason": "end_turn"}}
        failed = [u for u in updates if u.get("status") == "failed"]
        text = failed[0]["content"][0]["content"]["text"]
        assert text.startswith("the answer is not JSON: 'utf-8' codec can't decode byte 0xe9"), text
        assert agent.close_stdin_and_wait() == 0
    finally:
        agent.kill()


def test_stdin_eof_ends_the_server_with_status_0(stdio_agent: StdioAgent) -> None:
    assert stdio_agent.request("initialize", {"protocolVersion": 1})["result"]
    assert stdio_agent.close_stdin_and_wait() == 0


def test_stdin_eof_closes_stdout_while_http_serves_on(env: dict[str, str], tmp_path: Path) -> None:
    """With the HTTP server running too, stdin EOF ends the stdio connection but not the
    process: stdout must still reach EOF, as docs/cli.md says, or an IDE reading it to
    the end waits for good. Only the server's duplicate of fd 1 was closed; fd 1 stayed
    open, and the reader never saw EOF while the process lived."""
    agent = StdioAgent(["--project", str(tmp_path)], env, http=True)
    try:
        agent.wait_stderr(b"punie-trio listening on")
        assert agent.request("initialize", {"protocolVersion": 1})["result"]
        assert agent.proc.stdin is not None
        agent.proc.stdin.close()
        assert agent.stdout_lines.get(timeout=TIMEOUT) is None  # EOF, the process alive
        assert agent.proc.poll() is None
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=TIMEOUT) == 0
    finally:
        agent.kill()


def test_stdin_eof_with_stdout_unread_ends_the_connection_while_http_serves_on(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The HTTP server running too, a stdio client that closed stdin and stopped reading
    stdout mid-turn: its answers get --shutdown-timeout to go out, then the connection
    ends (its sessions free for a WebSocket client to load), the turn recorded as
    cancelled. The connection, its session and its worker stayed until the server
    stopped."""
    script = tmp_path / "flood.json"
    script.write_text(json.dumps({"turns": [[{"text": "y" * 65536}] * 200]}))
    args = ["--project", str(tmp_path), "--model", f"script:{script}"]
    agent = StdioAgent([*args, "--shutdown-timeout", "1", "--token", "T"], env, http=True)
    try:
        url = agent.wait_stderr(b"punie-trio listening on").split()[3].decode()
        assert agent.request("initialize", {"protocolVersion": 1})["result"]
        session = agent.request("session/new", {"cwd": str(tmp_path), "mcpServers": []})
        session_id = session["result"]["sessionId"]
        prompt = {"sessionId": session_id, "prompt": [{"type": "text", "text": "flood"}]}
        agent.send({"id": 3, "method": "session/prompt", "params": prompt})
        assert agent.receive()["method"] == "session/update"
        agent.stop_reading()
        assert agent.proc.stdin is not None
        agent.proc.stdin.close()
        deadline = time.monotonic() + TIMEOUT
        while True:
            health = httpx.get(f"{url}/health", headers={"authorization": "Bearer T"}).json()
            if health["connections"] == 0:
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.1)
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=TIMEOUT) == 0
    finally:
        agent.kill()
    shown = punie("sessions", "show", session_id, env=env)
    assert "stop: cancelled" in shown.stdout, shown.stdout


def test_a_child_process_gets_neither_the_acp_stdout_nor_stdin(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Processes the server starts (here the browser ``--open`` runs, from $BROWSER) write
    to stderr, not into the ACP stream, and read nothing of the client's messages. The
    browser's line once went out on stdout, where the IDE took it for a broken message,
    and a program reading stdin took the client's requests."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<p>hi</p>", encoding="utf-8")
    browser = "sh -c 'echo opened by the browser; read line; echo \"browser read [$line]\" >&2' %s"
    args = ["--project", str(tmp_path), "--site", str(site), "--no-watch", "--open"]
    agent = StdioAgent(args, {**env, "BROWSER": browser}, http=True)
    try:
        agent.wait_stderr(b"opened by the browser")
        assert agent.wait_stderr(b"browser read [").strip() == b"browser read []"
        assert agent.request("initialize", {"protocolVersion": 1})["result"]
        assert agent.proc.stdin is not None
        agent.proc.stdin.close()
        assert agent.stdout_lines.get(timeout=TIMEOUT) is None
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=TIMEOUT) == 0
        assert [json.loads(line)["id"] for line in agent.stdout_all] == [1]
    finally:
        agent.kill()


@pytest.mark.parametrize("closed", ["stdin", "stdout"])
def test_stdio_with_stdin_or_stdout_closed_is_an_error(
    env: dict[str, str], tmp_path: Path, closed: str
) -> None:
    """Started with fd 0 or 1 closed (``<&-``, ``>&-``), the next file the server opened
    took that descriptor: it read its own lock file as requests ("expected a JSON object,
    got int", written to stdout) or wrote ACP into a file of the data directory, and
    exited 0."""
    redirect = "<&-" if closed == "stdin" else ">&-"
    done = subprocess.run(
        ["sh", "-c", f'exec "$@" {redirect}', "sh", *PUNIE, "serve", "--stdio", "--no-http",
         "--project", str(tmp_path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"--stdio needs an open {closed}" in done.stderr.decode(), done.stderr
    assert not done.stdout
    assert not (tmp_path / "data" / "sessions.sqlite3").exists()  # nothing was started


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_that_cannot_be_written_is_an_error(env: dict[str, str], tmp_path: Path) -> None:
    """A stdout that fails (a full disk: ``> /dev/full``) loses every answer: that is said
    on stderr and the exit status is 1. The answers were dropped without a word, status 0."""
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": 1}},
        {"jsonrpc": "2.0", "id": 2, "method": "session/list", "params": {}},
    ]
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [*PUNIE, "serve", "--stdio", "--no-http", "--project", str(tmp_path)],
            input="".join(json.dumps(line) + "\n" for line in lines).encode(),
            stdout=full,
            stderr=subprocess.PIPE,
            env=env,
            timeout=TIMEOUT,
        )
    assert done.returncode == 1, done.stderr
    stderr = done.stderr.decode()
    assert "punie-trio: error: cannot write to stdout: No space left on device" in stderr, stderr
    assert "Traceback" not in stderr


def test_stderr_nobody_reads_does_not_stop_the_server(env: dict[str, str], tmp_path: Path) -> None:
    """An IDE may pipe the agent's stderr and never read it (ACP: clients MAY ignore the
    logs). Once the pipe was full, the next log line blocked the whole server: no request
    was read or answered again (nor any WebSocket client's). Lines stderr cannot take are
    dropped, and how many is said once it takes lines again."""
    agent = subprocess.Popen(
        [*PUNIE, "serve", "--stdio", "--no-http", "--project", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert agent.stdin is not None and agent.stdout is not None and agent.stderr is not None
    answers: queue.Queue[bytes] = queue.Queue()
    # 3,000 warnings of about 400 bytes each: several times what a pipe holds.
    noise = {"jsonrpc": "2.0", "id": None, "error": {"code": 1, "message": "x" * 300}}
    lines = [json.dumps(noise).encode() + b"\n"] * 3000
    lines.append(b'{"jsonrpc":"2.0","id":7,"method":"initialize","params":{"protocolVersion":1}}\n')

    def write() -> None:
        assert agent.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            agent.stdin.write(b"".join(lines))
            agent.stdin.flush()

    writer = threading.Thread(target=write, daemon=True)
    reader = threading.Thread(target=lambda: answers.put(agent.stdout.readline()), daemon=True)
    try:
        writer.start()
        reader.start()
        assert json.loads(answers.get(timeout=TIMEOUT))["id"] == 7
        writer.join(timeout=TIMEOUT)
        agent.stdin.close()
        stderr = agent.stderr.read().decode()  # read only now, to its end
        assert agent.wait(timeout=TIMEOUT) == 0
    finally:
        agent.kill()
        agent.wait()
    warnings = stderr.count("peer sent an error without an id")
    assert 0 < warnings < 3000
    assert f"punie-trio: {3000 - warnings} log lines dropped: stderr was not read" in stderr


def test_stderr_closed_at_start_takes_nothing(env: dict[str, str], tmp_path: Path) -> None:
    """Started with stderr closed (``2>&-``), descriptor 2 goes to the next file opened
    (the data directory's lock): the log lines, and what else writes to stdout under
    --stdio (a copy of stderr), must not go into it. The file log keeps them."""
    data = tmp_path / "data"
    lines = [
        {"jsonrpc": "2.0", "id": None, "error": {"code": 1, "message": "a warning"}},
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": 1}},
    ]
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" 2>&-', "sh", *PUNIE, "serve", "--stdio", "--no-http",
         "--project", str(tmp_path)],
        input="".join(json.dumps(line) + "\n" for line in lines).encode(),
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == [1]
    assert (data / "serve.lock").read_text().strip().isdigit()
    assert "without an id" in (data / "punie-trio.log").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("args", "environ", "status"),
    [
        (["serve", "--stdio", "--no-http"], {"PUNIE_PORTT": "1"}, 0),  # a warning
        (["serve", "--stdio", "--no-http", "--max-prompt-bytes", "99999999"], {}, 2),  # an error
        (["sessions", "show", "nosuch"], {}, 1),
    ],
)
def test_without_a_stderr_no_warning_or_error_goes_to_stdout(
    env: dict[str, str], tmp_path: Path, args: list[str], environ: dict[str, str], status: int
) -> None:
    """Started with stderr closed (``2>&-``), Python's ``sys.stderr`` is None, and a
    ``print(..., file=sys.stderr)`` prints to stdout: under --stdio a config warning or an
    error went into the ACP stream (``punie-trio: warning: $PUNIE_PORTT is not ...``, a
    line no client can parse), and a read-only command's error into its output."""
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": 1}}
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" 2>&-', "sh", *PUNIE, *args, "--project", str(tmp_path)]
        if args[0] == "serve"
        else ["sh", "-c", 'exec "$@" 2>&-', "sh", *PUNIE, *args],
        input=json.dumps(init).encode() + b"\n",
        capture_output=True,
        env={**env, **environ},
        timeout=TIMEOUT,
    )
    assert done.returncode == status, done.stdout
    expected = [1] if status == 0 else []
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == expected


@contextlib.contextmanager
def full_pipe() -> Iterator[int]:
    """The write end of a pipe already full: every write to it waits (for a reader that
    never comes), as with an IDE that pipes the agent's stderr and never reads it."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_end, b"x" * 65536)
    os.set_blocking(write_end, True)
    try:
        yield write_end
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_second_signal_exits_at_once_with_stderr_full(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The second signal's "exiting now" line was printed, then the process exited: with
    a stderr nobody reads and full, the print waited for good, so the process did not exit
    (the watchdog, which prints too, could not end it either); only SIGKILL did."""
    script = tmp_path / "flood.json"
    script.write_text(json.dumps({"turns": [[{"text": "y" * 65536}] * 200]}))
    with contextlib.ExitStack() as stack:
        stderr = stack.enter_context(full_pipe())  # (open, and full, as long as the test)
        agent = subprocess.Popen(
            [
                *PUNIE, "serve", "--stdio", "--no-http", "--project", str(tmp_path),
                "--model", f"script:{script}", "--shutdown-timeout", "600",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )  # fmt: skip
        stack.callback(agent.wait)
        stack.callback(agent.kill)
        _second_signal_with_stderr_full(agent, tmp_path)


def _second_signal_with_stderr_full(agent: subprocess.Popen[bytes], tmp_path: Path) -> None:
    assert agent.stdin is not None and agent.stdout is not None
    log_file = tmp_path / "data" / "punie-trio.log"

    def call(msg: dict[str, Any]) -> dict[str, Any]:
        assert agent.stdin is not None and agent.stdout is not None
        agent.stdin.write(json.dumps({"jsonrpc": "2.0", **msg}).encode() + b"\n")
        agent.stdin.flush()
        answer: dict[str, Any] = json.loads(agent.stdout.readline())
        return answer

    assert call({"id": 1, "method": "initialize", "params": {"protocolVersion": 1}})
    params = {"cwd": str(tmp_path), "mcpServers": []}
    session = call({"id": 2, "method": "session/new", "params": params})["result"]
    prompt = {"sessionId": session["sessionId"], "prompt": [{"type": "text", "text": "go"}]}
    # stdout is read no more: the shutdown waits (up to --shutdown-timeout) to drain it.
    assert call({"id": 3, "method": "session/prompt", "params": prompt})["method"]
    agent.send_signal(signal.SIGTERM)
    # (stderr takes nothing: the log file tells when the first signal was taken.)
    deadline = time.monotonic() + TIMEOUT
    while "received SIGTERM, shutting down" not in log_file.read_text(encoding="utf-8"):
        assert agent.poll() is None
        assert time.monotonic() < deadline, "the first signal was not logged"
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=TIMEOUT) == 1


@pytest.mark.parametrize("stderr", ["closed pipe", "/dev/full"])
def test_a_stderr_that_cannot_be_written_does_not_stop_serve(
    env: dict[str, str], tmp_path: Path, stderr: str
) -> None:
    """An IDE that closed its end of the agent's stderr (or a stderr on a full disk): the
    "listening on" line cannot be written. serve exited 1 right after it started, without
    a word anywhere (the log file said nothing), so the stdio client got no answer."""
    if stderr == "/dev/full" and not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    with contextlib.ExitStack() as stack:
        if stderr == "closed pipe":
            read_end, write_end = os.pipe()
            os.close(read_end)
        else:
            write_end = os.open("/dev/full", os.O_WRONLY)
        stack.callback(os.close, write_end)
        agent = subprocess.Popen(
            [*PUNIE, "serve", "--stdio", "--port", "0", "--project", str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=write_end,
            env=env,
        )
        stack.callback(agent.wait)
        stack.callback(agent.kill)
        assert agent.stdin is not None and agent.stdout is not None
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": 1}}
        agent.stdin.write(json.dumps(init).encode() + b"\n")
        agent.stdin.flush()
        assert json.loads(agent.stdout.readline())["id"] == 1
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=TIMEOUT) == 0
    log_file = (tmp_path / "data" / "punie-trio.log").read_text(encoding="utf-8")
    assert "cannot write to stderr" in log_file


def test_stdin_eof_right_away(env: dict[str, str], tmp_path: Path) -> None:
    done = serve_stdio(env, tmp_path, b"")
    assert done.returncode == 0
    assert done.stdout == b""


def test_logs_go_to_the_data_dir_log_file(env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = serve_stdio(
        env, tmp_path, b'{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"x"}}\n'
    )
    assert done.returncode == 0
    log_file = data / "punie-trio.log"
    assert log_file.is_file()
    assert "without an id" in log_file.read_text(encoding="utf-8")
    assert b"without an id" in done.stderr


def test_store_and_log_are_private_in_a_data_dir_that_is_not(
    env: dict[str, str], tmp_path: Path
) -> None:
    """In a data directory that already existed with mode 0755 (under umask 022), the
    session store and the log are still created 0600: they hold transcripts and prompts.
    They were 0644, readable by every local user."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    done = serve_stdio(env, tmp_path, b"", umask=0o022)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(data.stat().st_mode) == 0o755  # the user's choice, left alone
    for name in ("sessions.sqlite3", "punie-trio.log", "token"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name


def test_stdin_eof_with_stdout_unread_still_exits(env: dict[str, str], tmp_path: Path) -> None:
    """An IDE that closed stdin and stopped reading stdout mid-turn (the turn's output fills
    the pipe): the process exits 0 within about twice --shutdown-timeout, the turn
    recorded as cancelled. It stayed alive for good, the turn never recorded."""
    script = tmp_path / "flood.json"
    script.write_text(json.dumps({"turns": [[{"text": "y" * 65536}] * 200]}))
    agent = subprocess.Popen(
        [
            *PUNIE, "serve", "--stdio", "--no-http", "--project", str(tmp_path),
            "--model", f"script:{script}", "--shutdown-timeout", "1",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    assert agent.stdin is not None and agent.stdout is not None
    try:
        lines = [
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": 1}},
            {
                "jsonrpc": "2.0", "id": 2, "method": "session/new",
                "params": {"cwd": str(tmp_path), "mcpServers": []},
            },
        ]  # fmt: skip
        answers = []
        for line in lines:  # one at a time: answers may come in any order
            agent.stdin.write((json.dumps(line) + "\n").encode())
            agent.stdin.flush()
            answers.append(json.loads(agent.stdout.readline()))
        session = answers[1]["result"]["sessionId"]
        prompt = {"sessionId": session, "prompt": [{"type": "text", "text": "flood"}]}
        prompt_line = {"jsonrpc": "2.0", "id": 3, "method": "session/prompt", "params": prompt}
        agent.stdin.write((json.dumps(prompt_line) + "\n").encode())
        agent.stdin.flush()
        assert json.loads(agent.stdout.readline())["method"] == "session/update"
        agent.stdin.close()  # and stdout is read no more
        assert agent.wait(TIMEOUT) == 0
    finally:
        agent.kill()
        agent.wait()
    shown = punie("sessions", "show", session, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "stop: cancelled" in shown.stdout


def test_a_lone_surrogate_in_a_log_line_is_escaped_not_a_logging_error(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Log lines can quote a client's text; a lone surrogate (valid JSON) cannot be encoded
    as UTF-8 and once made logging print "--- Logging error ---" and a traceback."""
    data = tmp_path / "data"
    done = serve_stdio(
        env,
        tmp_path,
        b'{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"odd \\ud800 text"}}\n',
    )
    assert done.returncode == 0
    assert b"odd \\ud800 text" in done.stderr
    assert b"Logging error" not in done.stderr
    assert "odd \\ud800 text" in (data / "punie-trio.log").read_text(encoding="utf-8")


def test_data_dir_flag_overrides_the_environment(env: dict[str, str], tmp_path: Path) -> None:
    chosen = tmp_path / "chosen"
    done = subprocess.run(
        [
            *PUNIE,
            "serve",
            "--stdio",
            "--no-http",
            "--project",
            str(tmp_path),
            "--data-dir",
            str(chosen),
        ],
        input=b"",
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0
    assert (chosen / "punie-trio.log").is_file()
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("level", ["error", "ERROR"])
def test_log_level_error_silences_warnings(env: dict[str, str], tmp_path: Path, level: str) -> None:
    """--log-level takes any case, like the file and $PUNIE_LOG_LEVEL."""
    done = subprocess.run(
        [
            *PUNIE,
            "serve",
            "--stdio",
            "--no-http",
            "--project",
            str(tmp_path),
            "--log-level",
            level,
        ],
        input=b'{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"x"}}\n',
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0
    assert b"without an id" not in done.stderr
    # The file log still records at info level or below.
    assert "without an id" in (tmp_path / "data" / "punie-trio.log").read_text(encoding="utf-8")


def test_piped_requests_are_all_answered_after_stdin_eof(
    env: dict[str, str], tmp_path: Path
) -> None:
    """stdin EOF closes only the client's half: every request read before it is answered."""
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": 1}},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "session/new",
            "params": {"cwd": str(tmp_path), "mcpServers": []},
        },
        {"jsonrpc": "2.0", "id": 3, "method": "session/list", "params": {}},
    ]
    done = serve_stdio(env, tmp_path, "".join(json.dumps(line) + "\n" for line in lines).encode())
    assert done.returncode == 0, done.stderr
    answers = {m["id"]: m for m in map(json.loads, done.stdout.decode().splitlines())}
    assert sorted(answers) == [1, 2, 3]
    assert answers[2]["result"]["sessionId"].startswith("sess_")
    assert all("result" in a for a in answers.values())


def test_a_prompt_running_at_stdin_eof_answers_cancelled(
    env: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "slow.json"
    script.write_text(json.dumps([[{"text": "working"}, {"sleep": 600}]]))
    model = f"script:{script}"
    agent = subprocess.Popen(
        [*PUNIE, "serve", "--stdio", "--no-http", "--project", str(tmp_path), "--model", model],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert agent.stdin is not None and agent.stdout is not None

    def call(msg: dict[str, Any]) -> None:
        assert agent.stdin is not None
        agent.stdin.write((json.dumps(msg) + "\n").encode())
        agent.stdin.flush()

    def read() -> dict[str, Any]:
        assert agent.stdout is not None
        line: dict[str, Any] = json.loads(agent.stdout.readline())
        return line

    try:
        call({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": 1}})
        assert read()["id"] == 1
        params = {"cwd": str(tmp_path), "mcpServers": []}
        call({"jsonrpc": "2.0", "id": 2, "method": "session/new", "params": params})
        session = read()["result"]["sessionId"]
        prompt = {"sessionId": session, "prompt": [{"type": "text", "text": "go"}]}
        call({"jsonrpc": "2.0", "id": 3, "method": "session/prompt", "params": prompt})
        assert read()["method"] == "session/update"  # the turn is running
        agent.stdin.close()
        title = read()["params"]["update"]
        assert title == {"sessionUpdate": "session_info_update", "title": "go"}
        assert read() == {"jsonrpc": "2.0", "id": 3, "result": {"stopReason": "cancelled"}}
        assert agent.wait(TIMEOUT) == 0
    finally:
        agent.kill()
        agent.wait()


def _stdio_turn_running(
    env: dict[str, str], tmp_path: Path, steps: list[dict[str, Any]]
) -> tuple[subprocess.Popen[bytes], str]:
    """``serve --stdio --no-http`` with a scripted turn of ``steps`` running (its first
    update read): the process and the session's id."""
    script = tmp_path / "turn.json"
    script.write_text(json.dumps({"turns": [steps]}), encoding="utf-8")
    agent = subprocess.Popen(
        [*PUNIE, "serve", "--stdio", "--no-http", "--project", str(tmp_path),
         "--model", f"script:{script}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )  # fmt: skip
    assert agent.stdin is not None and agent.stdout is not None

    def call(msg: dict[str, Any]) -> dict[str, Any]:
        assert agent.stdin is not None and agent.stdout is not None
        agent.stdin.write(json.dumps({"jsonrpc": "2.0", **msg}).encode() + b"\n")
        agent.stdin.flush()
        answer: dict[str, Any] = json.loads(agent.stdout.readline())
        return answer

    call({"id": 1, "method": "initialize", "params": {"protocolVersion": 1}})
    params = {"cwd": str(tmp_path), "mcpServers": []}
    session: str = call({"id": 2, "method": "session/new", "params": params})["result"]["sessionId"]
    prompt = {"sessionId": session, "prompt": [{"type": "text", "text": "go"}]}
    assert call({"id": 3, "method": "session/prompt", "params": prompt})["method"]
    return agent, session


def test_a_client_closing_stdout_mid_turn_ends_the_agent_cleanly(
    env: dict[str, str], tmp_path: Path
) -> None:
    """An IDE that closes its end of the agent's stdout while a turn streams (a broken
    pipe): the agent ends as at EOF, status 0, no traceback, the turn recorded as
    cancelled and the store left whole for the next start."""
    agent, session = _stdio_turn_running(env, tmp_path, [{"text": "y" * 65536}] * 200)
    try:
        assert agent.stdout is not None
        agent.stdout.close()
        assert agent.wait(TIMEOUT) == 0
        assert agent.stderr is not None
        assert b"Traceback" not in agent.stderr.read()
    finally:
        _ended(agent)
    shown = punie("sessions", "show", session, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "stop: cancelled" in shown.stdout


def _ended(agent: subprocess.Popen[bytes]) -> None:
    agent.kill()
    agent.wait()
    for pipe in (agent.stdin, agent.stdout, agent.stderr):
        if pipe is not None:
            pipe.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_mid_turn_over_stdio_answers_cancelled_and_exits_0(
    env: dict[str, str], tmp_path: Path, signum: signal.Signals
) -> None:
    agent, session = _stdio_turn_running(env, tmp_path, [{"text": "working"}, {"sleep": 600}])
    try:
        agent.send_signal(signum)
        assert agent.stdout is not None
        rest = [json.loads(line) for line in agent.stdout.read().splitlines()]
        assert rest[-1] == {"jsonrpc": "2.0", "id": 3, "result": {"stopReason": "cancelled"}}
        assert agent.wait(TIMEOUT) == 0
        assert agent.stderr is not None
        assert f"received {signum.name}, shutting down" in agent.stderr.read().decode()
    finally:
        _ended(agent)
    shown = punie("sessions", "show", session, env=env)
    assert "stop: cancelled" in shown.stdout, shown.stdout


def test_a_store_whose_directory_takes_no_wal_is_a_message(env: dict[str, str]) -> None:
    """A store closed cleanly (no ``-wal`` or ``-shm`` left) in a directory the user may
    not write: SQLite cannot make the WAL, and the open said only "cannot open session
    store: attempt to write a readonly database", not what docs/sessions-store.md
    promises for a store SQLite can only read."""
    prefix = _as_another_user()
    with _served_once(env, "--token", "T") as (data, env, args):
        store = data / "sessions.sqlite3"
        assert not (data / "sessions.sqlite3-wal").exists()
        for file in data.iterdir():
            file.chmod(0o666)  # the lock and the log stay writable; the store too
        data.chmod(0o555)  # but no new file (the -wal, the -shm) can be made beside it
        try:
            done = subprocess.run(
                [*prefix, *PUNIE, *args], env=env, capture_output=True, text=True,
                timeout=60, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            listed = subprocess.run(
                [*prefix, *PUNIE, "sessions", "list"], env=env, capture_output=True,
                text=True, timeout=60, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            data.chmod(0o755)
        assert done.returncode == 1, done.stderr
        assert f"{store}: the session store is read-only" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        # The read-only commands cannot read it either (a WAL store needs its -shm): said so.
        assert listed.returncode == 1, listed.stderr
        assert "SQLite must make its -shm file to read it" in listed.stderr, listed.stderr
