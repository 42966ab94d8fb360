"""Pure parts of the dev app: HTTP rules, events, injection, snapshots, ignore rules."""

from __future__ import annotations

import html.parser
import json
import mimetypes
import os
import xml.etree.ElementTree
from pathlib import Path

import pytest
import trio

from punie_trio.web.dev import DevApp, _events, _http, _inject, _pages, _snapshot, _watch
from punie_trio.web.dev._broadcast import HISTORY, Broadcaster, Subscriber
from punie_trio.web.dev._builder import OutputTail, tail
from punie_trio.web.dev._events import ReloadEvent

# -- HTTP rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-500", 100, (0, 99)),
        ("bytes=50-500", 100, (50, 99)),
        ("bytes = 5-5", 100, (5, 5)),
        ("bytes=0-" + "9" * 5000, 100, (0, 99)),  # int() of 5000 digits raises: once a 500
        ("bytes=-" + "9" * 5000, 100, (0, 99)),
    ],
)
def test_parse_range_satisfiable(header: str, size: int, expected: tuple[int, int]) -> None:
    parsed = _http.parse_range(header, size)
    assert isinstance(parsed, _http.ByteRange)
    assert (parsed.start, parsed.end) == expected
    assert parsed.content_range() == f"bytes {expected[0]}-{expected[1]}/{size}"


@pytest.mark.parametrize(
    "header", ["bytes=100-", "bytes=200-300", "bytes=-0", "bytes=" + "9" * 30 + "-"]
)
def test_parse_range_unsatisfiable(header: str) -> None:
    parsed = _http.parse_range(header, 100)
    assert isinstance(parsed, _http.Unsatisfiable)
    assert parsed.content_range() == "bytes */100"


@pytest.mark.parametrize(
    "header",
    ["items=0-1", "bytes=a-b", "bytes=5-1", "bytes=0-1,3-4", "bytes=-", "bytes", "bytes=\u00b2-"],
)
def test_parse_range_ignored(header: str) -> None:
    assert _http.parse_range(header, 100) is None


def test_etag_and_conditionals() -> None:
    etag = _http.make_etag(10, 123, "gz")
    assert etag == '"a-7b-gz"'
    assert _http.etag_matches(etag, etag)
    assert _http.etag_matches(f'"other", W/{etag}', etag)
    assert _http.etag_matches("*", etag)
    assert not _http.etag_matches('"a-7b"', etag)
    date = _http.http_date(1_700_000_000)
    assert _http.not_modified(
        etag=etag, mtime=1_700_000_000.5, if_none_match=None, if_modified_since=date
    )
    assert not _http.not_modified(
        etag=etag, mtime=1_700_000_001, if_none_match=None, if_modified_since=date
    )
    # If-None-Match wins over If-Modified-Since.
    assert not _http.not_modified(etag=etag, mtime=0, if_none_match='"x"', if_modified_since=date)
    assert not _http.not_modified(
        etag=etag, mtime=0, if_none_match=None, if_modified_since="garbage"
    )
    assert _http.if_range_allows(None, etag=etag, last_modified=date)
    assert _http.if_range_allows(etag, etag=etag, last_modified=date)
    assert not _http.if_range_allows('"old"', etag=etag, last_modified=date)
    assert _http.if_range_allows(date, etag=etag, last_modified=date)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gzip, deflate, br", True),
        ("br;q=1.0, gzip;q=0.5", True),
        ("gzip;q=0", False),
        ("identity", False),
        ("*", True),
        ("*;q=0", False),
        (None, False),
    ],
)
def test_accepts_gzip(value: str | None, expected: bool) -> None:
    assert _http.accepts_gzip(value) is expected


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/docs", b"", b"/docs/"),
        ("//docs", b"", b"/docs/"),  # a path on this server, never the host "docs"
        ("/a b/c", b"", b"/a%20b/c/"),
        ("/docs", b"x=1&y=a/b?c", b"/docs/?x=1&y=a/b?c"),
        ("/docs", b"q=%C3%A9", b"/docs/?q=%C3%A9"),
        # Raw bytes (HTTP/2 lets a client send them): escaped, not decoded as Latin-1 and
        # encoded as UTF-8 (the Location said ?q=\xc3\x83\xc2\xa9 for ?q=\xc3\xa9).
        ("/docs", "q=\u00e9".encode(), b"/docs/?q=%C3%A9"),
        ("/docs", b"a b\xff", b"/docs/?a%20b%FF"),
    ],
)
def test_directory_redirect_location(path: str, query: bytes, expected: bytes) -> None:
    assert _http.directory_location(path, query) == expected


def test_content_types() -> None:
    assert _http.content_type("a/index.HTML") == "text/html; charset=utf-8"
    assert _http.content_type("s.css") == "text/css; charset=utf-8"
    assert _http.content_type("x.js") == "text/javascript; charset=utf-8"
    assert _http.content_type("p.png") == "image/png"
    assert _http.content_type("noext") == "application/octet-stream"
    assert _http.is_compressible("text/css; charset=utf-8")
    assert _http.is_compressible("image/svg+xml")
    assert not _http.is_compressible("text/event-stream")
    assert not _http.is_compressible("image/png")


#: Lines of Debian's /etc/mime.types (media-types) that disagree with what a site means.
_DEBIAN_MIME_TYPES = "text/vnd.trolltech.linguist\tts\nmodel/vnd.mts\tmts\n"


@pytest.mark.parametrize("system", ["none", "debian"])
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("page.xhtml", "application/xhtml+xml; charset=utf-8"),
        ("segment0.ts", "video/mp2t"),
        ("font.otf", "font/otf"),
        ("font.ttf", "font/ttf"),
        ("clip.ogv", "video/ogg"),
        ("sound.ogg", "audio/ogg"),
        ("sound.oga", "audio/ogg"),
    ],
)
def test_content_types_do_not_depend_on_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, system: str, name: str, expected: str
) -> None:
    """``mimetypes`` reads the machine's own tables (/etc/mime.types, the Windows
    registry) over its built-in one: without them (a slim container) an XHTML page, which
    the docs say gets the script, was application/octet-stream (a download, no script),
    and with Debian's a video segment (HLS ``.ts``) was Qt Linguist text, in utf-8, gzipped."""
    files: list[str] = []
    if system == "debian":
        table = tmp_path / "mime.types"
        table.write_text(_DEBIAN_MIME_TYPES)
        files.append(str(table))
    monkeypatch.setattr(mimetypes, "_db", mimetypes.MimeTypes(filenames=files))
    assert _http.content_type(name, b"<html/>") == expected


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b'<!doctype html><meta charset="iso-8859-1"><p>caf\xe9', "iso-8859-1"),
        (b"<META CHARSET='Windows-1251'/>", "windows-1251"),
        (b'<meta http-equiv="Content-Type" content="text/html; charset=Shift_JIS">', "shift_jis"),
        (b'<meta content="text/html;charset=euc-jp" http-equiv=content-type>', "euc-jp"),
        (b'<meta content="text/html; charset=euc-jp">', None),  # no http-equiv: not a pragma
        (b"<!-- <meta charset=koi8-r> --><meta charset=latin1>", "latin1"),
        (b'<div title="<meta charset=koi8-r>"><meta charset=gbk>', "gbk"),
        (b"<meta charset=utf-16>", "utf-8"),  # ASCII bytes that say UTF-16 are not
        (b"<meta charset=x-user-defined>", "windows-1252"),
        (b'<meta charset="a;b"><meta charset=latin2>', "latin2"),  # not a label: skipped
        (b" " * 1024 + b"<meta charset=latin1>", None),  # past the first 1024 bytes
        (b"<p>no declaration</p>", None),
    ],
)
def test_prescan(head: bytes, expected: str | None) -> None:
    assert _http.prescan(head) == expected


def test_charset_is_the_documents_own() -> None:
    # Every text type went out as utf-8, overriding the page's own declaration (an audit).
    latin1 = b'<html><head><meta charset="iso-8859-1"></head><body>caf\xe9</body></html>'
    assert _http.content_type("a.html", latin1) == "text/html; charset=iso-8859-1"
    assert _http.content_type("a.html", b"<p>plain") == "text/html; charset=utf-8"
    assert _http.content_type("a.html", b"\xff\xfe<\x00") == "text/html; charset=utf-16le"
    assert _http.content_type("a.css", b"\xfe\xff\x00a") == "text/css; charset=utf-16be"
    assert _http.content_type("a.css", b"@charset 'x';") == "text/css; charset=utf-8"
    decl = b'<?xml version="1.0" encoding="ISO-8859-1"?><a/>'
    assert _http.content_type("feed.xml", decl) == "application/xml; charset=iso-8859-1"
    assert _http.content_type("p.xhtml", b"<html/>") == "application/xhtml+xml; charset=utf-8"
    assert _http.charset("text/html; charset=koi8-r") == "koi8-r"
    assert _http.charset("image/png") is None


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b'@charset "ISO-8859-1";\nh1::after { content: "\xa9"; }', "iso-8859-1"),
        (b'@charset "windows-1251";', "windows-1251"),
        (b'@charset "utf-16";', "utf-8"),  # ASCII bytes that say UTF-16 are not
        (b"@charset 'latin1';", "utf-8"),  # not the rule: it is exactly @charset "...";
        (b' @charset "latin1";', "utf-8"),  # only at the very start
        (b'@charset "a;b";', "utf-8"),  # not a label
        (b'\xef\xbb\xbf@charset "latin1";', "utf-8"),  # the BOM wins
        (b"h1 { color: red; }", "utf-8"),
    ],
)
def test_a_stylesheet_is_sent_in_the_charset_its_charset_rule_names(
    head: bytes, expected: str
) -> None:
    """CSS Syntax 3.2: a stylesheet's ``@charset "label";`` names its encoding, but the
    header's charset comes first; every stylesheet went out as utf-8, so a Latin-1 one
    that said so showed U+FFFD for its \u00a9 (as pages once did: their ``<meta charset>``
    is honoured)."""
    assert _http.content_type("a.css", head) == f"text/css; charset={expected}"


def test_inject_into_utf16_page() -> None:
    page = "\ufeff<html><body>\u00e9\U0001f600</body></html>".encode("utf-16le")
    out = _inject.inject(page, {"generation": 1}, "utf-16le").decode("utf-16le")
    assert out.startswith("\ufeff<html><body>\u00e9\U0001f600<script")
    assert out.endswith("</script></body></html>")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bundle.js.gz", "application/gzip"),
        ("BUNDLE.JS.GZ", "application/gzip"),
        ("app.wasm.br", "application/octet-stream"),
        ("data.json.bz2", "application/x-bzip2"),
        ("site.tar.xz", "application/x-xz"),
        ("old.Z", "application/octet-stream"),
        ("release.tgz", "application/gzip"),
        ("icon.svgz", "application/gzip"),
    ],
)
def test_compressed_files_get_their_compressions_type(name: str, expected: str) -> None:
    # They were sent as the inner type (text/javascript; charset=utf-8 for bundle.js.gz)
    # without Content-Encoding (found by a dev app audit).
    assert _http.content_type(name) == expected
    assert not _http.is_compressible(_http.content_type(name))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", []),
        ("/a/b.html", ["a", "b.html"]),
        ("/a//b/", ["a", "b"]),
        ("/../etc/passwd", None),
        ("/a/./b", None),
        ("/.git/config", None),
        ("/a/.env", None),
        ("/a\\..\\b", None),
        ("relative", None),
    ],
)
def test_safe_segments(path: str, expected: list[str] | None) -> None:
    assert _http.safe_segments(path) == expected


# -- events and the wire format -----------------------------------------------------------


def test_merge_by_severity() -> None:
    css = ReloadEvent("reload-css", ("a.css",), 3)
    full = ReloadEvent("reload", ("index.html",), 2)
    merged = css.merge(full)
    assert merged == ReloadEvent("reload", ("a.css", "index.html"), 3)
    assert full.merge(css) == merged
    assert css.merge(ReloadEvent("reload-css", ("b.css",), 4)).action == "reload-css"
    assert _events.merge_all([]) is None
    many = [ReloadEvent("reload-css", (f"{i:04}.css",), i) for i in range(500)]
    merged_many = _events.merge_all(many)
    assert merged_many is not None
    assert len(merged_many.paths) == _events.MAX_PATHS
    assert merged_many.generation == 499


def test_sse_format() -> None:
    event = ReloadEvent("reload", ("index.html",), 7)
    wire = _events.encode(event, "5eed")
    assert wire == (
        b"id: 5eed.7\nevent: reload\n"
        b'data: {"action":"reload","paths":["index.html"],"generation":7}\n\n'
    )
    assert _events.opening(1500).startswith(b"retry: 1500\n: ")
    assert _events.opening().endswith(b"\n\n")
    assert _events.format_comment("a\nb") == b": a\n: b\n\n"
    assert _events.KEEPALIVE == b": keepalive\n\n"
    error = _events.StatusEvent("build_error", 2, "make", 2, "line1\nline2")
    wire = _events.encode(error, "5eed")
    lines = wire.decode().split("\n")
    assert lines[:2] == ["id: 5eed.2", "event: build_error"]
    assert json.loads(lines[2].removeprefix("data: ")) == {
        "generation": 2,
        "command": "make",
        "exit_status": 2,
        "output": "line1\nline2",
    }
    assert wire.endswith(b"\n\n") and wire.count(b"\n") == 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12", 12),
        (b"3", 3),
        (" 4 ", 4),
        ("-1", None),
        ("x", None),
        ("", None),
        (None, None),
        ("\u00b2", None),  # isdigit() but not int(): once a 500
        (b"\xb2", None),
    ],
)
def test_parse_event_id(value: str | bytes | None, expected: int | None) -> None:
    assert _events.parse_event_id(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12", ("", 12)),
        ("a1b2.3", ("a1b2", 3)),
        (b"r_-9.0", ("r_-9", 0)),
        ("a.b.3", None),
        (".3", None),
        ("run.", None),
        ("run.x", None),
        ("<x>.3", None),
        (None, None),
    ],
)
def test_parse_since(value: str | bytes | None, expected: tuple[str, int] | None) -> None:
    assert _events.parse_since(value) == expected


def test_another_runs_client_gets_a_full_reload() -> None:
    hub = Broadcaster(run="now")
    assert hub.missed_since(0, "now") is None
    assert hub.missed_since(0) is None  # a client that does not say: this run's
    assert hub.missed_since(0, "before") == ReloadEvent("reload", (), 0)
    hub.publish_reload("reload-css", ("a.css",))
    assert hub.missed_since(1, "before") == ReloadEvent("reload", (), 1)
    assert hub.subscribe(1, "before").take() == [ReloadEvent("reload", (), 1)]
    assert hub.subscribe(1, "now").take() == []
    assert hub.page_state()["run"] == "now"
    assert Broadcaster().run != Broadcaster().run


# -- broadcaster: catch-up and per-subscriber merging --------------------------------------


def test_subscriber_merges_pending_state() -> None:
    sub = Subscriber()
    assert not sub.pending
    sub.offer_reload(ReloadEvent("reload-css", ("a.css",), 1))
    sub.offer_status(_events.StatusEvent("build_start", 1))
    sub.offer_reload(ReloadEvent("reload", ("i.html",), 2))
    sub.offer_status(_events.StatusEvent("build_ok", 2))
    assert sub.pending
    events = sub.take()
    assert events == [
        _events.StatusEvent("build_ok", 2),
        ReloadEvent("reload", ("a.css", "i.html"), 2),
    ]
    assert not sub.pending
    assert sub.take() == []


def test_broadcaster_catch_up() -> None:
    hub = Broadcaster()
    hub.publish_reload("reload-css", ("a.css",))
    hub.publish_reload("reload", ("b.html",))
    hub.publish_reload("reload-css", ("c.css",))
    assert hub.generation == 3
    assert hub.missed_since(3) is None
    assert hub.missed_since(2) == ReloadEvent("reload-css", ("c.css",), 3)
    assert hub.missed_since(1) == ReloadEvent("reload", ("b.html", "c.css"), 3)
    assert hub.missed_since(0) == ReloadEvent("reload", ("a.css", "b.html", "c.css"), 3)
    # From a previous server run: a full reload.
    assert hub.missed_since(9) == ReloadEvent("reload", (), 3)
    sub = hub.subscribe(1)
    assert sub.take() == [ReloadEvent("reload", ("b.html", "c.css"), 3)]
    assert hub.subscribe(None).take() == []
    hub.unsubscribe(sub)
    assert hub.subscriber_count == 1


def test_broadcaster_history_bound() -> None:
    hub = Broadcaster()
    for i in range(HISTORY + 10):
        hub.publish_reload("reload-css", (f"{i}.css",))
    # Older than the history: a full reload, never a silent miss.
    assert hub.missed_since(1) == ReloadEvent("reload", (), HISTORY + 10)
    covered = hub.missed_since(10)
    assert covered is not None and covered.action == "reload-css"


def test_broadcaster_status_on_subscribe() -> None:
    hub = Broadcaster()
    hub.publish_status("build_start", command="make")
    assert hub.building
    assert hub.page_state() == {"run": hub.run, "generation": 0, "building": True, "error": None}
    assert [e.kind for e in hub.subscribe(None).take()] == ["build_start"]  # type: ignore[union-attr]
    hub.publish_status("build_ok", command="make")
    assert hub.subscribe(None).take() == []  # fresh client, nothing to say
    assert len(hub.subscribe(0).take()) == 1  # a page may show a stale badge: tell it
    hub.publish_status("build_error", command="make", exit_status=1, output="x")
    state = hub.page_state()
    assert state["error"]["exit_status"] == 1 and not state["building"]


# -- injection ---------------------------------------------------------------------------


def test_inject_before_last_body_case_insensitive() -> None:
    html = b"<html><body><script>var s='</body>';</script><p>x</p></BODY >\n</html>"
    out = _inject.inject(html, {"generation": 4, "building": False, "error": None})
    tag = _inject.script_tag({"generation": 4, "building": False, "error": None})
    assert out.index(tag) == html.rindex(b"</BODY >")
    assert out.endswith(b"</BODY >\n</html>")
    assert out.count(b"</body>") == 1  # the one in the inline script, untouched


@pytest.mark.parametrize(
    "page",
    [
        b"<html><body><p>x</p></body></html>\n<!-- old footer: <p>f</p></body> -->\n",
        b"<html><body><p>x</p></body></html><!--</body>-->",
    ],
)
def test_inject_is_not_put_in_a_trailing_comment(page: bytes) -> None:
    """The last ``</body>`` was inside a comment after the real one (a commented-out old
    footer): the tag went into the comment and the page never connected (seen in
    Chromium). Such a page gets the tag at its end, after the comment, where a browser
    still runs it (in the body, as for a page without ``</body>``)."""
    out = _inject.inject(page, {"generation": 0})
    tag = _inject.script_tag({"generation": 0})
    assert out == page + tag


def test_inject_appends_without_body() -> None:
    out = _inject.inject(b"<p>fragment</p>", {"generation": 0})
    assert out.startswith(b'<p>fragment</p><script src="/__reload__.js"')
    assert out.endswith(b"</script>")


def test_inject_state_cannot_close_the_script() -> None:
    output = "</script><img src=x onerror=alert(1)> ' \" &amp; \u00e9"
    state = {"generation": 1, "error": {"output": output}}
    tag = _inject.script_tag(state)
    assert tag.isascii()
    text = tag.decode()
    assert text.count("</script>") == 1 and text.endswith("</script>")
    assert text.count("'") == 2 and "<" not in text[1:-9]  # only the tag's own
    # What the browser reads: the attribute, parsed by an HTML parser and by an XML parser.
    parser = _AttributeReader()
    parser.feed(text)
    assert json.loads(parser.state) == state
    element = xml.etree.ElementTree.fromstring(text)
    assert json.loads(element.attrib["data-state"]) == state
    assert element.attrib["src"] == _inject.SCRIPT_PATH


class _AttributeReader(html.parser.HTMLParser):
    state = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.state = dict(attrs).get("data-state") or ""


def test_inject_into_xhtml_only_before_body() -> None:
    page = b'<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><body/></html>'
    assert _inject.inject(page, {"generation": 0}, xml=True) == page  # nowhere well-formed
    page = page.replace(b"<body/>", b"<body><p>x</p></body>")
    out = _inject.inject(page, {"generation": 0, "error": {"output": "<&'>"}}, xml=True)
    root = xml.etree.ElementTree.fromstring(out)  # still well-formed
    script = root.find(".//{http://www.w3.org/1999/xhtml}body/{http://www.w3.org/1999/xhtml}script")
    assert (
        script is not None and json.loads(script.attrib["data-state"])["error"]["output"] == "<&'>"
    )


def test_pages_escape_the_path() -> None:
    assert b"&lt;script&gt;" in _pages.rebuilding_page("/<script>")
    assert b'http-equiv="refresh"' in _pages.rebuilding_page("/x")
    assert b"&lt;b&gt;" in _pages.not_found_page("/<b>")
    assert b"refresh" not in _pages.not_found_page("/x")


def test_build_output_tail() -> None:
    output = b"".join(b"line %d\n" % i for i in range(1000))
    text = tail(output, max_bytes=4096, max_lines=5)
    assert text.splitlines() == [f"line {i}" for i in range(995, 1000)]
    assert tail("é".encode() * 3, max_bytes=3) == "\ufffdé"


# -- snapshots and the reload decision ------------------------------------------------------


def test_snapshot_and_decide(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "index.html").write_text("a")
    (tmp_path / "sub" / "s.css").write_text("b")
    (tmp_path / ".hidden").write_text("c")
    first = _snapshot.take_snapshot(tmp_path)
    assert set(first) == {"index.html", "sub/s.css"}
    # Same bytes rewritten: mtime changes, the content does not: nothing to reload.
    st = (tmp_path / "index.html").stat()
    os.utime(tmp_path / "index.html", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = _snapshot.take_snapshot(tmp_path, first)
    assert _snapshot.decide(first, second) is None
    (tmp_path / "sub" / "s.css").write_text("bb")
    (tmp_path / "new.css").write_text("n")
    third = _snapshot.take_snapshot(tmp_path, second)
    assert _snapshot.decide(second, third) == ("reload-css", ("new.css", "sub/s.css"))
    (tmp_path / "index.html").write_text("changed")
    fourth = _snapshot.take_snapshot(tmp_path, third)
    assert _snapshot.decide(third, fourth) == ("reload", ("index.html",))
    (tmp_path / "new.css").unlink()
    fifth = _snapshot.take_snapshot(tmp_path, fourth)
    assert _snapshot.decide(fourth, fifth) == ("reload", ("new.css",))
    assert _snapshot.take_snapshot(tmp_path / "missing") == {}


def test_small_snapshot_equals_the_full_one_within_its_budget(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "index.html").write_text("a")
    (tmp_path / "sub" / "s.css").write_text("b")
    first = _snapshot.take_snapshot(tmp_path)
    assert _snapshot.small_snapshot(tmp_path) == first
    (tmp_path / "index.html").write_text("changed")
    assert _snapshot.small_snapshot(tmp_path, first) == _snapshot.take_snapshot(tmp_path, first)
    assert _snapshot.small_snapshot(tmp_path / "missing") == {}


def test_snapshots_skip_links_that_loop_or_lead_out_of_the_site(tmp_path: Path) -> None:
    """A symlink loop in the site (``loop1 -> loop2 -> loop1``) raised ELOOP out of the
    walk, and the dev app's loop took the whole server down with it (at start, or at the
    next change: ACP sessions and all). A link to a directory above (``self -> .``,
    ``up -> ..``) was walked again and again until the path was too long. What a snapshot
    holds is what the site serves: a link that leads out of it is not served, so it is
    not walked or read either; one that stays inside is (as the static server serves it)."""
    site = tmp_path / "site"
    outside = tmp_path / "outside"
    (site / "sub").mkdir(parents=True)
    outside.mkdir()
    (site / "index.html").write_text("a")
    (site / "sub" / "s.css").write_text("b")
    (outside / "secret.txt").write_text("s")
    (site / "loop1").symlink_to("loop2")
    (site / "loop2").symlink_to("loop1")
    (site / "self").symlink_to(".")
    (site / "sub" / "up").symlink_to("..")
    (site / "parent").symlink_to("..")
    (site / "out").symlink_to(outside)
    (site / "secret.txt").symlink_to(outside / "secret.txt")
    (site / "alias.css").symlink_to("sub/s.css")
    (site / "again").symlink_to("sub")
    os.mkfifo(site / "pipe")
    expected = {"index.html", "sub/s.css", "alias.css", "again/s.css"}
    assert set(_snapshot.take_snapshot(site)) == expected
    assert set(_snapshot.small_snapshot(site) or {}) == expected
    # The site named by a link (`./result`) is walked where it leads.
    (tmp_path / "result").symlink_to(site)
    assert set(_snapshot.take_snapshot(tmp_path / "result")) == expected


def test_small_snapshot_gives_up_past_its_budget(tmp_path: Path) -> None:
    for i in range(_snapshot.SMALL_ENTRIES + 1):
        (tmp_path / f"p{i}.html").write_text("x")
    assert _snapshot.small_snapshot(tmp_path) is None
    big = tmp_path / "big"
    big.mkdir()
    (big / "a.bin").write_bytes(b"x" * (_snapshot.SMALL_DIGEST_BYTES + 1))
    assert _snapshot.small_snapshot(big) is None
    # Unchanged files are not read again, so they do not count against the budget.
    before = _snapshot.take_snapshot(big)
    assert _snapshot.small_snapshot(big, before) == before


# -- ignore rules --------------------------------------------------------------------------


def test_ignore_rules(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    site = root / "_site"
    rules = _watch.IgnoreRules.build([root], ["*.log", "docs/generated"], [site])
    p = str(root.resolve())
    assert rules.ignored(f"{p}/_site/index.html")
    assert rules.ignored(f"{p}/_site")
    assert rules.ignored(f"{p}/.git/index")
    assert rules.ignored(f"{p}/a/node_modules/x.js")
    assert rules.ignored(f"{p}/src/__pycache__/m.pyc")
    assert rules.ignored(f"{p}/src/.page.md.swp")
    assert rules.ignored(f"{p}/build.log")
    assert rules.ignored(f"{p}/docs/generated/api.md")
    assert not rules.ignored(f"{p}/docs/index.md")
    assert not rules.ignored(f"{p}/_sitemap.md")
    assert not rules.ignored(f"{p}/src/page.md")
    # Build tools' caches and locks in the project: a build writing them started the next.
    for cache in (
        ".hugo_build.lock",
        ".jekyll-cache/Jekyll/Cache/x",
        ".jekyll-metadata",
        ".sass-cache/a/b.scssc",
        "_build/doctrees/environment.pickle",
        "docs/_build/doctrees/index.doctree",
        ".docusaurus/registry.js",
        ".parcel-cache/data.mdb",
        ".quarto/idx/x.json",
    ):
        assert rules.ignored(f"{p}/{cache}"), cache


def test_build_output_tail_is_what_a_terminal_shows() -> None:
    """Colour codes were shown as text in the overlay, and every ``\\r`` progress update
    counted as a line of its own, so the last 60 lines were mostly "progress N%" (found by a
    dev app audit)."""
    progress = b"".join(b"progress %d%%\r" % i for i in range(1, 201))
    output = (
        b"\x1b]0;window title\x07Compiling 1%\rCompiling 2%\r"
        + progress
        + b"ERROR: the real error\n\x1b[1;31mcolored\x1b[0m\n"
    )
    assert tail(output) == "ERROR: the real error\ncolored"
    # \r\n line ends, a progress line left without a newline, a reset after the \r,
    # backspaces, stray control characters.
    assert tail(b"one\r\nstep 1/3\rstep 3/3\r\x1b[0m\nspin|\x08/\x08-\x07\nend\x00 50%\r") == (
        "one\nstep 3/3\nspin-\nend 50%"
    )
    # Progress spam longer than the byte bound no longer pushes the lines before it out.
    spam = b"".join(b"\x1b[2K\rprogress %d%%" % i for i in range(100_000))
    assert tail(b"first line\n" + spam + b"\ndone\n") == "first line\nprogress 99999%\ndone"
    # Fed in small chunks (escape sequences and \r runs split anywhere): the same text.
    for size in (1, 3, 7):
        kept = OutputTail()
        for at in range(0, len(output), size):
            kept.feed(output[at : at + size])
        assert kept.text() == "ERROR: the real error\ncolored"


def test_ignore_patterns_are_paths_as_a_user_reads_them(tmp_path: Path) -> None:
    """``--watch src --ignore src/gen`` did not ignore ``src/gen/x`` (patterns were matched
    relative to each watched root only), nor did ``./src/gen`` or an absolute directory
    (found by a dev app audit). Now a pattern with a ``/`` is a path from the project root
    (and still from each watched root), ``./`` is dropped, and an absolute one is absolute."""
    root = tmp_path / "proj"
    (root / "src" / "gen").mkdir(parents=True)
    (root / "out").mkdir()
    dev = DevApp(
        site_dir=root / "out",
        project_root=root,
        closing=trio.Event(),
        build_cmd="make",
        watch=[root / "src", root / "conf.yml"],
        ignore=["src/gen", "./docs/api/", str(root / "vendor"), f"{root}/*.bak", "deep/*.tmp"],
    )
    rules = dev.ignore_rules()
    p = os.path.realpath(root)
    for ignored in (
        "src/gen",
        "src/gen/x",
        "docs/api/y.md",
        "vendor/lib/z.js",
        "old.bak",
        "src/deep/a.tmp",  # relative to the watched root, as before
        "out/index.html",
    ):
        assert rules.ignored(f"{p}/{ignored}"), ignored
    for counted in ("src/a.md", "src/generated/x", "vendorx/a", "conf.yml", "src/old.bak"):
        assert not rules.ignored(f"{p}/{counted}"), counted
