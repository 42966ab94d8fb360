"""Static serving and the SSE endpoint through a real Hypercorn (trio worker) on port 0."""

from __future__ import annotations

import gzip
import logging
import xml.etree.ElementTree
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from devsupport import raw_get, running, sse, write

from punie_trio.web.dev import DevApp, _inject, _static

CSS = "body { color: red; }\n" * 100


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    write(site / "index.html", "<!doctype html><html><body><h1>home</h1></body></html>")
    # (Long enough to be gzipped: over GZIP_MIN once the script tag is in.)
    write(site / "docs" / "index.html", f"<html><BODY><p>docs</p>{'.' * 256}</Body></html>")
    write(site / "style.css", CSS)
    write(site / "data.bin", "".join(chr(65 + i % 26) for i in range(2000)))
    write(site / "frag.html", "<p>no body tag</p>")
    write(site / ".secret", "SECRET-CONTENT")
    write(site / "sub" / ".env", "SECRET-CONTENT")
    write(tmp_path / "outside.txt", "OUTSIDE-CONTENT")
    return site


def make_app(site: Path, **kwargs: object) -> DevApp:
    return DevApp(site_dir=site, project_root=site.parent, closing=trio.Event(), **kwargs)  # type: ignore[arg-type]


async def test_index_redirect_head_and_types(site: Path) -> None:
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.headers["cache-control"] == "no-store"
        assert b"<h1>home</h1>" in r.content and b"data-punie-reload" in r.content
        r = await client.get("/docs/")
        assert r.status_code == 200 and b"<p>docs</p>" in r.content
        r = await client.get("/docs?x=1")
        assert r.status_code == 301 and r.headers["location"] == "/docs/?x=1"
        # A leading // made the Location another host's (//docs/); found by an audit.
        assert await _location(url, "//docs") == "/docs/"
        r = await client.get("/style.css", headers={"accept-encoding": "identity"})
        assert r.headers["content-type"] == "text/css; charset=utf-8"
        assert r.headers["cache-control"] == "no-cache"
        assert r.text == CSS
        h = await client.head("/style.css", headers={"accept-encoding": "identity"})
        assert h.status_code == 200 and h.content == b""
        assert h.headers["content-length"] == str(len(CSS))
        assert h.headers["etag"] == r.headers["etag"]
        r = await client.post("/")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
        # The reason names the methods, as the server's own routes' 405 does (it said
        # only "method not allowed").
        assert r.text == "Method Not Allowed: use GET, HEAD\n"
        assert r.headers["x-content-type-options"] == "nosniff"
        r = await client.post("/__reload__")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
        assert r.text == "Method Not Allowed: use GET, HEAD\n"


async def _location(base_url: str, target: str) -> str:
    """The Location of the answer to ``GET target``, sent byte for byte."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    assert head[0].split(" ")[1] == "301", head
    return next(
        line.split(":", 1)[1].strip() for line in head if line.lower().startswith("location:")
    )


async def test_conditional_requests(site: Path) -> None:
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        plain = {"accept-encoding": "identity"}
        r = await client.get("/style.css", headers=plain)
        etag, last_modified = r.headers["etag"], r.headers["last-modified"]
        r = await client.get("/style.css", headers={**plain, "if-none-match": etag})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
        r = await client.get("/style.css", headers={**plain, "if-none-match": '"stale"'})
        assert r.status_code == 200 and r.text == CSS
        r = await client.get("/style.css", headers={**plain, "if-modified-since": last_modified})
        assert r.status_code == 304
        old = "Mon, 01 Jan 2001 00:00:00 GMT"
        r = await client.get("/style.css", headers={**plain, "if-modified-since": old})
        assert r.status_code == 200
        # HTML embeds the generation: a new generation is a new ETag.
        page = await client.get("/")
        r = await client.get("/", headers={"if-none-match": page.headers["etag"]})
        assert r.status_code == 304
        dev.broadcaster.publish_reload("reload", ("index.html",))
        r = await client.get("/", headers={"if-none-match": page.headers["etag"]})
        assert r.status_code == 200 and b'"generation":1' in r.content
        # A page has no date to revalidate by: its file's said "not modified" of a page
        # whose embedded state had changed (found by an audit).
        assert "last-modified" not in page.headers
        future = "Fri, 01 Jan 2100 00:00:00 GMT"
        r = await client.get("/", headers={"if-modified-since": future})
        assert r.status_code == 200 and b'"generation":1' in r.content


async def test_ranges(site: Path) -> None:
    dev = make_app(site, no_watch=True)
    data = (site / "data.bin").read_bytes()
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/data.bin", headers={"range": "bytes=10-19"})
        assert r.status_code == 206
        assert r.content == data[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
        assert r.headers["content-length"] == "10"
        r = await client.get("/data.bin", headers={"range": "bytes=-5"})
        assert r.status_code == 206 and r.content == data[-5:]
        r = await client.get("/data.bin", headers={"range": f"bytes={len(data)}-"})
        assert r.status_code == 416
        assert r.headers["content-range"] == f"bytes */{len(data)}"
        r = await client.get("/data.bin", headers={"range": "bytes=0-0", "if-range": '"old"'})
        assert r.status_code == 200 and r.content == data
        css = await client.get(
            "/style.css", headers={"range": "bytes=0-3", "accept-encoding": "gzip"}
        )
        assert css.status_code == 206 and css.content == CSS[:4].encode()
        assert "content-encoding" not in css.headers


@pytest.mark.parametrize(
    ("name", "headers"),
    [
        ("big.bin", {}),  # streamed from the file
        ("big.bin", {"range": "bytes=10-19"}),  # a range read
        ("big.txt", {"accept-encoding": "gzip"}),  # compressed from the file
        ("big.html", {}),  # a page read to inject the script
    ],
)
async def test_a_large_file_deleted_right_after_its_lookup_is_404(
    site: Path, monkeypatch: pytest.MonkeyPatch, name: str, headers: dict[str, str]
) -> None:
    """A build that empties its output first (Vite's ``emptyOutDir``, Hugo's
    ``--cleanDestinationDir``) can delete a file between the lookup that found it and the
    read of a file too large for the lookup to have read: the open raised out of the app,
    a 500 and "Error in ASGI Framework" with a traceback. It is missing now: a 404."""
    big = "x" * (2 * 1024 * 1024)
    write(site / "big.bin", big)
    write(site / "big.txt", big)
    write(site / "big.html", f"<html><body>{big}</body></html>")
    real = _static.lookup

    def then_deleted(*args: Any, **kwargs: Any) -> _static.Lookup:
        found = real(*args, **kwargs)
        if found.kind == "file" and found.path.endswith(name):
            Path(found.path).unlink()
        return found

    monkeypatch.setattr(_static, "lookup", then_deleted)
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get(f"/{name}", headers=headers)
        assert r.status_code == 404
        assert (await client.get("/style.css")).status_code == 200


async def test_gzip_but_never_for_event_stream(site: Path) -> None:
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/style.css", headers={"accept-encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
        assert r.headers["vary"] == "accept-encoding"
        assert r.text == CSS  # httpx decodes
        assert int(r.headers["content-length"]) == len(gzip.compress(CSS.encode(), mtime=0))
        plain = await client.get("/style.css", headers={"accept-encoding": "identity"})
        assert plain.headers["etag"] != r.headers["etag"]
        bin_ = await client.get("/data.bin", headers={"accept-encoding": "gzip"})
        assert "content-encoding" not in bin_.headers
        async with sse(client, "/__reload__", {"accept-encoding": "gzip"}) as stream:
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            assert "content-encoding" not in stream.response.headers
            dev.broadcaster.publish_reload("reload", ("x.html",))
            event = await stream.next_named("reload")
            assert event.json()["generation"] == 1


async def test_pages_are_sent_in_the_charset_they_declare(site: Path) -> None:
    latin1 = '<html><head><meta charset="iso-8859-1"></head><body>Caf\xe9 cr\xe8me</body></html>'
    (site / "latin1.html").write_bytes(latin1.encode("latin-1"))
    (site / "utf16.html").write_bytes("\ufeff<html><body>Caf\xe9</body></html>".encode("utf-16le"))
    big = b"\xff\xfe" + b"x\x00" * (1024 * 1024)  # past the cache: sniffed on its own
    (site / "big.txt").write_bytes(big)
    (site / "404.html").write_bytes(latin1.replace("Caf", "Missing caf").encode("latin-1"))
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        for accept in ("identity", "gzip"):
            r = await client.get("/latin1.html", headers={"accept-encoding": accept})
            assert r.headers["content-type"] == "text/html; charset=iso-8859-1"
            assert "Caf\xe9 cr\xe8me<script" in r.text  # httpx decodes by the header
        r = await client.get("/utf16.html")
        assert r.headers["content-type"] == "text/html; charset=utf-16le"
        assert r.content.startswith(b"\xff\xfe")
        assert 'Caf\xe9<script src="/__reload__.js"' in r.text and r.text.endswith("</body></html>")
        r = await client.head("/big.txt")
        assert r.headers["content-type"] == "text/plain; charset=utf-16le"
        r = await client.get("/nope.html")
        assert r.status_code == 404
        assert r.headers["content-type"] == "text/html; charset=iso-8859-1"
        assert "Missing caf\xe9 cr\xe8me<script" in r.text


async def test_the_script_is_an_external_same_origin_file(site: Path) -> None:
    """Inline, it was blocked by a page's CSP ``script-src 'self'`` (found by an audit)."""
    xhtml = (
        '<?xml version="1.0"?>\n<html xmlns="http://www.w3.org/1999/xhtml"><body><p/></body></html>'
    )
    write(site / "page.xhtml", xhtml)
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        page = (await client.get("/")).text
        assert "<script" in page and page.count("<script") == 1
        assert '<script src="/__reload__.js" data-punie-reload=""' in page
        r = await client.get("/__reload__.js", headers={"accept-encoding": "identity"})
        assert r.status_code == 200 and r.content == _inject.SCRIPT_BYTES
        assert r.headers["content-type"] == "text/javascript; charset=utf-8"
        assert r.headers["cache-control"] == "no-cache"
        again = await client.get(
            "/__reload__.js",
            headers={"if-none-match": r.headers["etag"], "accept-encoding": "identity"},
        )
        assert again.status_code == 304 and again.content == b""
        gz = await client.get("/__reload__.js", headers={"accept-encoding": "gzip"})
        assert gz.headers["content-encoding"] == "gzip" and gz.content == _inject.SCRIPT_BYTES
        assert gz.headers["etag"] != r.headers["etag"]
        head = await client.head("/__reload__.js", headers={"accept-encoding": "identity"})
        assert head.content == b"" and head.headers["content-length"] == str(len(r.content))
        assert (await client.post("/__reload__.js")).status_code == 405
        # XHTML gets it too, before </body>, and stays well-formed XML.
        r = await client.get("/page.xhtml")
        assert r.headers["content-type"] == "application/xhtml+xml; charset=utf-8"
        assert r.headers["cache-control"] == "no-store"
        root = xml.etree.ElementTree.fromstring(r.content)
        ns = "{http://www.w3.org/1999/xhtml}"
        assert root.find(f"{ns}body/{ns}script") is not None


async def test_precompressed_files_are_sent_as_they_are(site: Path) -> None:
    script = gzip.compress(b"console.log('hi');\n" * 50, mtime=0)
    (site / "bundle.js.gz").write_bytes(script)
    (site / "app.wasm.br").write_bytes(b"\x1b\x03\x00\xf8\xa5\x40\x02\x80" * 64)
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/bundle.js.gz", headers={"accept-encoding": "gzip, br"})
        assert r.headers["content-type"] == "application/gzip"
        assert "content-encoding" not in r.headers and "vary" not in r.headers
        assert r.content == script  # not compressed again, not decoded
        r = await client.get("/app.wasm.br", headers={"accept-encoding": "gzip, br"})
        assert r.headers["content-type"] == "application/octet-stream"
        assert "content-encoding" not in r.headers
        assert r.content == (site / "app.wasm.br").read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/../outside.txt",
        "/%2e%2e/outside.txt",
        "/docs/%2E%2E/%2e%2e/outside.txt",
        "/.secret",
        "/sub/.env",
        "/%2esecret",
        "/docs/..%2f..%2foutside.txt",
    ],
)
async def test_traversal_and_hidden_files_refused(site: Path, path: str) -> None:
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        # httpx would normalise dot segments; send the raw target.
        status, body = await raw_get(url, path)
        assert status == 404, path
        assert b"SECRET-CONTENT" not in body and b"OUTSIDE-CONTENT" not in body
        # The same file is served under its own name: the refusal is the path, not the file.
        assert (await client.get("/docs/")).status_code == 200


async def test_symlink_out_of_site_refused(site: Path) -> None:
    (site.parent / "outside.txt").write_text("OUTSIDE-CONTENT")
    (site / "link.txt").symlink_to(site.parent / "outside.txt")
    # A directory's index.html that leads out was served for "dir/" and "/" (a review),
    # though refused by its own name: the index is resolved and checked too.
    (site / "index.html").unlink(missing_ok=True)
    (site / "index.html").symlink_to(site.parent / "outside.txt")
    (site / "leaky").mkdir()
    (site / "leaky" / "index.html").symlink_to(site.parent / "outside.txt")
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        for path in ("/link.txt", "/leaky/index.html", "/leaky/", "/"):
            r = await client.get(path)
            assert r.status_code == 404, path
            assert b"OUTSIDE-CONTENT" not in r.content, path


async def test_404_pages(site: Path) -> None:
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/nope.html")
        assert r.status_code == 404
        assert b"404 Not Found" in r.content and b"data-punie-reload" in r.content
        assert b"refresh" not in r.content  # no build runs: no rebuilding page, no loop
        write(site / "404.html", "<html><body><h1>custom missing</h1></body></html>")
        r = await client.get("/nope.html")
        assert r.status_code == 404
        assert b"custom missing" in r.content
        assert r.content.index(b"data-punie-reload") < r.content.index(b"</body>")
        assert int(r.headers["content-length"]) == len(r.content)


async def test_injection_and_content_length(site: Path) -> None:
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/docs/", headers={"accept-encoding": "identity"})
        assert int(r.headers["content-length"]) == len(r.content)
        assert r.content.index(b'<script src="/__reload__.js"') < r.content.index(b"</Body>")
        assert r.content.endswith(b"</Body></html>")
        r = await client.get("/frag.html", headers={"accept-encoding": "identity"})
        assert r.content.startswith(b'<p>no body tag</p><script src="/__reload__.js"')
        assert r.content.endswith(b"</script>")
        assert int(r.headers["content-length"]) == len(r.content)
        plain = await client.get("/docs/", headers={"accept-encoding": "identity"})
        gz = await client.get("/docs/", headers={"accept-encoding": "gzip"})
        assert gz.headers["content-encoding"] == "gzip"
        assert gz.content == plain.content


async def test_rebuilding_page_only_while_building(site: Path) -> None:
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        dev.broadcaster.publish_status("build_start", command="make")
        r = await client.get("/new/<page>", headers={"accept": "text/html"})
        assert r.status_code == 503
        assert b"&lt;page&gt;" in r.content and b"<page>" not in r.content
        assert b'http-equiv="refresh"' in r.content and b'"pending":true' in r.content
        asset = await client.get("/missing.png")
        assert asset.status_code == 404
        page = await client.get("/")
        assert b'"building":true' in page.content
        dev.broadcaster.publish_status("build_ok", command="make")
        r = await client.get("/new/page", headers={"accept": "text/html"})
        assert r.status_code == 404 and b"refresh" not in r.content


async def test_sse_format_and_last_event_id(site: Path) -> None:
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        async with sse(client, "/__reload__") as stream:
            assert stream.response.headers["cache-control"] == "no-cache"
            dev.broadcaster.publish_reload("reload-css", ("a.css",))
            event = await stream.next()
            assert stream.retry == 1000 and stream.comments  # retry and an opening comment
            assert (event.event, event.id) == ("reload", f"{dev.broadcaster.run}.1")
            assert event.json() == {"action": "reload-css", "paths": ["a.css"], "generation": 1}
        # While the tab was away: two more changes. It reconnects with Last-Event-ID.
        dev.broadcaster.publish_reload("reload", ("index.html",))
        dev.broadcaster.publish_reload("reload-css", ("b.css",))
        headers = {"last-event-id": f"{dev.broadcaster.run}.1"}
        async with sse(client, "/__reload__", headers) as stream:
            event = await stream.next()
            assert event.id == f"{dev.broadcaster.run}.3"
            assert event.json() == {
                "action": "reload",
                "paths": ["b.css", "index.html"],
                "generation": 3,
            }
        async with sse(client, f"/__reload__?since={dev.broadcaster.run}.2") as stream:
            event = await stream.next()
            assert event.json() == {"action": "reload-css", "paths": ["b.css"], "generation": 3}


async def test_head_on_the_reload_stream_answers_its_headers_without_a_stream(
    site: Path,
) -> None:
    """HEAD is allowed wherever GET is (RFC 9110 9.3.2); ``/__reload__`` answered it 405
    (``Allow: GET``). It gets the stream's status and header fields now, and no body, and
    no stream is registered for it: the connection goes on to its next request."""
    dev = make_app(site, no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        head = await client.head("/__reload__")
        assert head.status_code == 200 and head.content == b""
        assert dev.broadcaster.subscriber_count == 0
        # A GET pipelined behind it on one connection: its answer follows the HEAD's
        # header block at once (nothing of a body, no stream, came between).
        host, port = url.removeprefix("http://").rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as raw:
            await raw.send_all(
                f"HEAD /__reload__ HTTP/1.1\r\nHost: {host}\r\n\r\n"
                f"GET /style.css HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := await raw.receive_some(65536):
                data += chunk
        first, _, rest = data.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in first, first
        assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(CSS.encode()), rest[:200]
        assert dev.broadcaster.subscriber_count == 0
        async with sse(client, "/__reload__") as stream:  # (the GET it stands for)
            assert stream.response.status_code == 200
            for name in ("content-type", "cache-control", "x-accel-buffering"):
                assert head.headers[name] == stream.response.headers[name], name
        r = await client.post("/__reload__")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


async def test_a_page_from_another_server_run_is_reloaded(site: Path) -> None:
    """Generations restart at 0 each run: a tab left open across a restart had the new run's
    generation and was never reloaded (found by a dev app audit). The run id tells them apart."""
    first = make_app(site, no_watch=True)
    async with running(first) as url, httpx.AsyncClient(base_url=url) as client:
        page = (await client.get("/")).text
    old_run = first.broadcaster.run
    assert f"{old_run}" in page
    (site / "index.html").write_text("<html><body>edited while the server was down</body></html>")
    second = make_app(site, no_watch=True)
    assert second.broadcaster.run != old_run and second.broadcaster.generation == 0
    async with running(second) as url, httpx.AsyncClient(base_url=url) as client:
        for how in ("?since=" + old_run + ".0", "?since=" + old_run + ".7"):
            async with sse(client, "/__reload__" + how) as stream:
                event = await stream.next()
                assert (event.event, event.json()["action"]) == ("reload", "reload"), how
                assert event.id == f"{second.broadcaster.run}.0"
        async with sse(client, "/__reload__", {"last-event-id": f"{old_run}.0"}) as stream:
            assert (await stream.next()).json()["action"] == "reload"
        # A bare generation names no run (an older server's id, or a client that read only
        # the page's generation): it cannot be told to be this run's, so it is reloaded.
        async with sse(client, "/__reload__?since=0") as stream:
            assert (await stream.next()).json() == {
                "action": "reload",
                "paths": [],
                "generation": 0,
            }
        # This run's own page at this generation is up to date: nothing but what comes next.
        async with sse(client, f"/__reload__?since={second.broadcaster.run}.0") as stream:
            await stream.wait_open()
            second.broadcaster.publish_reload("reload-css", ("a.css",))
            assert (await stream.next()).json()["action"] == "reload-css"


async def test_disconnect_and_shutdown_end_streams(site: Path) -> None:
    dev = make_app(site, no_watch=True)
    with trio.fail_after(10):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            async with sse(client, "/__reload__") as stream:
                await stream.wait_open()
                assert dev.broadcaster.subscriber_count == 1
            # The disconnect watcher cleans up (polled state, no margin).
            while dev.broadcaster.subscriber_count:  # noqa: ASYNC110
                await trio.sleep(0.01)
            async with sse(client, "/__reload__") as stream:
                await stream.wait_open()
                dev.closing.set()
                event = await stream.next_named("shutdown")
                assert event.json() == {"generation": 0}
                with pytest.raises(EOFError):
                    await stream.next()
    assert dev.broadcaster.subscriber_count == 0


async def test_access_log(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    dev = make_app(site, no_watch=True, access_log=True)
    with caplog.at_level(logging.INFO, logger="punie_trio.access"):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            await client.get("/style.css")
            async with sse(client, "/__reload__") as stream:
                dev.broadcaster.publish_reload("reload", ())
                await stream.next()
    lines = [r.getMessage() for r in caplog.records if r.name == "punie_trio.access"]
    assert len(lines) == 1
    assert '"GET /style.css" 200' in lines[0]


async def test_access_log_quiet_by_default(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    dev = make_app(site, no_watch=True)
    with caplog.at_level(logging.INFO, logger="punie_trio.access"):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            await client.get("/")
    assert not [r for r in caplog.records if r.name == "punie_trio.access"]
