"""``serve`` options: flags > ``PUNIE_*`` environment > TOML file > defaults, with errors
that name the option and where the bad value came from (exit status 2)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from punie_trio import cli
from punie_trio._config import (
    BY_NAME,
    MAX_COUNT,
    MAX_SECONDS,
    OPTIONS,
    ConfigError,
    load_file,
    resolve,
)

from ..acp_schema import SchemaChecker
from ..integration._support import acp_ws_client, command_process, server_env, ws_url
from ._hub import expect_error, prompt_params


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    merged = resolve({}, {}, {}, "config.toml")
    assert merged == {o.name: o.default for o in OPTIONS}
    assert merged["port"] == 8765 and merged["host"] == "127.0.0.1"
    assert merged["store"] == "sqlite" and merged["token"] is None
    assert merged["project"] == () and merged["metrics_public"] is False


def test_precedence_flags_env_file_defaults() -> None:
    file_values = {"port": 1111, "host": "0.0.0.0", "model": "echo", "outbox_limit": 7}
    environ = {"PUNIE_PORT": "2222", "PUNIE_HOST": "::1"}
    flags = {"port": 3333, "host": None, "model": None}
    merged = resolve(flags, file_values, environ, "config.toml")
    assert merged["port"] == 3333  # flag beats env and file
    assert merged["host"] == "::1"  # env beats file (flag absent)
    assert merged["outbox_limit"] == 7  # file beats default
    assert merged["max_connections"] == 256  # default
    assert resolve({}, file_values, environ, "f")["port"] == 2222
    assert resolve({}, file_values, {}, "f")["port"] == 1111


def test_lists_and_booleans_from_each_source(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    environ = {
        "PUNIE_PROJECT": f"{a}{os.pathsep}{b}",
        "PUNIE_ALLOW_ORIGIN": "http://x.test,http://y.test",
        "PUNIE_METRICS_PUBLIC": "yes",
        "PUNIE_STDIO": "0",
    }
    merged = resolve({}, {"project": ["/file/p"], "stdio": True}, environ, "f")
    assert merged["project"] == (a, b)
    assert merged["allow_origin"] == ("http://x.test", "http://y.test")
    assert merged["metrics_public"] is True and merged["stdio"] is False
    # A repeatable flag given wins; not given (argparse's None or []), the next source does.
    assert resolve({"project": [Path("/flag")]}, {}, environ, "f")["project"] == (Path("/flag"),)
    assert resolve({"project": []}, {"project": ["/file/p"]}, {}, "f")["project"] == (
        Path("/file/p"),
    )
    assert resolve({}, {"allow_origin": "http://one.test"}, {}, "f")["allow_origin"] == (
        "http://one.test",
    )
    assert resolve({}, {"data_dir": "~/d"}, {}, "f")["data_dir"] == Path("~/d").expanduser()


def test_load_file_reads_the_serve_table_and_dashed_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        '[serve]\nmax-prompt-bytes = 10\nallow-origin = ["http://a.test"]\nport = 0\n',
    )
    assert load_file(path, required=True) == {
        "max_prompt_bytes": 10,
        "allow_origin": ["http://a.test"],
        "port": 0,
    }
    top = write(tmp_path / "top.toml", "port = 1\n")
    assert load_file(top, required=True) == {"port": 1}
    assert load_file(tmp_path / "missing.toml", required=False) == {}
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "missing.toml", required=True)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_file(write(tmp_path / "bad.toml", "port = = 1\n"), required=True)
    with pytest.raises(ConfigError, match=r"\[serve\] must be a table, got the string 'x'$"):
        load_file(write(tmp_path / "t.toml", 'serve = "x"\n'), required=True)
    with pytest.raises(ConfigError, match=r"\[serve\] must be a table, got an array, \[1\]$"):
        load_file(write(tmp_path / "t.toml", "serve = [1]\n"), required=True)


def test_a_config_file_that_is_no_regular_file_or_too_large_is_refused_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--config`` naming a FIFO waited for ever for a writer, and ``/dev/zero`` was read
    until memory ran out (a config audit). A config file is a regular file of at most
    ``MAX_CONFIG_BYTES``; anything else is named and refused, at once."""
    from punie_trio import _config

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"fifo\.toml is not a regular file \(a FIFO\)"):
        load_file(fifo, required=True)
    with pytest.raises(ConfigError, match="/dev/zero is not a regular file"):
        load_file(Path("/dev/zero"), required=True)
    with pytest.raises(ConfigError, match=r"tmp is not a regular file \(a directory\)"):
        load_file(_mkdir(tmp_path / "tmp"), required=True)
    monkeypatch.setattr(_config, "MAX_CONFIG_BYTES", 10)
    big = write(tmp_path / "big.toml", "port = 12345\n")  # 13 bytes
    with pytest.raises(ConfigError, match=r"big\.toml is over 10 bytes: not a config file"):
        load_file(big, required=True)
    assert load_file(write(tmp_path / "ok.toml", "port = 1\n"), required=True) == {"port": 1}


def test_a_config_file_others_can_write_is_refused(tmp_path: Path) -> None:
    """A config file names commands serve runs as its user (``build``, a ``script:``
    model) and the token. Writable by every local user (0666), or owned by another user
    (not root), it let them run commands as the user or as root, and serve read it
    without a word. It is refused, as OpenSSH refuses such a config; group-writable
    stays allowed (user private groups make files 0664)."""
    config = write(tmp_path / "punie.toml", "port = 1\n")
    config.chmod(0o666)
    with pytest.raises(
        ConfigError,
        match=r"punie\.toml is writable by every user \(mode 0666\): whoever can change "
        r"it can make serve run commands as you \(build, model\); `chmod o-w .*punie\.toml`",
    ):
        load_file(config, required=True)
    config.chmod(0o664)
    assert load_file(config, required=True) == {"port": 1}
    if os.getuid() != 0:
        return  # (only root can give a file away)
    os.chown(config, 4321, -1)
    with pytest.raises(
        ConfigError,
        match=r"punie\.toml is owned by another user \(uid 4321\): .*; use a copy you own",
    ):
        load_file(config, required=True)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("dangling", ["config.toml", "punie-trio"])
def test_a_default_config_file_that_is_a_dangling_symlink_is_named(
    tmp_path: Path, dangling: str
) -> None:
    """A missing default file is fine; one that is (or is under) a symlink to nothing was
    taken for missing too, and serve started on the defaults without a word."""
    config_dir = tmp_path / "punie-trio"
    if dangling == "config.toml":
        config_dir.mkdir()
        link, target = config_dir / "config.toml", tmp_path / "dotfiles" / "punie.toml"
    else:
        link, target = config_dir, tmp_path / "dotfiles" / "punie-trio"
    link.symlink_to(target)
    with pytest.raises(ConfigError) as info:
        load_file(config_dir / "config.toml", required=False)
    assert str(info.value) == (
        f"config file {config_dir / 'config.toml'} cannot be read: {link} is a symlink to "
        f"{target}, which does not exist"
    )
    assert load_file(tmp_path / "nothing" / "config.toml", required=False) == {}


def test_a_config_file_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    """Windows editors write one; it was "not valid TOML: Invalid statement (at line 1,
    column 1)", pointing at nothing the user could see."""
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf[serve]\r\nport = 0\r\n")
    assert load_file(path, required=True) == {"port": 0}


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        resolve({}, {"port": 1, "prot": 2}, {}, "/etc/punie.toml")
    message = str(info.value)
    assert message.startswith("/etc/punie.toml: unknown option(s) prot")
    assert "max-prompt-bytes" in message  # the known ones are listed


def test_an_unknown_key_no_bare_key_could_be_is_quoted(tmp_path: Path) -> None:
    """A quoted TOML key (``"" = 1``, ``"max prompt bytes" = 1``) was named as it is:
    ``unknown option(s)  (known: ...)`` named nothing at all, and a key with spaces read
    as several. One that is no bare key is quoted; a bare one is named as it was."""
    config = write(tmp_path / "c.toml", '"" = 1\n"max prompt bytes" = 2\nprot = 3\n')
    with pytest.raises(ConfigError) as info:
        resolve({}, load_file(config, required=True), {}, str(config))
    assert str(info.value).startswith(
        f"{config}: unknown option(s) '', 'max prompt bytes', prot (known: host, "
    )


def test_an_unknown_key_is_named_as_the_file_spells_it(tmp_path: Path) -> None:
    """An unknown key with a ``-`` (``max-conections = 1``, as the known keys are
    spelt) was named with ``_`` (``unknown option(s) max_conections``): a key the file
    does not have, and not as the known ones beside it are listed. It is named as
    written, ``-`` or ``_``; a known key is still read either way."""
    config = write(
        tmp_path / "c.toml", "max-conections = 1\nmax_prompt_byts = 2\nmax_connections = 3\n"
    )
    with pytest.raises(ConfigError) as info:
        resolve({}, load_file(config, required=True), {}, str(config))
    assert str(info.value).startswith(
        f"{config}: unknown option(s) max-conections, max_prompt_byts (known: host, "
    )


@pytest.mark.parametrize(
    ("file_values", "environ", "expected"),
    [
        # (A string is not a number in TOML, whatever it holds.)
        (
            {"port": "abc"},
            {},
            "config.toml: port must be an integer, got the string 'abc' (TOML is typed: "
            "write numbers without quotes)",
        ),
        ({"port": 1.5}, {}, "config.toml: port must be an integer, got 1.5"),
        ({"port": True}, {}, "config.toml: port must be an integer, got true"),
        (
            {"metrics_public": "maybe"},
            {},
            "config.toml: metrics-public must be true or false, got the string 'maybe' "
            "(TOML is typed: write true or false without quotes)",
        ),
        ({"host": 7}, {}, "config.toml: host must be a string, got 7"),
        ({"project": [1]}, {}, "config.toml: project must be a string, got 1"),
        (
            {"shutdown_timeout": "soon"},
            {},
            "config.toml: shutdown-timeout must be a number, got the string 'soon' (TOML is "
            "typed: write numbers without quotes)",
        ),
        ({}, {"PUNIE_PORT": "abc"}, "$PUNIE_PORT: port must be an integer, got 'abc'"),
        (
            {},
            {"PUNIE_STDIO": "perhaps"},
            "$PUNIE_STDIO: stdio must be true or false, got 'perhaps'",
        ),
        (
            {},
            {"PUNIE_OUTBOX_LIMIT": "1e3"},
            "$PUNIE_OUTBOX_LIMIT: outbox-limit must be an integer, got '1e3'",
        ),
        # Ranges are checked wherever a value comes from, not only on the command line.
        (
            {},
            {"PUNIE_MAX_CONNECTIONS": "0"},
            "$PUNIE_MAX_CONNECTIONS: max-connections must be a positive integer, got 0",
        ),
        (
            {"max_prompt_bytes": -5},
            {},
            "config.toml: max-prompt-bytes must be a positive integer, got -5",
        ),
        ({"port": 70000}, {}, "config.toml: port must be from 0 to 65535, got 70000"),
        (
            {"grace_seconds": -1},
            {},
            # (As given: it was "got -1.0", a value the file does not have.)
            "config.toml: grace-seconds must be a number of seconds >= 0, got -1",
        ),
        (
            {},
            {"PUNIE_CLIENT_CALL_TIMEOUT": "-0.5"},
            "$PUNIE_CLIENT_CALL_TIMEOUT: client-call-timeout must be a number of seconds >= 0, "
            "got -0.5",
        ),
        (
            {"shutdown_timeout": float("nan")},
            {},
            "config.toml: shutdown-timeout must be a number of seconds >= 0, got nan",
        ),
        (
            {},
            {"PUNIE_SHUTDOWN_TIMEOUT": "nan"},
            "$PUNIE_SHUTDOWN_TIMEOUT: shutdown-timeout must be a number of seconds >= 0, got nan",
        ),
        # inf once crashed the shutdown's force-exit timer as it started.
        (
            {"shutdown_timeout": float("inf")},
            {},
            "config.toml: shutdown-timeout must be at most 31536000 seconds (a year), got inf",
        ),
        (
            {},
            {"PUNIE_GRACE_SECONDS": "1e10"},
            "$PUNIE_GRACE_SECONDS: grace-seconds must be at most 31536000 seconds (a year), "
            "got 1e+10",
        ),
        (
            {},
            {"PUNIE_CLIENT_CALL_TIMEOUT": "Infinity"},
            "$PUNIE_CLIENT_CALL_TIMEOUT: client-call-timeout must be at most 31536000 seconds "
            "(a year), got inf",
        ),
        # Shown in 6 digits, 31536001 read "got 3.1536e+07": the limit itself, it seemed.
        (
            {},
            {"PUNIE_GRACE_SECONDS": "31536001"},
            "$PUNIE_GRACE_SECONDS: grace-seconds must be at most 31536000 seconds (a year), "
            "got 31536001",
        ),
        (
            {"shutdown_timeout": 31536000.5},
            {},
            "config.toml: shutdown-timeout must be at most 31536000 seconds (a year), "
            "got 31536000.5",
        ),
        (
            {"debounce": float("-inf")},
            {},
            "config.toml: debounce must be a number of seconds >= 0, got -inf",
        ),
        (
            {},
            {"PUNIE_DEBOUNCE": "-inf"},
            "$PUNIE_DEBOUNCE: debounce must be a number of seconds >= 0, got -inf",
        ),
        # Empty is a mistake, not a value: a host of "" binds every interface, a path of
        # "" is the current directory, an empty list would hide the file's.
        (
            {"store": "postgres"},
            {},
            "config.toml: store must be one of sqlite, memory, got 'postgres'",
        ),
        (
            {},
            {"PUNIE_LOG_LEVEL": "loud"},
            "$PUNIE_LOG_LEVEL: log-level must be one of debug, info, warning, error, got 'loud'",
        ),
        ({"host": ""}, {}, "config.toml: host must not be empty"),
        ({}, {"PUNIE_HOST": ""}, "$PUNIE_HOST: host must not be empty"),
        (
            {"host": " localhost"},
            {},
            "config.toml: host must not have spaces around it, got ' localhost'",
        ),
        ({}, {"PUNIE_DATA_DIR": ""}, "$PUNIE_DATA_DIR: data-dir must not be empty"),
        # A path with spaces around it was a relative path nobody meant (" /srv/d" made
        # the directory "./ /srv/d").
        (
            {},
            {"PUNIE_DATA_DIR": " /srv/d"},
            "$PUNIE_DATA_DIR: data-dir must not have spaces around it, got ' /srv/d'",
        ),
        (
            {"data_dir": "/srv/d "},
            {},
            "config.toml: data-dir must not have spaces around it, got '/srv/d '",
        ),
        (
            {},
            {"PUNIE_PROJECT": f"/a{os.pathsep} /b"},
            "$PUNIE_PROJECT: project must not have spaces around it, got ' /b'",
        ),
        (
            {"site": "\t/srv/site"},
            {},
            "config.toml: site must not have spaces around it, got '\\t/srv/site'",
        ),
        ({"watch": ["/w "]}, {}, "config.toml: watch must not have spaces around it, got '/w '"),
        # A ~ naming no user (or ~ with no home directory to be found) was a RuntimeError
        # traceback from expanduser, in serve and in the read-only commands.
        (
            {"data_dir": "~nosuchuser-punie/d"},
            {},
            "config.toml: data-dir has a ~ that names no home directory, got '~nosuchuser-punie/d'",
        ),
        ({"site": ""}, {}, "config.toml: site must not be empty"),
        # An empty build command ran no build; an empty list of paths meant a default
        # directory (project: the current one), as PUNIE_PROJECT= would.
        ({"build": ""}, {}, "config.toml: build must not be empty"),
        # An empty glob was skipped without a word (PUNIE_IGNORE= was exit 2).
        ({"ignore": ["*.log", ""]}, {}, "config.toml: ignore must not be empty"),
        ({}, {"PUNIE_IGNORE": "*.log, "}, "$PUNIE_IGNORE: ignore must not be empty"),
        ({}, {"PUNIE_BUILD": ""}, "$PUNIE_BUILD: build must not be empty"),
        (
            {"project": []},
            {},
            "config.toml: project must not be an empty list (leave it out for the default)",
        ),
        (
            {"watch": []},
            {},
            "config.toml: watch must not be an empty list (leave it out for the default)",
        ),
        # An empty token once meant "generate one", without a word.
        ({}, {"PUNIE_TOKEN": ""}, "$PUNIE_TOKEN: token must not be empty"),
        ({"token": "  "}, {}, "config.toml: token must not be empty"),
        ({"token": " t0ken "}, {}, "config.toml: token must not have spaces around it"),
        # A header carries nothing else reliably: a non-ASCII token matched only when a
        # client sent it in Latin-1, and in ?token= only percent-encoded UTF-8 (an audit
        # sent "Bearer pässwörd" in UTF-8: 401).
        (
            {"token": "pässwörd"},
            {},
            "config.toml: token must be printable ASCII (a request carries it in a header)",
        ),
        (
            {},
            {"PUNIE_TOKEN": "to\tken"},
            "$PUNIE_TOKEN: token must be printable ASCII (a request carries it in a header)",
        ),
        (
            {"token": "a\x7fb"},
            {},
            "config.toml: token must be printable ASCII (a request carries it in a header)",
        ),
        # A NUL in a token (only a TOML file can hold one) is refused as any other
        # unprintable character, without the token: the NUL check common to every string
        # once said "got 'abc\x00s3cret'", the secret on the terminal and in CI logs.
        (
            {"token": "abc\0s3cret"},
            {},
            "config.toml: token must be printable ASCII (a request carries it in a header)",
        ),
        # A NUL (only a TOML file can hold one) was a ValueError traceback at the first
        # system call: mkdir for data-dir, resolve for project and watch, bind for host.
        (
            {"data_dir": "/srv/a\0b"},
            {},
            "config.toml: data-dir must not contain a NUL character, got '/srv/a\\x00b'",
        ),
        (
            {"project": ["/srv/a\0b"]},
            {},
            "config.toml: project must not contain a NUL character, got '/srv/a\\x00b'",
        ),
        (
            {"host": "127.0.0.1\0"},
            {},
            "config.toml: host must not contain a NUL character, got '127.0.0.1\\x00'",
        ),
        (
            {},
            {"PUNIE_PROJECT": ""},
            "$PUNIE_PROJECT is set but empty (unset it for the default)",
        ),
        # Neither could ever match a request: they were accepted without a word.
        (
            {"allow_origin": ["example.com"]},
            {},
            "config.toml: allow-origin must be an origin like http://localhost:3000, "
            "got 'example.com'",
        ),
        (
            {},
            {"PUNIE_ALLOW_ORIGIN": "http://x.test/app"},
            "$PUNIE_ALLOW_ORIGIN: allow-origin must be an origin like http://localhost:3000, "
            "got 'http://x.test/app'",
        ),
        (
            {"allow_origin": ["http://x.test:port"]},
            {},
            "config.toml: allow-origin must be an origin like http://localhost:3000, "
            "got 'http://x.test:port'",
        ),
        (
            {},
            {"PUNIE_ALLOW_HOST": "http://x.test"},
            "$PUNIE_ALLOW_HOST: allow-host must be a host name like myhost.lan or "
            ".example.com (no scheme or port; IP addresses are always allowed), "
            "got 'http://x.test'",
        ),
        (
            {"allow_host": ["dev.test:8765"]},
            {},
            "config.toml: allow-host must be a host name like myhost.lan or .example.com "
            "(no scheme or port; IP addresses are always allowed), got 'dev.test:8765'",
        ),
    ],
)
def test_bad_type_names_the_option_and_the_source(
    file_values: dict[str, Any], environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        resolve({}, file_values, environ, "config.toml")
    assert str(info.value) == expected


@pytest.mark.parametrize(
    ("file_values", "expected"),
    [
        # A TOML float for an integer limit was named without it ("must be an integer"),
        # so the user looked for what was wrong with a value the message did not show.
        ({"max_connections": 5.5}, "max-connections must be an integer, got 5.5"),
        ({"port": 80.0}, "port must be an integer, got 80.0"),
        ({"outbox_limit": float("inf")}, "outbox-limit must be an integer, got inf"),
        ({"port": True}, "port must be an integer, got true"),
        ({"port": [80]}, "port must be an integer, got an array, [80]"),
        ({"max_prompt_bytes": {"a": 1}}, "max-prompt-bytes must be an integer, got a table"),
        ({"shutdown_timeout": [1]}, "shutdown-timeout must be a number, got an array, [1]"),
        ({"shutdown_timeout": False}, "shutdown-timeout must be a number, got false"),
        ({"metrics_public": 1}, "metrics-public must be true or false, got 1"),
        ({"host": 7}, "host must be a string, got 7"),
        ({"model": 1.5}, "model must be a string, got 1.5"),
        ({"project": [True]}, "project must be a string, got true"),
        (
            {"log_level": 5},
            "log-level must be one of debug, info, warning, error, got 5",
        ),
        ({"store": False}, "store must be one of sqlite, memory, got false"),
        # (The token is a secret: only what kind of value it is.)
        ({"token": 12345}, "token must be a string, got an integer"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_named_with_its_type_and_value(
    tmp_path: Path, file_values: dict[str, Any], expected: str
) -> None:
    """Every config file error names the file, the key, what the key takes and the value
    given: a float for an integer (``max-connections = 5.5``) was "must be an integer",
    a number for a string "must be a string", without the value. Bad values from the
    environment are quoted too (``$PUNIE_STDIO`` was "must be true or false")."""
    with pytest.raises(ConfigError) as info:
        resolve({}, file_values, {}, "config.toml")
    assert str(info.value) == f"config.toml: {expected}"
    # Written in a real file, read as serve reads it.
    name, value = next(iter(file_values.items()))
    config = write(
        tmp_path / "config.toml", f"[serve]\n{name.replace('_', '-')} = {_toml(value)}\n"
    )
    with pytest.raises(ConfigError) as info:
        resolve({}, load_file(config, required=True), {}, str(config))
    assert str(info.value) == f"{config}: {expected}"
    # From the environment a bad value is quoted too.
    with pytest.raises(ConfigError) as info:
        resolve({}, {}, {"PUNIE_STDIO": "perhaps"}, "config.toml")
    assert str(info.value) == "$PUNIE_STDIO: stdio must be true or false, got 'perhaps'"


@pytest.mark.parametrize(
    ("file_values", "expected"),
    [
        (
            {"max_connections": "5"},
            "max-connections must be an integer, got the string '5' (TOML is typed: "
            "write numbers without quotes)",
        ),
        (
            {"port": "eighty"},
            "port must be an integer, got the string 'eighty' (TOML is typed: write "
            "numbers without quotes)",
        ),
        (
            {"grace_seconds": "10"},
            "grace-seconds must be a number, got the string '10' (TOML is typed: write "
            "numbers without quotes)",
        ),
        (
            {"metrics_public": "yes"},
            "metrics-public must be true or false, got the string 'yes' (TOML is typed: "
            "write true or false without quotes)",
        ),
        (
            {"stdio": "true"},
            "stdio must be true or false, got the string 'true' (TOML is typed: write "
            "true or false without quotes)",
        ),
    ],
)
def test_a_string_in_the_config_file_is_not_a_number_or_a_boolean(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    file_values: dict[str, Any],
    expected: str,
) -> None:
    """TOML is typed, and docs/configuration.md writes numbers and booleans unquoted, but a
    string was read as one: ``max-connections = "5"`` served 5 connections and
    ``metrics-public = "yes"`` made ``/metrics`` public, so a file that a TOML linter or
    another program reads as strings meant numbers here. It is exit 2 naming the file,
    the key, the type and the value. The environment's values are all strings, and are
    read from strings as before."""
    with pytest.raises(ConfigError) as info:
        resolve({}, file_values, {}, "config.toml")
    assert str(info.value) == f"config.toml: {expected}"
    argv = serve_argv_without_a_server(tmp_path, monkeypatch)
    config = tmp_path / "config.toml"
    name, value = next(iter(file_values.items()))
    write(config, f"[serve]\n{name.replace('_', '-')} = {_toml(value)}\n")
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"punie-trio: error: {config}: {expected}\n"
    environ = {"PUNIE_MAX_CONNECTIONS": "5", "PUNIE_METRICS_PUBLIC": "yes"}
    environ |= {"PUNIE_GRACE_SECONDS": "10", "PUNIE_STDIO": "true"}
    merged = resolve({}, {}, environ, "config.toml")
    assert (merged["max_connections"], merged["metrics_public"]) == (5, True)
    assert (merged["grace_seconds"], merged["stdio"]) == (10.0, True)


@pytest.mark.parametrize(
    ("flags", "file_values", "environ", "expected"),
    [
        ({"port": 0}, {"port": "eighty"}, {}, "config.toml: port must be an integer"),
        ({"port": 0}, {}, {"PUNIE_PORT": "eighty"}, "$PUNIE_PORT: port must be an integer"),
        ({}, {"port": -1}, {"PUNIE_PORT": "0"}, "config.toml: port must be from 0 to 65535"),
        (
            {"data_dir": Path("/d")},
            {},
            {"PUNIE_DATA_DIR": ""},
            "$PUNIE_DATA_DIR: data-dir must not be empty",
        ),
        (
            {"project": [Path("/p")]},
            {"project": []},
            {},
            "config.toml: project must not be an empty list",
        ),
        (
            {"metrics_public": True},
            {"metrics_public": "maybe"},
            {},
            "config.toml: metrics-public must be true or false",
        ),
    ],
)
def test_a_bad_value_is_refused_even_where_a_higher_place_overrides_it(
    flags: dict[str, Any], file_values: dict[str, Any], environ: dict[str, str], expected: str
) -> None:
    """``port = "eighty"`` in the file with ``--port 0`` started without a word, and the
    next start (without the flag) failed on a file nobody had touched since."""
    with pytest.raises(ConfigError) as info:
        resolve(flags, file_values, environ, "config.toml")
    assert str(info.value).startswith(expected)


def test_origins_and_host_names_are_kept_as_requests_carry_them() -> None:
    """In the form a browser sends them (lowercase, no trailing slash or dot, no default
    port, IDNA): what the checks compare against."""
    origins = {
        "HTTP://LocalHost:3000/": "http://localhost:3000",
        "https://app.test": "https://app.test",
        "http://localhost:80": "http://localhost",  # a browser leaves the default port out
        "https://app.test:443": "https://app.test",
        "http://app.test:0080": "http://app.test",
        "https://app.test:80": "https://app.test:80",
        "http://[::1]:3000": "http://[::1]:3000",
        "http://[0:0::1]": "http://[::1]",
        "http://Bücher.example": "http://xn--bcher-kva.example",
        "chrome-extension://abcdefghijklmnop": "chrome-extension://abcdefghijklmnop",
        "tauri://localhost": "tauri://localhost",
        "http://127.0.0.1:8765": "http://127.0.0.1:8765",
    }
    merged = resolve(
        {},
        {"allow_origin": list(origins)},
        {"PUNIE_ALLOW_HOST": " Dev.Test. ,.corp.test,*,my_host.lan,Bücher.example"},
        "config.toml",
    )
    assert merged["allow_origin"] == tuple(origins.values())
    assert merged["allow_host"] == (
        "dev.test", ".corp.test", "*", "my_host.lan", "xn--bcher-kva.example",
    )  # fmt: skip


@pytest.mark.parametrize(
    "origin",
    ["example.com", "http://x.test/app", "http://x.test:", "http://127.1", "http://a b",
     "http://[fe80::1%25eth0]", "http://user@x.test", "http://x.test?q", "ftp//x"],
)  # fmt: skip
def test_an_origin_no_browser_could_send_is_refused(origin: str) -> None:
    with pytest.raises(ConfigError, match="allow-origin must be an origin like"):
        resolve({}, {"allow_origin": [origin]}, {}, "config.toml")


def test_null_cannot_be_an_allowed_origin() -> None:
    with pytest.raises(ConfigError, match="cannot be null: sandboxed frames"):
        resolve({}, {}, {"PUNIE_ALLOW_ORIGIN": "null"}, "config.toml")


@pytest.mark.parametrize(
    "host", ["*.example.com", "[::1]", "x.test:80", "http://x.test", "a b.test", "127.1", "."]
)
def test_a_host_name_no_request_could_carry_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match="IP addresses are always allowed"):
        resolve({}, {"allow_host": [host]}, {}, "config.toml")


def test_the_environment_turns_off_an_option_the_file_turns_on() -> None:
    """On/off flags only turn options on; the environment is how one run turns one off."""
    file = {"metrics_public": True, "stdio": True}
    env = {"PUNIE_METRICS_PUBLIC": "false", "PUNIE_STDIO": "0"}
    resolved = resolve({}, file, env, "config.toml")
    assert (resolved["metrics_public"], resolved["stdio"]) == (False, False)


def test_log_level_is_read_in_any_case() -> None:
    assert resolve({}, {"log_level": "INFO"}, {}, "config.toml")["log_level"] == "info"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        # Beside a [serve] table these were ignored without a word.
        ("max-prompt-bytes = 100\n[serve]\nport = 1\n", "max-prompt-bytes beside the [serve]"),
        ("[serve]\nport = 1\n[sevre]\nmax-prompt-bytes = 100\n", "sevre beside the [serve]"),
        ("max_prompt_bytes = 100\nmax-prompt-bytes = 5000\n", "max-prompt-bytes is given twice"),
    ],
)
def test_config_file_options_that_would_be_ignored_are_refused(
    tmp_path: Path, toml: str, expected: str
) -> None:
    path = write(tmp_path / "config.toml", toml)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_file(path, required=True)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xff\xfeport = 1\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_file(path, required=True)


def test_a_host_that_does_not_resolve_is_an_address_problem_not_a_crash() -> None:
    """getaddrinfo's error for --host no.such.host was a traceback; it is reported like
    a busy port (server._address_unusable), with a hint about --host."""
    from punie_trio.server import _address_unusable

    assert _address_unusable(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))


@pytest.mark.parametrize("host", ["192.0.2.1", "fe80::1%lo"])
def test_a_host_this_machine_cannot_bind_is_named_with_a_host_hint(
    tmp_path: Path, host: str
) -> None:
    """192.0.2.1 (no address of this machine: EADDRNOTAVAIL) got the busy port's hint,
    "is another punie-trio running?"; fe80::1%lo (EINVAL: a zone that address cannot
    have) was a traceback. Both are exit 1 with a hint about --host."""
    command = [sys.executable, "-m", "punie_trio", "serve", "--host", host, "--port", "0"]
    command += ["--project", str(tmp_path), "--data-dir", str(tmp_path / "data")]
    env = {**server_env(), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"punie-trio: error: cannot listen on {host}:0: "), done.stderr
    assert done.stderr.endswith(
        "(--host takes an address of this machine or a host name that resolves to one)\n"
    ), done.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--allow-origin", "example.com"],
            "argument --allow-origin: must be an origin like http://localhost:3000",
        ),
        # The numbers too (cli.py had its own _port and _positive_int, worded apart from
        # the rule $PUNIE_PORT and the file's port are checked by).
        (["--port", "70000"], "argument --port: must be from 0 to 65535, got 70000"),
        (["--port", "eighty"], "argument --port: must be an integer, got 'eighty'"),
        (
            ["--max-connections", "0"],
            "argument --max-connections: must be a positive integer, got 0\n",
        ),
        (
            ["--allow-host", "dev.test:8765"],
            "argument --allow-host: must be a host name like myhost.lan",
        ),
        (
            ["--data-dir", "/srv/d "],
            "argument --data-dir: must not have spaces around it, got '/srv/d '",
        ),
        # The choices too (argparse said "invalid choice: 'loud' (choose from 'debug',
        # ...)", worded apart from $PUNIE_LOG_LEVEL's and the file's).
        (
            ["--log-level", "loud"],
            "argument --log-level: must be one of debug, info, warning, error, got 'loud'\n",
        ),
        (["--store", "pg"], "argument --store: must be one of sqlite, memory, got 'pg'\n"),
    ],
)
def test_a_flag_is_checked_by_its_options_rule(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["serve", *argv])
    assert info.value.code == 2
    assert expected in capsys.readouterr().err
    args = cli.build_parser().parse_args(
        ["serve", "--allow-origin", "HTTP://A.test/", "--allow-host", ".Corp.Test."]
    )
    assert (args.allow_origin, args.allow_host) == (["http://a.test"], [".corp.test"])


@pytest.mark.parametrize(
    "flag", ["--data-dir", "--project", "--site", "--watch", "--build", "--ignore"]
)
def test_an_empty_path_or_command_flag_is_refused(
    capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """``--data-dir ""`` (and --project, --site, --watch) meant the current directory, and
    ``--build ""`` no build, without a word; ``--ignore ""`` ignored nothing, without a
    word (``PUNIE_IGNORE=`` was exit 2)."""
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["serve", flag, ""])
    assert info.value.code == 2
    assert f"argument {flag}: must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["serve"], ["token"], ["sessions", "list"], ["sessions", "show", "ID"]]
)
def test_an_empty_config_flag_is_refused(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """``--config ""`` was read as the current directory: "cannot read config file .: Is a
    directory", naming neither the flag nor the empty value."""
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args([*command, "--config", ""])
    assert info.value.code == 2
    assert "argument --config: must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag", ["--shutdown-timeout", "--grace-seconds", "--client-call-timeout", "--debounce"]
)
@pytest.mark.parametrize("value", ["inf", "1e400", "31536001"])
def test_seconds_past_a_year_are_refused(
    capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """``--shutdown-timeout inf`` was accepted, and the force-exit timer then died with
    OverflowError as it started: a hung shutdown was never ended."""
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["serve", flag, value])
    assert info.value.code == 2
    assert f"argument {flag}: must be at most 31536000 seconds (a year)" in capsys.readouterr().err


#: The options read as a positive integer (the limits and bounds).
POSITIVE_INT_FLAGS = [o.flag for o in OPTIONS if o.convert is BY_NAME["max_connections"].convert]


@pytest.mark.parametrize("flag", POSITIVE_INT_FLAGS)
@pytest.mark.parametrize("value", [str(MAX_COUNT + 1), str(2**63), "9" * 30, "9" * 400])
def test_counts_past_the_largest_are_refused(
    capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """``--max-message-bytes 999999999999999999999999999999`` was accepted, and the server
    served it until a client sent a message on a ``permessage-deflate`` connection (the
    default of browsers and ``websockets``): the bounded inflate passed the limit to zlib,
    which raised OverflowError, and the connection ended with a traceback in the log and
    no 1009, before its first message was read (2**63 - 1, the largest a C ssize_t holds,
    did so too: the bound is the limit plus one)."""
    assert len(POSITIVE_INT_FLAGS) == 10
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["serve", flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be at most {MAX_COUNT} (2**40), got " in err
    if len(value) > 20:  # (shown short; 400 digits, as a float, was an OverflowError)
        assert err.rstrip().endswith(f"got a number of {len(value)} digits"), err
    name = flag.removeprefix("--")
    with pytest.raises(ConfigError) as env_info:
        resolve({}, {}, {f"PUNIE_{name.upper().replace('-', '_')}": value}, "config.toml")
    assert f"{name} must be at most {MAX_COUNT} (2**40)" in str(env_info.value)
    with pytest.raises(ConfigError) as file_info:
        resolve({}, {name.replace("-", "_"): int(value)}, {}, "config.toml")
    assert str(file_info.value).startswith(f"config.toml: {name} must be at most {MAX_COUNT}")
    args = cli.build_parser().parse_args(["serve", flag, str(MAX_COUNT)])
    assert getattr(args, name.replace("-", "_")) == MAX_COUNT


@pytest.mark.parametrize(
    ("flag", "bounds"),
    [("--max-prompt-bytes", f"from 1 to {MAX_COUNT} (2**40)"), ("--port", "from 0 to 65535")],
)
@pytest.mark.parametrize("value", ["9" * 5000, "-" + "9" * 5000, " 1_" + "0" * 4999 + " "])
def test_a_number_too_long_to_read_is_named_as_out_of_bounds(
    capsys: pytest.CaptureFixture[str], flag: str, bounds: str, value: str
) -> None:
    """Past 4,300 digits ``int()`` refuses a number: it was called "not an integer" and
    quoted whole (5 KB on the terminal)."""
    digits = sum(c.isdigit() for c in value)
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["serve", flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be {bounds}, got a number of {digits} digits" in err
    assert len(err) < 2000
    name = flag.removeprefix("--")
    with pytest.raises(ConfigError) as env_info:
        resolve({}, {}, {f"PUNIE_{name.upper().replace('-', '_')}": value}, "config.toml")
    assert str(env_info.value).endswith(f"must be {bounds}, got a number of {digits} digits")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", flag, "12x" + "9" * 5000])
    assert "must be an integer, got '12x" in capsys.readouterr().err


_LONG = "x" * 5000


@pytest.mark.parametrize(
    ("file_values", "environ"),
    [
        ({}, {"PUNIE_PORT": _LONG}),
        ({}, {"PUNIE_GRACE_SECONDS": _LONG}),
        ({}, {"PUNIE_HOST": " " + _LONG}),
        ({}, {"PUNIE_ALLOW_ORIGIN": _LONG}),
        ({}, {"PUNIE_ALLOW_HOST": _LONG}),
        ({}, {"PUNIE_LOG_LEVEL": _LONG}),
        ({}, {"PUNIE_DATA_DIR": _LONG + " "}),
        ({}, {"PUNIE_PROJECT": "~nosuchuser-punie" + _LONG}),
        ({"port": _LONG}, {}),
        ({"site": _LONG + "\0"}, {}),
        ({"allow_origin": [_LONG]}, {}),
    ],
)
def test_a_long_bad_value_is_named_by_its_start_and_its_length(
    capsys: pytest.CaptureFixture[str], file_values: dict[str, Any], environ: dict[str, str]
) -> None:
    """A bad value was quoted whole: ``PUNIE_PORT`` or ``--allow-origin`` of 5,000
    characters put 5 KB on the terminal (as a number too long to read once did, now named
    by its length). It is quoted by its start, and its length said."""
    with pytest.raises(ConfigError) as info:
        resolve({}, file_values, environ, "config.toml")
    message = str(info.value)
    assert len(message) < 400, message
    assert re.search(r"'[^']{60}'\.\.\. \(5,0\d\d characters\)", message), message
    name = next(iter(environ or file_values)).removeprefix("PUNIE_").lower()
    flag = "--" + name.replace("_", "-")
    if not file_values and flag in ("--port", "--allow-origin", "--host"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", flag, environ[f"PUNIE_{name.upper()}"]])
        err = capsys.readouterr().err
        assert len(err) < 2000 and "characters)" in err, err


def test_the_largest_message_bound_still_inflates() -> None:
    """The bounded inflate (``web/_deflate.py``) at the largest ``max-message-bytes`` hands
    zlib a bound it can take."""
    import zlib

    from punie_trio.web._deflate import BoundedPerMessageDeflate

    deflate = BoundedPerMessageDeflate()
    deflate._decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
    deflate._inbound_compressed = deflate._inbound_is_compressible = True
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    data = compressor.compress(b"x" * 100) + compressor.flush(zlib.Z_SYNC_FLUSH)
    old = BoundedPerMessageDeflate.limit
    BoundedPerMessageDeflate.limit = MAX_COUNT
    try:
        assert deflate.frame_inbound_payload_data(None, data) == b"x" * 100  # type: ignore[arg-type]
    finally:
        BoundedPerMessageDeflate.limit = old


def test_the_longest_shutdown_timeout_still_starts_the_force_exit_timer() -> None:
    from punie_trio.server import FORCE_EXIT_GRACE

    timer = threading.Timer(MAX_SECONDS + FORCE_EXIT_GRACE, lambda: None)
    timer.daemon = True
    timer.start()
    timer.cancel()
    timer.join(timeout=10)
    assert not timer.is_alive()
    args = cli.build_parser().parse_args(["serve", "--shutdown-timeout", str(MAX_SECONDS)])
    assert args.shutdown_timeout == MAX_SECONDS


def test_a_list_of_origins_may_be_empty_in_the_file() -> None:
    """Only a list of paths has a default an empty list would stand in for."""
    merged = resolve({}, {"allow_origin": [], "ignore": []}, {}, "config.toml")
    assert merged["allow_origin"] == () and merged["ignore"] == ()


def test_ctrl_c_before_the_server_watches_signals_is_status_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGINT in the first moments (imports, config, the token file) raised
    ``KeyboardInterrupt`` through ``main`` and printed a traceback."""

    def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_serve", interrupted)
    assert cli.main(["serve"]) == 130
    assert capsys.readouterr().err == "punie-trio: interrupted\n"


_DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_docs_name_every_option_as_the_code_and_the_help_do() -> None:
    """docs/configuration.md has a row for every option with its flag, variable, key and
    default, and docs/cli.md writes each flag as ``--help`` does (``--max-prompt-bytes N``,
    ``--grace-seconds SECONDS``). The help once showed ``MAX_PROMPT_BYTES``,
    ``SHUTDOWN_TIMEOUT`` and ``--config CONFIG``, and its ``--data-dir`` default left
    out the config file's ``data-dir``."""
    configuration = (_DOCS / "configuration.md").read_text(encoding="utf-8")
    reference = (_DOCS / "cli.md").read_text(encoding="utf-8")
    serve = cli.build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    actions = {a.option_strings[0]: a for a in serve._actions if a.option_strings}
    for option in OPTIONS:
        key = option.name.replace("_", "-")
        row = re.search(
            rf"^\| {option.name} \| `{option.flag}[^|]*\| `{option.env}` \| `{key}` \| ([^|]+) \|",
            configuration,
            re.M,
        )
        assert row is not None, option.name
        if option.default not in (None, ()):
            default = str(option.default).lower()
            assert row.group(1).strip().startswith(f"`{default}`"), option.name
        # (As the help writes it: "--host HOST", "--store {sqlite,memory}", "--stdio".)
        shown = serve._get_formatter()._format_action_invocation(actions[option.flag])
        assert f"| `{shown}` |" in reference, shown
    assert "| `--config FILE` |" in reference and actions["--config"].metavar == "FILE"
    assert "else the config file's data-dir" in (actions["--data-dir"].help or "")


def test_a_data_dir_that_is_a_file_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said "cannot use data directory F: File exists", as if that were the trouble."""
    for name in list(os.environ):
        if name.startswith("PUNIE_"):
            monkeypatch.delenv(name)
    data_file = write(tmp_path / "data", "")
    argv = ["serve", "--config", str(tmp_path / "none.toml"), "--data-dir", str(data_file)]
    write(tmp_path / "none.toml", "")
    assert cli.main([*argv, "--project", str(tmp_path), "--port", "0"]) == 1
    assert capsys.readouterr().err == (
        f"punie-trio: error: cannot use data directory {data_file}: it is not a directory\n"
    )


def test_every_option_has_a_flag() -> None:
    args = cli.build_parser().parse_args(["serve"])
    assert set(BY_NAME) <= set(vars(args))
    assert all(getattr(args, name) is None for name in BY_NAME)  # unset flags defer


@pytest.mark.parametrize(
    ("toml", "environ", "expected"),
    [
        ("port = 1\nverbose = true\n", {}, "unknown option(s) verbose"),
        ('[serve]\nport = "eighty"\n', {}, "port must be an integer"),
        ("", {"PUNIE_MAX_CONNECTIONS": "many"}, "$PUNIE_MAX_CONNECTIONS: max-connections"),
    ],
)
def test_cli_exits_2_naming_the_problem(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    toml: str,
    environ: dict[str, str],
    expected: str,
) -> None:
    for name in list(os.environ):
        if name.startswith("PUNIE_"):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    config = write(tmp_path / "config.toml", toml)
    assert cli.main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("punie-trio: error: ") and expected in err
    if not environ:
        assert str(config) in err


@pytest.mark.parametrize(
    ("argv", "environ", "toml", "expected"),
    [
        (
            ["--max-prompt-bytes", "16777216"],
            {},
            "",
            "--max-prompt-bytes (16777216) must be less than max-message-bytes (16777216)",
        ),
        (
            [],
            {"PUNIE_MAX_MESSAGE_BYTES": "65536"},
            "",
            "$PUNIE_MAX_MESSAGE_BYTES: max-prompt-bytes (1048576) must be less than "
            "max-message-bytes (65536)",
        ),
        (
            ["--max-message-bytes", "2000"],
            {},
            "max-prompt-bytes = 4000\n",
            "config.toml: max-prompt-bytes (4000) must be less than --max-message-bytes (2000)",
        ),
    ],
)
def test_a_prompt_limit_no_message_could_reach_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    environ: dict[str, str],
    toml: str,
    expected: str,
) -> None:
    """A prompt goes in one message, and a WebSocket message over ``max-message-bytes`` is
    closed with 1009 before its prompt is read. ``--max-message-bytes 65536`` (prompts at
    their default 1 MiB) started, and a 100 KB prompt then ended its connection (and, for a
    client without a client id, the turns of its other sessions) where the prompt limit
    promises a -32602 that leaves the connection as it was."""
    for variable in list(os.environ):
        if variable.startswith("PUNIE_"):
            monkeypatch.delenv(variable)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PUNIE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(cli, "_serve_locked", lambda *args: 0)  # (never a server)
    config = write(tmp_path / "config.toml", "[serve]\n" + toml)
    base = ["serve", "--config", str(config), "--port", "0", "--project", str(tmp_path)]
    assert cli.main([*base, *argv]) == 2
    err = capsys.readouterr().err.replace(str(config), "config.toml")
    assert err.startswith(f"punie-trio: error: {expected}: a prompt goes in one message"), err
    assert cli.main([*base, "--max-prompt-bytes", "1000", "--max-message-bytes", "1001"]) == 0


# Values checked only after the merge (is the project a directory, is the model known):
# each one from each place, and the message that must name that place.
# (From a flag, the message names the flag instead.)
_CHECKED_AFTER_THE_MERGE = [
    ("project", "/nonexistent/p", "project /nonexistent/p: not a directory"),
    ("site", "/nonexistent/s", "site /nonexistent/s: not a directory"),
    ("model", "bogus", "unknown model 'bogus': use echo, echo:N or script:PATH"),
    ("model", "echo:0", "model 'echo:0': N in echo:N must be a whole number from 1 to 10000"),
    ("model", "script:/nonexistent.json", "cannot read script /nonexistent.json"),
    ("no_http", True, "no-http needs stdio (there would be nothing to serve)"),
]
_AS_FLAGS = {
    "project": "--project /nonexistent/p: not a directory",
    "site": "--site /nonexistent/s: not a directory",
    "no_http": "--no-http needs --stdio (there would be nothing to serve)",
}


@pytest.mark.parametrize("source", ["flag", "env", "file"])
@pytest.mark.parametrize(("name", "value", "problem"), _CHECKED_AFTER_THE_MERGE)
def test_a_value_checked_after_the_merge_is_named_by_its_source(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str,
    name: str,
    value: Any,
    problem: str,
) -> None:
    """A project that is not a directory, an unknown model, ``no-http`` without ``stdio``:
    exit 2, and the message says where the value came from. These were all named as flags
    (``--project /x: not a directory``), so a value from ``$PUNIE_PROJECT`` or the config
    file sent the user looking for a flag nobody gave (and a model said nothing of where
    it came from)."""
    for variable in list(os.environ):
        if variable.startswith("PUNIE_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("PUNIE_DATA_DIR", str(tmp_path / "data"))
    # (Never a server: a value that got past the checks is a failure, not a hang.)
    monkeypatch.setattr(cli, "_serve_locked", lambda *args: 0)
    config = tmp_path / "config.toml"
    argv = ["serve", "--config", str(config), "--port", "0"]
    if name != "project":
        argv += ["--project", str(tmp_path)]
    option = BY_NAME[name]
    if source == "flag":
        argv += [option.flag] if value is True else [option.flag, value]
        write(config, "")
        expected = _AS_FLAGS.get(name, problem)
    elif source == "env":
        monkeypatch.setenv(option.env, "1" if value is True else value)
        write(config, "")
        expected = f"${option.env}: {problem}"
    else:
        write(config, f"[serve]\n{name.replace('_', '-')} = {_toml(value)}\n")
        expected = f"{config}: {problem}"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"punie-trio: error: {expected}"), err


def test_a_config_file_whose_name_starts_with_dashes_is_still_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value checked after the merge was named by its source unless the source started
    with ``--``, taken for a flag: ``--config=--punie.toml`` (a relative name) lost its
    file's name. A flag is now told by being the option's flag."""
    for variable in list(os.environ):
        if variable.startswith("PUNIE_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("PUNIE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(cli, "_serve_locked", lambda *args: 0)  # (no server)
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "--punie.toml", '[serve]\nsite = "/nonexistent/s"\n')
    argv = ["serve", "--config=--punie.toml", "--port", "0", "--project", str(tmp_path)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        "punie-trio: error: --punie.toml: site /nonexistent/s: not a directory\n"
    )


def serve_argv_without_a_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``serve`` arguments (an empty config file, port 0, ``tmp_path`` as the project) for
    a ``cli.main`` that checks the settings and starts no server; no ``PUNIE_*`` variable
    but the data directory."""
    for variable in list(os.environ):
        if variable.startswith("PUNIE_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("PUNIE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(cli, "_serve_locked", lambda *args: 0)  # (no server)
    config = write(tmp_path / "config.toml", "")
    return ["serve", "--config", str(config), "--port", "0", "--project", str(tmp_path)]


@pytest.mark.parametrize("source", ["flag", "env", "file"])
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("build", "make html"),
        ("watch", "/w"),
        ("ignore", "*.tmp"),
        ("no_watch", True),
        ("debounce", 1.5),
        ("open", True),
    ],
)
def test_a_dev_app_option_without_a_site_is_not_ignored_without_a_word(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str,
    name: str,
    value: Any,
) -> None:
    """``--build`` without ``--site`` never ran, ``--open`` opened nothing: silently. As a
    flag it is now exit 2; from the environment or the file (a preference kept for the
    runs with a site) a warning naming where it came from, and serve starts."""
    argv = serve_argv_without_a_server(tmp_path, monkeypatch)
    config = tmp_path / "config.toml"
    option = BY_NAME[name]
    key = name.replace("_", "-")
    if source == "flag":
        argv += [option.flag] if value is True else [option.flag, str(value)]
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == (
            f"punie-trio: error: {option.flag} needs --site (it is the dev app's)\n"
        )
        return
    if source == "env":
        monkeypatch.setenv(option.env, "1" if value is True else str(value))
        where = f"${option.env}"
    else:
        write(config, f"[serve]\n{key} = {_toml(value)}\n")
        where = str(config)
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == (
        f"punie-trio: warning: {where}: {key} does nothing without site (it is the dev app's)\n"
    )


@pytest.mark.parametrize(
    ("toml", "argv", "shown"),
    [
        ('site = "/nx\\u001b[2J"', [], "site /nx\\x1b[2J: not a directory"),
        ("", ["--site", "/nx\x1b]0;owned\x07"], "--site /nx\\x1b]0;owned\\x07: not a directory"),
        ('model = "script:/nx\\u001b[2J"', [], "cannot read script /nx\\x1b[2J"),
        ("", ["--data-dir", "/dev/null/\x1b[2J"], "data directory /dev/null/\\x1b[2J: "),
    ],
)
def test_a_value_quoted_in_an_error_is_escaped_not_sent_to_the_terminal_raw(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    toml: str,
    argv: list[str],
    shown: str,
) -> None:
    """A ``site``, a script path or a data directory with an escape sequence went to the
    terminal raw in its error (a ``project`` was escaped): from a config file given by
    ``--config`` (a repository's, say) it could clear the screen or retitle the window.
    Every error ``serve`` prints now escapes what is not printable, as the project's did."""
    for variable in list(os.environ):
        if variable.startswith("PUNIE_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("PUNIE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(cli, "_serve_locked", lambda *args: 0)  # (no server)
    config = write(tmp_path / "config.toml", toml + "\n")
    base = ["serve", "--config", str(config), "--port", "0", "--project", str(tmp_path)]
    assert cli.main([*base, *argv]) != 0
    err = capsys.readouterr().err
    assert err.startswith("punie-trio: error: ") and shown in err, err
    assert "\x1b" not in err and "\x07" not in err


def test_a_dev_app_flag_without_a_site_is_refused_even_at_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--debounce 0.2`` (the default's value) without ``--site`` was let through without
    a word, while ``--debounce 0.3`` was exit 2: a flag on this command line is a mistake
    whatever its value (docs/configuration.md: "such a flag is exit 2")."""
    argv = serve_argv_without_a_server(tmp_path, monkeypatch)
    assert cli.main([*argv, "--debounce", "0.2"]) == 2
    assert capsys.readouterr().err == (
        "punie-trio: error: --debounce needs --site (it is the dev app's)\n"
    )
    # From the environment at the default's value it changes nothing: no warning.
    monkeypatch.setenv("PUNIE_DEBOUNCE", "0.2")
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""


async def test_serve_reads_the_toml_file_under_env_and_flags(
    tmp_path: Path, acp_schema: SchemaChecker
) -> None:
    """One real ``punie-trio serve``: the file sets port, token, public metrics and a prompt
    limit; the environment overrides the token and the limit; a flag overrides the limit."""
    project = Path(await trio.Path(tmp_path).resolve())
    config = write(
        tmp_path / "config.toml",
        "\n".join(
            [
                "[serve]",
                "port = 0",
                'token = "file-token"',
                "metrics-public = true",
                "max-prompt-bytes = 10",
                f"project = [{str(project)!r}]",
                f"data-dir = {str(tmp_path / 'data')!r}",
            ]
        )
        + "\n",
    )
    config.chmod(0o644)  # (as editors make it, whatever the umask)
    env = {**server_env(), "PUNIE_TOKEN": "env-token", "PUNIE_MAX_PROMPT_BYTES": "20"}
    command = [sys.executable, "-m", "punie_trio", "serve", "--config", str(config)]
    with trio.fail_after(30):
        command = [*command, "--max-prompt-bytes", "30"]
        async with command_process(command, env, stdin=subprocess.DEVNULL) as server:
            url = server.url
            assert not url.endswith(":8765")  # port 0 from the file
            async with httpx.AsyncClient(base_url=url) as http:
                assert (await http.get("/metrics")).status_code == 200  # file
            with pytest.raises(ConnectionRejected) as info:
                headers = [(b"authorization", b"Bearer file-token")]
                async with open_websocket_url(ws_url(url), extra_headers=headers):
                    pass  # pragma: no cover
            assert info.value.status_code == 401  # env beats file
            async with acp_ws_client(url, acp_schema, token="env-token") as (client, _):
                await client.initialize()
                session_id = await client.new_session(str(project))
                assert await client.prompt(session_id, "x" * 30) == "end_turn"
                error = await expect_error(
                    client, "session/prompt", prompt_params(session_id, "x" * 31)
                )
                assert error["code"] == -32602 and "30-byte limit" in error["message"]
            # `punie-trio token`, in the server's environment, prints the token it took
            # (it once printed the token file's, here none: exit 1), and warns of the
            # file's, readable by others though the variable overrides it.
            token = [sys.executable, "-m", "punie_trio", "token", "--config", str(config)]
            done = await trio.run_process(
                token, env=env, capture_stdout=True, capture_stderr=True, check=False
            )
            assert (done.returncode, done.stdout) == (
                0,
                b"token from: $PUNIE_TOKEN\ntoken: env-token\n",
            )
            assert done.stderr.decode() == (
                f"punie-trio: warning: {config} holds a token and is readable by others "
                f"(mode 0644), though $PUNIE_TOKEN overrides it; `chmod 600 {config}`, or "
                "take the token out of it\n"
            )


def test_debounce_flag_env_and_default_reach_the_dev_app() -> None:
    def debounce(argv: list[str], environ: dict[str, str]) -> Any:
        args = cli.build_parser().parse_args(["serve", *argv])
        flags = {name: getattr(args, name, None) for name in BY_NAME}
        return cli.dev_options(resolve(flags, {}, environ, "f"))["debounce"]

    assert debounce([], {}) == 0.2
    assert debounce(["--debounce", "0"], {"PUNIE_DEBOUNCE": "3"}) == 0.0
    assert debounce([], {"PUNIE_DEBOUNCE": "1.5"}) == 1.5
    with pytest.raises(SystemExit):
        debounce(["--debounce", "-1"], {})


# Every option, three values that differ from each other and from the default: (the TOML
# file's, the environment's as text, the flag's argv) and the values each resolves to.
_P = Path("/p")
_EVERY_OPTION: dict[str, tuple[Any, str, list[str], tuple[Any, Any, Any]]] = {
    "host": ("10.0.0.1", "10.0.0.2", ["--host", "10.0.0.3"], ("10.0.0.1", "10.0.0.2", "10.0.0.3")),
    "port": (1, "2", ["--port", "3"], (1, 2, 3)),
    "stdio": (True, "no", ["--stdio"], (True, False, True)),
    "no_http": (True, "off", ["--no-http"], (True, False, True)),
    "project": (
        ["/f"],
        "/e1:/e2",
        ["--project", "/a", "--project", "/b"],
        ((Path("/f"),), (Path("/e1"), Path("/e2")), (Path("/a"), Path("/b"))),
    ),
    "model": ("echo:1", "echo:2", ["--model", "echo:3"], ("echo:1", "echo:2", "echo:3")),
    "log_level": ("INFO", "Error", ["--log-level", "debug"], ("info", "error", "debug")),
    "data_dir": ("/f", "/e", ["--data-dir", "/a"], (Path("/f"), Path("/e"), Path("/a"))),
    "store": ("memory", "sqlite", ["--store", "memory"], ("memory", "sqlite", "memory")),
    "token": ("file", "env", ["--token", "flag"], ("file", "env", "flag")),
    "allow_origin": (
        ["http://f.test"],
        "http://e.test,http://e2.test",
        ["--allow-origin", "http://a.test"],
        (("http://f.test",), ("http://e.test", "http://e2.test"), ("http://a.test",)),
    ),
    "allow_host": (
        ["f.test"],
        "e.test",
        ["--allow-host", "a.test"],
        (("f.test",), ("e.test",), ("a.test",)),
    ),
    "metrics_public": (True, "0", ["--metrics-public"], (True, False, True)),
    **{
        name: (11, "12", [f"--{name.replace('_', '-')}", "13"], (11, 12, 13))
        for name in (
            "max_message_bytes",
            "max_prompt_bytes",
            "max_sessions_per_connection",
            "max_connections",
            "prompts_per_minute",
            "tool_calls_per_minute",
            "outbox_limit",
            "outbox_bytes",
            "detached_buffer",
            "detached_bytes",
        )
    },
    **{
        name: (1.5, "2.5", [f"--{name.replace('_', '-')}", "3.5"], (1.5, 2.5, 3.5))
        for name in ("shutdown_timeout", "grace_seconds", "client_call_timeout", "debounce")
    },
    "site": ("/f", "/e", ["--site", "/a"], (Path("/f"), Path("/e"), Path("/a"))),
    "build": ("make f", "make e", ["--build", "make a"], ("make f", "make e", "make a")),
    "watch": (["/f"], "/e", ["--watch", "/a"], ((Path("/f"),), (Path("/e"),), (Path("/a"),))),
    "ignore": (["*.f"], "*.e,*.e2", ["--ignore", "*.a"], (("*.f",), ("*.e", "*.e2"), ("*.a",))),
    "no_watch": (True, "false", ["--no-watch"], (True, False, True)),
    "open": (True, "", ["--open"], (True, False, True)),
}
del _P


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def test_every_option_from_a_file_the_environment_and_a_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config file setting every option (dashed keys, in a [serve] table) is read whole;
    each option's variable overrides the file's value, and its flag both, through the real
    parser (an option missing from the table fails the test: every one is tried)."""
    assert set(_EVERY_OPTION) == set(BY_NAME)
    for name in list(os.environ):
        if name.startswith("PUNIE_"):
            monkeypatch.delenv(name)
    lines = ["[serve]"] + [
        f"{name.replace('_', '-')} = {_toml(file_value)}"
        for name, (file_value, *_) in _EVERY_OPTION.items()
    ]
    config = write(tmp_path / "every.toml", "\n".join(lines) + "\n")
    file_values = load_file(config, required=True)
    no_flags = vars(cli.build_parser().parse_args(["serve"]))
    from_file = resolve(no_flags, file_values, {}, str(config))
    environ = {BY_NAME[name].env: env for name, (_, env, _, _) in _EVERY_OPTION.items()}
    from_env = resolve(no_flags, file_values, environ, str(config))
    argv = [arg for _, _, flag, _ in _EVERY_OPTION.values() for arg in flag]
    flags = vars(cli.build_parser().parse_args(["serve", *argv]))
    from_flags = resolve(flags, file_values, environ, str(config))
    for name, (*_, (want_file, want_env, want_flag)) in _EVERY_OPTION.items():
        assert want_file != BY_NAME[name].default, name
        assert from_file[name] == want_file, name
        assert from_env[name] == want_env, name
        assert from_flags[name] == want_flag, name


def _serve_config_from(
    root: Path, winner: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, dict[str, Any]]:
    """The ``ServeConfig`` ``cli.main(["serve", ...])`` hands the server, with every option
    set by each place up to ``winner`` (``default``: none), and what it hands beside it
    (the log level, ``--open``). No server starts, no logging is set up."""
    places = ("file", "env", "flag")
    given = places[: places.index(winner) + 1] if winner != "default" else ()
    for variable in list(os.environ):
        if variable.startswith("PUNIE_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("XDG_DATA_HOME", str(root / "xdg-data"))
    monkeypatch.chdir(root / "project-default")
    ran: dict[str, Any] = {}
    monkeypatch.setattr(cli, "_setup_logging", lambda level, data_dir: ran.update(level=level))

    def run(main: Any, config: Any, open_browser: bool) -> None:
        ran.update(config=config, open=open_browser)

    monkeypatch.setattr(trio, "run", run)
    lines = ["[serve]"]
    argv = ["serve", "--config", str(root / "config.toml")]
    for name, values in _every_place_values(root).items():
        for place in given:
            value = values[places.index(place)]
            if place == "file":
                lines.append(f"{name.replace('_', '-')} = {_toml(value)}")
            elif place == "env":
                monkeypatch.setenv(BY_NAME[name].env, value)
            else:
                argv += [BY_NAME[name].flag] if value is True else [BY_NAME[name].flag, value]
    write(root / "config.toml", "\n".join(lines) + "\n").chmod(0o600)
    assert cli.main(argv) == 0
    return ran["config"], ran


#: The options read as a count, and as seconds.
_COUNTS = (
    "max_prompt_bytes",
    "max_sessions_per_connection",
    "max_connections",
    "prompts_per_minute",
    "tool_calls_per_minute",
    "outbox_limit",
    "outbox_bytes",
    "detached_buffer",
    "detached_bytes",
)
_SECONDS = ("shutdown_timeout", "grace_seconds", "client_call_timeout", "debounce")


def _every_place_values(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every option: (the file's TOML value, the variable's text, the flag's value or True
    for an on/off flag), each apart from the others, from the default and from every other
    option's (two options swapped on their way to the server are told apart)."""
    paths = {
        name: tuple(str(root / f"{name}-{place}") for place in ("file", "env", "flag"))
        for name in ("project", "data_dir", "site", "watch")
    }
    return {
        "host": ("10.0.0.1", "10.0.0.2", "10.0.0.3"),
        "port": (1, "2", "3"),
        "stdio": (True, "no", True),
        "no_http": (True, "off", True),
        "project": ([paths["project"][0]], paths["project"][1], paths["project"][2]),
        "model": ("echo:5", "echo:6", "echo:7"),
        "log_level": ("INFO", "Error", "debug"),
        "data_dir": paths["data_dir"],
        "store": ("memory", "sqlite", "memory"),
        "token": ("file", "env", "flag"),
        "allow_origin": (["http://f.test"], "http://e.test", "http://a.test"),
        "allow_host": (["f.test"], "e.test", "a.test"),
        "metrics_public": (True, "0", True),
        "max_message_bytes": (1001, "1002", "1003"),
        **{name: (11 + i, str(31 + i), str(51 + i)) for i, name in enumerate(_COUNTS)},
        **{name: (1.5 + i, str(20.5 + i), str(40.5 + i)) for i, name in enumerate(_SECONDS)},
        "site": paths["site"],
        "build": ("make f", "make e", "make a"),
        "watch": ([paths["watch"][0]], paths["watch"][1], paths["watch"][2]),
        "ignore": (["*.f"], "*.e", "*.a"),
        "no_watch": (True, "false", True),
        "open": (True, "", True),
    }


@pytest.mark.parametrize("winner", ["default", "file", "env", "flag"])
def test_every_option_reaches_the_serve_config_from_the_place_that_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    """``test_every_observable_option_reaches_the_server_from_the_place_that_wins``
    (``test_config_sources.py``) runs real servers for the options a client can see; the
    others (stdio, the timeouts, the outbox and grace bounds, the dev app's) reach the
    server through ``cli._serve_locked``'s hand-written mapping, which no test followed
    for them. Here every option, set by the file, the environment over it and a flag over
    both, is read back from the ``ServeConfig`` that ``serve`` runs."""
    root = Path(os.path.realpath(tmp_path))
    for name in ("project", "site", "watch"):
        for place in ("file", "env", "flag"):
            (root / f"{name}-{place}").mkdir()
    (root / "project-default").mkdir()
    config, ran = _serve_config_from(root, winner, monkeypatch)
    dev = config.dev_options
    read = {
        "host": config.host,
        "port": config.port,
        "stdio": config.stdio,
        "no_http": not config.http,
        "project": config.projects,
        "model": config.model.name,
        "log_level": ran["level"],
        "data_dir": config.data_dir,
        "store": config.store,
        "token": config.token,
        "allow_origin": config.allow_origins,
        "allow_host": config.allow_hosts,
        "metrics_public": config.metrics_public,
        "max_message_bytes": config.max_message_bytes,
        "shutdown_timeout": config.shutdown_timeout,
        **{
            name: getattr(config.limits, name)
            for name in (
                "max_prompt_bytes",
                "max_sessions_per_connection",
                "max_connections",
                "prompts_per_minute",
                "tool_calls_per_minute",
                "outbox_limit",
                "outbox_bytes",
                "grace_seconds",
                "detached_buffer",
                "detached_bytes",
                "client_call_timeout",
            )
        },
        "site": config.site,
        "build": dev.get("build_cmd"),
        "watch": dev.get("watch"),
        "ignore": dev.get("ignore"),
        "no_watch": dev["no_watch"],
        "debounce": dev["debounce"],
        "open": ran["open"],
    }
    assert set(read) == set(BY_NAME)
    if winner == "default":
        expected = {o.name: o.default for o in OPTIONS}
        expected |= {"project": (root / "project-default",), "model": "echo", "site": None}
        expected |= {"data_dir": root / "xdg-data" / "punie-trio", "watch": None, "ignore": None}
        expected |= {"no_http": False, "token": (root / "xdg-data/punie-trio/token").read_text()}
        expected["token"] = expected["token"].strip()
        assert read == expected
        return
    for name, values in _every_place_values(root).items():
        value = values[("file", "env", "flag").index(winner)]
        assert read[name] == _read_as(name, value), (name, winner)


def _read_as(name: str, value: Any) -> Any:
    """What ``value`` (a TOML value, a variable's text or a flag's) of option ``name`` is
    in the ``ServeConfig``."""
    items = value if isinstance(value, list) else [value]
    if value is True or value is False:
        return value
    if name in ("stdio", "no_http", "metrics_public", "no_watch", "open"):
        return value not in ("no", "off", "0", "false", "")
    if name in (*_COUNTS, "port", "max_message_bytes"):
        return int(value)
    if name in _SECONDS:
        return float(value)
    if name in ("project", "watch"):
        return tuple(Path(item) for item in items)
    if name in ("data_dir", "site"):
        return Path(value)
    if name in ("allow_origin", "allow_host", "ignore"):
        return tuple(items)
    return value.lower() if name == "log_level" else value


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--port", "\u0668\u0660"),  # ARABIC-INDIC 8 0: int() reads 80
        ("--port", "\uff18\uff17\uff16\uff15"),  # FULLWIDTH 8765
        ("--max-connections", "\u0969"),  # DEVANAGARI 3
        ("--grace-seconds", "\uff11\uff10"),  # FULLWIDTH 10: float() reads 10.0
        ("--grace-seconds", "\u0661.\u0665"),  # ARABIC-INDIC 1.5
    ],
)
def test_numbers_are_ascii_digits(
    capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """``int()`` and ``float()`` read any Unicode decimal digit: ``PUNIE_PORT=٨٠`` bound
    port 80, and a fullwidth 8765 (U+FF18...) (an input method's) was taken as 8765, without a
    word. A number is ASCII digits, as every other tool reading these options takes it."""
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["serve", flag, value])
    assert info.value.code == 2
    kind = "a number" if flag == "--grace-seconds" else "an integer"
    assert f"argument {flag}: must be {kind}, got " in capsys.readouterr().err
    name = flag.removeprefix("--")
    with pytest.raises(ConfigError) as env_info:
        resolve({}, {}, {f"PUNIE_{name.upper().replace('-', '_')}": value}, "config.toml")
    assert f"{name} must be {kind}, got " in str(env_info.value)
