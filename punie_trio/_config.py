"""``serve`` options from four places, in order of precedence: command-line flags, then
``PUNIE_*`` environment variables, then the TOML config file, then the defaults.

One table (:data:`OPTIONS`) drives all four, so an option cannot exist in one place and be
forgotten in another. Errors name the source, the option, what it takes and the value
given (``config.toml: port must be an integer, got 1.5``), and the CLI exits 2 with them.
The file's values are typed as TOML types them: a string is no number or boolean there.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs

from ._paths import NotASmallFile, OthersCanWrite, read_small_file

T = TypeVar("T")


class ConfigError(ValueError):
    """An option has a bad value, or the config file is unreadable or has unknown keys."""


def as_flag(convert: Callable[[Any], T]) -> Callable[[str], T]:
    """A converter below as an argparse type: a flag is checked by the very rule its
    variable and its file key are (argparse's own message for a ValueError would name the
    function, not the rule)."""

    def parse(text: str) -> T:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


#: The longest string an error quotes whole.
QUOTED_CHARS = 100


def quoted(text: str) -> str:
    """``text`` as a message quotes it: whole (``repr``, control characters escaped) up to
    :data:`QUOTED_CHARS`, else its start and its length: 5,000 characters once went to
    the terminal whole."""
    if len(text) <= QUOTED_CHARS:
        return repr(text)
    return f"{text[:60]!r}... ({len(text):,} characters)"


def _given(value: Any) -> str:
    """``value`` as an error quotes it: a string quoted (its control characters escaped), a
    boolean and a number as TOML writes them, an array with its items, a table and a date
    by their kind.

    Why: a TOML float for an integer (``max-connections = 5.5``), a number for a string or
    a bad boolean from ``$PUNIE_STDIO`` was told only what it must be ("must be an
    integer"), and the user looked for what was wrong with a value the message did not
    show."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quoted(value)
    if isinstance(value, int):
        return _shown_int(value)
    if isinstance(value, float):
        # 80.0 as written, not "80": "must be an integer, got 80" would make no sense.
        return repr(value) if value.is_integer() and abs(value) < 1e16 else _shown(value)
    if isinstance(value, list | tuple):
        items = ", ".join(_given(v) for v in value)
        return f"an array, [{items if len(items) <= 60 else items[:60] + '...'}]"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return f"a date or time, {value.isoformat()}"
    return f"a {type(value).__name__}"


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {_given(value)}")


#: An integer as ``int()`` reads it (sign, digits, underscores, spaces around).
_INTEGER = re.compile(r"\s*[+-]?[0-9]+(?:_[0-9]+)*\s*")


def _to_int(value: Any, *, bounds: str = "") -> int:
    """``value`` as an integer; ``bounds`` (``"from 0 to 65535"``) is what a number too
    long for ``int()`` (over 4,300 digits) is told it must be: it is an integer, and was
    once refused as not one, quoted whole (5 KB on the terminal)."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not _ascii(value):
        raise ValueError(f"must be an integer, got {_given(value)}")
    try:
        return int(value)
    except ValueError:  # int("abc") says "invalid literal for int() with base 10"
        if bounds and isinstance(value, str) and _INTEGER.fullmatch(value):
            digits = sum(c.isdigit() for c in value)
            raise ValueError(f"must be {bounds}, got a number of {digits} digits") from None
        raise ValueError(f"must be an integer, got {_given(value)}") from None


def _ascii(value: object) -> bool:
    """False for a string with anything but ASCII: ``int()`` and ``float()`` read every
    Unicode decimal digit, so ``PUNIE_PORT=٨٠`` bound port 80 and a fullwidth 8765 (U+FF18...)
    was 8765, without a word."""
    return not isinstance(value, str) or value.isascii()


def _shown_int(number: int) -> str:
    """``number`` in full, or its length past 20 digits (a float's ``1e+400`` would not
    do: past about 309 digits an int cannot be made a float at all)."""
    if abs(number) < 10**20:
        return str(number)
    sign = "a negative" if number < 0 else "a"
    return f"{sign} number of {len(str(abs(number)))} digits"


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str) or not _ascii(value):
        raise ValueError(f"must be a number, got {_given(value)}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"must be a number, got {_given(value)}") from None


#: The most any count or byte-size option (a limit) may be: 2**40 (1 TiB, a trillion),
#: far past any machine's memory or a client's pace, so in effect no bound. More is a
#: mistake, and ``--max-message-bytes 999999999999999999999999999999`` (accepted once)
#: ended every ``permessage-deflate`` connection with OverflowError at its first message:
#: the bounded inflate hands zlib the limit plus one, which must fit a C ``ssize_t``.
MAX_COUNT = 2**40


def _to_positive_int(value: Any) -> int:
    number = _to_int(value, bounds=f"from 1 to {MAX_COUNT} (2**40)")
    if number <= 0:
        raise ValueError(f"must be a positive integer, got {_shown_int(number)}")
    if number > MAX_COUNT:
        raise ValueError(f"must be at most {MAX_COUNT} (2**40), got {_shown_int(number)}")
    return number


def _to_port(value: Any) -> int:
    number = _to_int(value, bounds="from 0 to 65535")
    if not 0 <= number <= 65535:
        raise ValueError(f"must be from 0 to 65535, got {_shown_int(number)}")
    return number


#: The most any seconds-valued option may be: a year. More is a mistake, and ``inf``
#: (accepted once) crashed the shutdown's force-exit timer as it started (threading cannot
#: wait that long), so that last resort never ran.
MAX_SECONDS = 365 * 24 * 60 * 60


def _to_seconds(value: Any) -> float:
    number = _to_float(value)
    if not number >= 0:
        raise ValueError(f"must be a number of seconds >= 0, got {_shown(number)}")
    if number > MAX_SECONDS:
        raise ValueError(f"must be at most {MAX_SECONDS} seconds (a year), got {_shown(number)}")
    return number


def _shown(number: float) -> str:
    """``number`` short (``1e+10``, ``inf``) where that is exact, else in full: six digits
    showed 31536001 as ``3.1536e+07``, the limit itself, it seemed."""
    short = f"{number:g}"
    return short if float(short) == number else f"{number:.17g}"


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_given(value)}")
    if "\0" in value:
        # Only a TOML file can hold one ("\u0000"; argv and the environment cannot): no
        # path, host or command can, and a data-dir, project, watch or host with one was a
        # ValueError traceback (exit 1) from the first system call that met it.
        raise ValueError(f"must not contain a NUL character, got {_given(value)}")
    return value


def _to_nonempty(value: Any) -> str:
    text = _to_str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _to_host(value: Any) -> str:
    # An empty host would bind every interface (0.0.0.0): never by accident.
    host = _to_nonempty(value)
    if host != host.strip():
        raise ValueError(f"must not have spaces around it, got {_given(host)}")
    return host


#: Ports an Origin header leaves out (a browser sends ``http://localhost``, not ``:80``).
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*\Z")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}\Z")


def _ascii_name(name: str) -> str | None:
    """``name`` as a ``Host`` header or an ``Origin`` carries it: lowercase, no final dot,
    non-ASCII labels in their punycode (IDNA) form; None if it is not a host name. A name
    ending in a number must be a whole IPv4 address (a browser reads ``127.1`` as one and
    sends ``127.0.0.1``, so the short form could never match)."""
    name = name.lower().rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return None
    return name


def _to_origin(value: Any) -> str:
    """An origin, ``scheme://host[:port]``, in the form browsers send it (lowercase, IDNA,
    no default port, no path). Anything else could never match an ``Origin`` header (and
    was accepted without a word). ``null`` is refused: every site's sandboxed frames and
    every ``file://`` page send it."""
    text = _to_nonempty(value).strip()
    if text.lower() == "null":
        raise ValueError("cannot be null: sandboxed frames and file:// pages of any site send it")
    bad = ValueError(f"must be an origin like http://localhost:3000, got {_given(value)}")
    parts = urlsplit(text.removesuffix("/"))
    scheme = parts.scheme.lower()
    if (
        not _SCHEME.match(scheme)
        or not parts.netloc
        or parts.netloc.endswith(":")
        or "@" in parts.netloc
        or parts.path
        or parts.query
        or parts.fragment
        or parts.hostname is None
    ):
        raise bad
    try:
        port = parts.port
    except ValueError:
        raise bad from None
    host = parts.hostname
    if ":" in host:  # an IPv6 address (urlsplit took off its brackets), without a zone
        if "%" in host:
            raise bad
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise bad from None
    else:
        name = _ascii_name(host)
        if name is None:
            raise bad
        host = name
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host += f":{port}"
    return f"{scheme}://{host}"


def _to_host_name(value: Any) -> str:
    """A host name for the Host check, as a ``Host`` header carries it: ``name``,
    ``.domain`` (the domain and its subdomains) or ``*`` (every name)."""
    text = _to_nonempty(value).strip()
    if text == "*":
        return text
    dot = "." if text.startswith(".") else ""
    name = _ascii_name(text.removeprefix("."))
    if name is None:
        raise ValueError(
            "must be a host name like myhost.lan or .example.com (no scheme or port; IP "
            f"addresses are always allowed), got {_given(value)}"
        )
    return dot + name


def _to_token(value: Any) -> str:
    # Empty once meant "generate one" without a word; spaces around it could be sent only
    # in ?token= (an HTTP header's value is stripped). Nor is anything but printable ASCII
    # sent the same way by every client: a header's other bytes have no agreed encoding
    # (the server read them as Latin-1, so "Bearer pässwörd" in UTF-8 never matched, while
    # ?token= wanted UTF-8), and a control character cannot be in a header at all. The
    # message never shows the value: it is a secret (so not _to_nonempty, whose NUL check,
    # common to every string, quotes the value: a NUL is refused below as unprintable).
    if not isinstance(value, str):
        # (Its kind, not its value: a number may be the secret.)
        kinds = {bool: "a boolean", int: "an integer", float: "a float"}
        kind = kinds.get(type(value)) or _given(value).partition(",")[0]
        raise ValueError(f"must be a string, got {kind}")
    token = value
    if not token.strip():
        raise ValueError("must not be empty")
    if token != token.strip():
        raise ValueError("must not have spaces around it")
    if not (token.isascii() and token.isprintable()):
        raise ValueError("must be printable ASCII (a request carries it in a header)")
    return token


def _choice(*names: str, fold_case: bool = False) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str):  # (named with the choices, as a bad string is)
            raise ValueError(f"must be one of {', '.join(names)}, got {_given(value)}")
        text = _to_str(value)
        key = text.lower() if fold_case else text
        if key not in names:
            raise ValueError(f"must be one of {', '.join(names)}, got {_given(text)}")
        return key

    return convert


def _to_path(value: Any) -> Path:
    # "" would mean the current directory: a data dir, site or project nobody chose. So
    # would " /srv/data" (PUNIE_DATA_DIR=" $HOME/x", a list "/a, /b" split at the comma):
    # a relative path, a directory named " " under the current one that serve created
    # and the read-only commands looked in.
    text = _to_nonempty(value)
    if text != text.strip():
        raise ValueError(f"must not have spaces around it, got {_given(text)}")
    try:
        return Path(text).expanduser()
    except RuntimeError:
        # ~nosuchuser (or ~ where no home directory can be found) was a RuntimeError
        # traceback, in serve and in the read-only commands alike.
        raise ValueError(f"has a ~ that names no home directory, got {_given(text)}") from None


#: The values of ``log-level`` and ``store`` (the flags offer the same choices).
LOG_LEVELS = ("debug", "info", "warning", "error")
STORES = ("sqlite", "memory")


@attrs.frozen
class Option:
    name: str
    convert: Callable[[Any], Any]
    default: Any = None
    many: bool = False  # a list (repeatable flag; os.pathsep/comma separated in env)

    @property
    def env(self) -> str:
        return "PUNIE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("host", _to_host, "127.0.0.1"),
    Option("port", _to_port, 8765),
    Option("stdio", _to_bool, False),
    Option("no_http", _to_bool, False),
    Option("project", _to_path, (), many=True),
    Option("model", _to_str, "echo"),
    Option("log_level", _choice(*LOG_LEVELS, fold_case=True), "warning"),
    Option("data_dir", _to_path, None),
    Option("store", _choice(*STORES), "sqlite"),
    Option("token", _to_token, None),
    Option("allow_origin", _to_origin, (), many=True),
    Option("allow_host", _to_host_name, (), many=True),
    Option("metrics_public", _to_bool, False),
    Option("max_message_bytes", _to_positive_int, 16 * 1024 * 1024),
    Option("max_prompt_bytes", _to_positive_int, 1024 * 1024),
    Option("max_sessions_per_connection", _to_positive_int, 64),
    Option("max_connections", _to_positive_int, 256),
    Option("prompts_per_minute", _to_positive_int, 120),
    Option("tool_calls_per_minute", _to_positive_int, 240),
    Option("outbox_limit", _to_positive_int, 256),
    Option("outbox_bytes", _to_positive_int, 1024 * 1024),
    Option("shutdown_timeout", _to_seconds, 5.0),
    Option("grace_seconds", _to_seconds, 300.0),
    Option("detached_buffer", _to_positive_int, 1024),
    Option("detached_bytes", _to_positive_int, 4 * 1024 * 1024),
    Option("client_call_timeout", _to_seconds, 300.0),
    Option("site", _to_path, None),
    Option("build", _to_nonempty, None),  # "" ran no build, without a word
    Option("watch", _to_path, (), many=True),
    # An empty (or blank) glob was skipped without a word, while PUNIE_IGNORE= was an error.
    Option("ignore", _to_nonempty, (), many=True),
    Option("no_watch", _to_bool, False),
    Option("debounce", _to_seconds, 0.2),
    Option("open", _to_bool, False),
)
BY_NAME = {o.name: o for o in OPTIONS}
BY_ENV = {o.env: o for o in OPTIONS}


#: A key TOML lets stand unquoted.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")

#: The largest config file read (a real one is a few hundred bytes).
MAX_CONFIG_BYTES = 1024 * 1024


def load_file(path: Path, *, required: bool) -> dict[str, Any]:
    """The ``[serve]`` table (or top level) of a TOML file; {} if absent and not required."""
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is skipped; it was "not
        # valid TOML: Invalid statement (at line 1, column 1)", pointing at nothing visible.
        text = read_small_file(path, MAX_CONFIG_BYTES, trusted=True).decode("utf-8-sig")
        data = tomllib.loads(text)
    except OthersCanWrite as exc:
        raise ConfigError(
            f"config file {path} {exc}: whoever can change it can make serve run "
            f"commands as you (build, model); {exc.fix.format(path=path)}"
        ) from None
    except NotASmallFile as exc:
        raise ConfigError(f"config file {path} {exc}: not a config file") from None
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        # A default file that is a link (or under one) to nothing is not "no file": the
        # dotfiles it came from moved, and serve ran on the defaults without a word (a
        # generated token, the current directory as the project).
        for link in (path, *path.parents):
            if link.is_symlink() and not link.exists():
                raise ConfigError(
                    f"config file {path} cannot be read: {link} is a symlink to "
                    f"{os.readlink(link)}, which does not exist"
                ) from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get("serve", data)
    if not isinstance(table, dict):
        shown = f"the string {_given(table)}" if isinstance(table, str) else _given(table)
        raise ConfigError(f"{path}: [serve] must be a table, got {shown}")
    if table is not data and len(data) > 1:
        # With a [serve] table, anything beside it (a misspelt table, an option above it)
        # would be ignored without a word.
        others = ", ".join(sorted(k for k in data if k != "serve"))
        raise ConfigError(f"{path}: {others} beside the [serve] table (options go inside it)")
    options: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in BY_NAME:
            # An unknown key keeps its spelling, for the error that names it: turned
            # into max_conections, max-conections = 1 was named as the file has it not.
            name = key
        if name in options:
            raise ConfigError(f"{path}: {name.replace('_', '-')} is given twice (as - and _)")
        options[name] = value
    return options


def readable_token_warning(
    path: Path, file_values: Mapping[str, Any], token_source: str | None
) -> str | None:
    """A warning when the config file at ``path`` (read into ``file_values``) holds a token
    and other users can read it; ``token_source``: where the token in use comes from (the
    file's name, ``--token``, ``$PUNIE_TOKEN``). None when there is nothing to say.

    Why: editors create files 0644, so a ``token =`` there is every local user's to read.
    A warning, not a refusal: the directories above may keep others out. Where a flag or
    the variable overrides it, it was not said at all, though the file's token is a
    secret all the same (often the one in use elsewhere, and the token of the next start
    without the override). The token itself is never shown."""
    if "token" not in file_values:
        return None
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o044:
        return None
    if token_source is None or token_source == str(path):
        return (
            f"{path} holds the token and is readable by others (mode {mode:04o}); "
            f"`chmod 600 {path}`, or give the token in $PUNIE_TOKEN"
        )
    return (
        f"{path} holds a token and is readable by others (mode {mode:04o}), though "
        f"{token_source} overrides it; `chmod 600 {path}`, or take the token out of it"
    )


#: What the config file must give for an option read by each of these converters: TOML
#: types its values (the environment's and the flags' are all strings, which the same
#: converters parse).
_TYPED: dict[Callable[[Any], Any], tuple[str, str]] = {
    _to_bool: ("true or false", "write true or false without quotes"),
    _to_port: ("an integer", "write numbers without quotes"),
    _to_positive_int: ("an integer", "write numbers without quotes"),
    _to_seconds: ("a number", "write numbers without quotes"),
}


def _convert(option: Option, value: Any, source: str, *, typed: bool = False) -> Any:
    """``value`` by ``option``'s rule, or a ConfigError naming ``source``. ``typed``: the
    value is TOML's, where a number or a boolean is not a string.

    Why: ``max-connections = "5"`` served 5 connections and ``metrics-public = "yes"``
    made ``/metrics`` public, though docs/configuration.md writes them unquoted and any
    other reader of the file (a TOML linter, a program that edits it) takes them for
    strings."""
    typed_as = _TYPED.get(option.convert) if typed else None
    if typed_as is not None and isinstance(value, str):
        what, how = typed_as
        raise ConfigError(
            f"{source}: {option.name.replace('_', '-')} must be {what}, got the string "
            f"{_given(value)} (TOML is typed: {how})"
        )
    try:
        if option.many:
            items = value if isinstance(value, list | tuple) else [value]
            if not items and option.convert is _to_path:
                # project = [] meant the current directory, watch = [] the first root: a
                # default nobody chose, as PUNIE_PROJECT= would be.
                raise ValueError("must not be an empty list (leave it out for the default)")
            return tuple(option.convert(v) for v in items)
        return option.convert(value)
    except ValueError as exc:
        raise ConfigError(f"{source}: {option.name.replace('_', '-')} {exc}") from None


def _from_env(option: Option, environ: Mapping[str, str]) -> Any:
    raw = environ.get(option.env)
    if raw is None:
        return None
    if option.many:
        sep = os.pathsep if option.convert is _to_path else ","
        items = [p for p in raw.split(sep) if p]
        if not items:  # set but empty: a mistake, not "none" (it would hide the file's list)
            raise ConfigError(f"${option.env} is set but empty (unset it for the default)")
        return _convert(option, items, f"${option.env}")
    return _convert(option, raw, f"${option.env}")


#: The variable naming the config file, as ``--config`` does (which beats it). Not an
#: option: the file cannot name itself, so it is in no table of :data:`OPTIONS`.
CONFIG_ENV = "PUNIE_CONFIG"


def named_config(flag: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The config file named by ``--config``, else by ``$PUNIE_CONFIG``; None for
    neither (the platform's file is then read, if it exists). A named file must exist.

    Why: docs/cli.md has every flag settable as ``PUNIE_<NAME>``, ``--config`` among them,
    but ``$PUNIE_CONFIG`` was ignored without a word: ``serve`` ran on the defaults (the
    platform's data directory, a generated token) and ``token`` looked there. Set but
    empty, or with spaces around it, it is an error, as ``PUNIE_DATA_DIR=`` is, also
    under ``--config`` (as every variable is checked where a flag overrides it)."""
    raw = environ.get(CONFIG_ENV)
    if raw is not None and not raw.strip():
        raise ConfigError(f"${CONFIG_ENV} is set but empty (unset it for the default)")
    try:
        named = None if raw is None else _to_path(raw)
    except ValueError as exc:
        raise ConfigError(f"${CONFIG_ENV}: config {exc}") from None
    if flag is None and named is not None:
        # Named by the variable, which is on no command line (a shell profile set it),
        # a missing file is blamed on it: it once read as --config's "config file PATH
        # does not exist", with nothing to say where PATH came from. (Other troubles
        # with the file name it, as for --config: load_file.)
        try:
            os.stat(named)
        except (FileNotFoundError, NotADirectoryError):
            raise ConfigError(f"${CONFIG_ENV}: config file {named} does not exist") from None
        except OSError:
            pass  # (load_file names what it is)
    return named if flag is None else flag


def misspelt_env(
    environ: Mapping[str, str], *, meaning: Collection[str] | None = None
) -> list[str]:
    """A warning for each ``PUNIE_*`` variable that names no option (nor the config file)
    but nearly names one (only those nearly naming one of the variables ``meaning``, if
    given), sorted by name.

    Why: a misspelt flag or config key is an error, but ``PUNIE_PROT=9000`` was ignored
    without a word and serve ran on its default port. Only near misses are named (difflib's
    ratio at least 0.8): the environment is shared, and other programs (the benchmarks,
    too) set ``PUNIE_*`` variables of their own, which must not make serve complain."""
    known = [option.env for option in OPTIONS] + [CONFIG_ENV]
    warnings = []
    for name in sorted(environ):
        if name.startswith("PUNIE_") and name not in known:
            meant = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            if meant and (meaning is None or meant[0] in meaning):
                warnings.append(
                    f"${name} is not a punie-trio variable and is ignored; did you mean "
                    f"${meant[0]}?"
                )
    return warnings


def resolve(
    flags: Mapping[str, Any],
    file_values: Mapping[str, Any],
    environ: Mapping[str, str],
    file_name: str,
) -> dict[str, Any]:
    """Merge by precedence: flags (non-None) > env > file > defaults."""
    return resolve_with_sources(flags, file_values, environ, file_name)[0]


def resolve_with_sources(
    flags: Mapping[str, Any],
    file_values: Mapping[str, Any],
    environ: Mapping[str, str],
    file_name: str,
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """:func:`resolve`, and where each value came from: ``--flag``, ``$PUNIE_NAME``, the
    file's name, or None for the default.

    Why: some values can only be checked after the merge (a project that is not a
    directory, an unknown model), and their errors named the flag (``--project /x: not a
    directory``) even when the value came from ``$PUNIE_PROJECT`` or the config file, so
    the user looked for a flag nobody gave."""
    unknown = sorted(set(file_values) - set(BY_NAME))
    if unknown:
        known = ", ".join(o.name.replace("_", "-") for o in OPTIONS)
        # A key no bare TOML key could be is quoted: "" = 1 was named as nothing at all
        # ("unknown option(s)  (known: ..."), and one with spaces read as several.
        named = ", ".join(k if _BARE_KEY.match(k) else repr(k) for k in unknown)
        raise ConfigError(f"{file_name}: unknown option(s) {named} (known: {known})")
    values: dict[str, Any] = {}
    sources: dict[str, str | None] = {}
    for option in OPTIONS:
        values[option.name], sources[option.name] = _pick(
            option.name, flags.get(option.name), file_values, environ, file_name
        )
    return values, sources


def resolve_option(
    name: str,
    flag: Any,
    file_values: Mapping[str, Any],
    environ: Mapping[str, str],
    file_name: str,
) -> tuple[Any, str | None]:
    """One option by the precedence of :func:`resolve`, and where it came from (as
    :func:`resolve_with_sources` says it): the read-only commands need only ``data_dir``
    (and ``token`` its token), and find it where ``serve`` does (its flag, the
    environment, the file), without failing on a bad value of an option they do not
    use."""
    return _pick(name, flag, file_values, environ, file_name)


def _pick(
    name: str,
    flag: Any,
    file_values: Mapping[str, Any],
    environ: Mapping[str, str],
    file_name: str,
) -> tuple[Any, str | None]:
    option = BY_NAME[name]
    # Each place is checked even where a higher one wins: a bad value in the file or the
    # environment was ignored without a word while a flag overrode it (`port = "eighty"`
    # under --port 0), and broke the next start, the one without the flag.
    env = _from_env(option, environ)
    in_file = (
        _convert(option, file_values[name], file_name, typed=True) if name in file_values else None
    )
    if flag is not None and not (option.many and not flag):
        return (tuple(flag) if option.many else flag), option.flag
    if env is not None:
        return env, f"${option.env}"
    if name in file_values:
        return in_file, file_name
    return option.default, None
