"""The static file cache: hits take no thread hop, and a changed file is never served stale.

End to end through a real Hypercorn (port 0) where the behaviour is HTTP; ``StaticSite.find``
directly for the bounds. Changes are made deterministic with ``os.utime`` (an explicit new
mtime) or a rename (a new inode), never by sleeping until the clock ticks.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import httpx
import pytest
import trio
from devsupport import running, write

from punie_trio.web.dev import DevApp, _static
from punie_trio.web.dev._static import StaticSite

PLAIN = {"accept-encoding": "identity"}


def make_app(site: Path) -> DevApp:
    return DevApp(site_dir=site, project_root=site.parent, closing=trio.Event(), no_watch=True)


def bump_mtime(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


async def test_hit_takes_no_thread_hop_and_changes_are_seen(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write(site / "style.css", "a { color: red; }\n")
    write(site / "index.html", "<html><body><p>v1</p></body></html>")
    dev = make_app(site)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        first = await client.get("/style.css", headers=PLAIN)
        misses = dev.static.misses
        assert dev.static.cached == 1
        again = await client.get("/style.css", headers=PLAIN)
        assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
        assert dev.static.misses == misses  # served from the cache: no lookup hop

        # Same size, new content, new mtime: a miss, the new bytes, a new validator.
        write(site / "style.css", "a { color: blu; }\n")
        bump_mtime(site / "style.css")
        changed = await client.get("/style.css", headers=PLAIN)
        assert changed.text == "a { color: blu; }\n"
        assert changed.headers["etag"] != first.headers["etag"]
        assert dev.static.misses == misses + 1

        # Replaced by a rename with the same size and mtime: a new inode is a new file.
        st = (site / "style.css").stat()
        write(tmp_path / "next.css", "a { color: grn; }\n")
        os.utime(tmp_path / "next.css", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp_path / "next.css", site / "style.css")
        assert (await client.get("/style.css", headers=PLAIN)).text == "a { color: grn; }\n"

        # Pages: the cached bytes, injected for the current page state.
        page = await client.get("/")
        assert b"<p>v1</p>" in page.content and b'"generation":0' in page.content
        dev.broadcaster.publish_reload("reload", ("index.html",))
        page = await client.get("/")
        assert b'"generation":1' in page.content
        write(site / "index.html", "<html><body><p>v2</p></body></html>")
        bump_mtime(site / "index.html")
        page = await client.get("/")
        assert b"<p>v2</p>" in page.content and b'"generation":1' in page.content

        # Deleted: 404, and the entry is gone.
        (site / "style.css").unlink()
        assert (await client.get("/style.css")).status_code == 404
        assert dev.static.cached == 1  # only the page is left


async def test_gzip_variant_follows_the_file(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write(site / "app.js", "console.log('one');\n" * 40)
    dev = make_app(site)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        gz = {"accept-encoding": "gzip"}
        r = await client.get("/app.js", headers=gz)
        assert r.headers["content-encoding"] == "gzip"
        raw = await client.get("/app.js", headers=gz)  # the memoised gzip body
        assert raw.text == "console.log('one');\n" * 40
        assert int(raw.headers["content-length"]) == len(
            gzip.compress(("console.log('one');\n" * 40).encode(), compresslevel=6, mtime=0)
        )
        write(site / "app.js", "console.log('two');\n" * 40)
        bump_mtime(site / "app.js")
        r = await client.get("/app.js", headers=gz)
        assert r.text == "console.log('two');\n" * 40
        assert r.headers["etag"] != raw.headers["etag"]


async def test_retargeted_symlink_is_checked_again(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write(site / "real.txt", "INSIDE")
    write(tmp_path / "outside.txt", "OUTSIDE")
    (site / "link.txt").symlink_to(site / "real.txt")
    dev = make_app(site)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/link.txt")).text == "INSIDE"
        assert dev.static.cached == 1
        (site / "link.txt").unlink()
        (site / "link.txt").symlink_to(tmp_path / "outside.txt")
        r = await client.get("/link.txt")
        assert r.status_code == 404 and b"OUTSIDE" not in r.content


async def test_large_files_are_not_cached_and_still_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_static, "CACHE_FILE_LIMIT", 1000)
    site = tmp_path / "site"
    data = bytes(range(256)) * 8  # 2048 bytes
    (site).mkdir()
    (site / "data.bin").write_bytes(data)
    dev = make_app(site)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/data.bin")).content == data
        r = await client.get("/data.bin", headers={"range": "bytes=1000-1009"})
        assert r.status_code == 206 and r.content == data[1000:1010]
        assert dev.static.cached == 0


async def test_cache_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_static, "CACHE_ENTRIES", 2)
    monkeypatch.setattr(_static, "CACHE_BYTES", 250)
    for name in "abcd":
        write(tmp_path / f"{name}.txt", name * 100)
    static = StaticSite(tmp_path)
    for name in "abc":
        found = await static.find(f"/{name}.txt")
        assert found.body == name.encode() * 100
    assert static.cached == 2 and static.cached_bytes == 200  # entry bound, oldest dropped
    misses = static.misses
    await static.find("/c.txt")
    await static.find("/b.txt")
    assert static.misses == misses  # both still cached
    await static.find("/a.txt")  # evicted earlier: a miss, and it evicts the LRU (c)
    assert static.misses == misses + 1
    await static.find("/b.txt")
    assert static.misses == misses + 1
    monkeypatch.setattr(_static, "CACHE_BYTES", 150)
    await static.find("/d.txt")  # over the byte bound: only the newest stays
    assert static.cached == 1 and static.cached_bytes == 100
