"""A site directory that is a symlink a build re-points (``nix build``'s ``./result``, a
``current -> releases/N``) is served from where it leads now; links *inside* it must still
stay inside that current target.

Found by a dev app audit: the link was resolved once at start, so the output of the start
stayed served for ever while reload events went out. Through a real Hypercorn (port 0); the
link is switched atomically (a new link renamed over the old), as ``nix build`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import trio
from devsupport import running, write

from punie_trio.cli import site_path
from punie_trio.web.dev import DevApp
from punie_trio.web.dev._watch import IgnoreRules

PLAIN = {"accept-encoding": "identity"}


def repoint(link: Path, target: Path) -> None:
    temporary = link.with_name(link.name + ".tmp")
    temporary.symlink_to(target)
    os.replace(temporary, link)


async def test_a_re_pointed_site_link_is_served_from_its_new_target(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write(store / "0" / "index.html", "<html><body>v0</body></html>")
    write(store / "0" / "shared.txt", "from the old output")
    write(store / "1" / "index.html", "<html><body>v1</body></html>")
    write(tmp_path / "outside.txt", "not part of any output")
    # In the new output, links that lead out of it: to the old output, and elsewhere.
    (store / "1" / "shared.txt").symlink_to(store / "0" / "shared.txt")
    (store / "1" / "outside.txt").symlink_to(tmp_path / "outside.txt")
    (store / "1" / "inner.txt").symlink_to(store / "1" / "index.html")  # stays inside
    site = tmp_path / "result"
    site.symlink_to(store / "0")
    dev = DevApp(site_dir=site, project_root=tmp_path, closing=trio.Event(), no_watch=True)
    async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
        assert "v0" in (await client.get("/")).text
        assert (await client.get("/shared.txt", headers=PLAIN)).text == "from the old output"
        repoint(site, store / "1")
        assert "v1" in (await client.get("/")).text
        # The file cached from the old output is the very inode the new link leads to, but
        # from the new output it leads out of the site: refused, not served from the cache.
        assert (await client.get("/shared.txt", headers=PLAIN)).status_code == 404
        assert (await client.get("/outside.txt", headers=PLAIN)).status_code == 404
        assert (await client.get("/inner.txt", headers=PLAIN)).status_code == 200
        repoint(site, store / "0")
        assert "v0" in (await client.get("/")).text


def test_site_flag_keeps_the_link_it_names(tmp_path: Path) -> None:
    """``--site result`` stays the link (its parents resolved), not the link's target."""
    (tmp_path / "store").mkdir()
    (tmp_path / "result").symlink_to(tmp_path / "store")
    assert site_path(tmp_path / "result") == tmp_path.resolve() / "result"
    assert site_path(tmp_path / "store" / "..") == tmp_path.resolve()


def test_a_site_link_is_ignored_by_its_name_too(tmp_path: Path) -> None:
    """With a build command the site is ignored; a link to it was ignored only where it led
    at start, so the build's re-pointing of the link (a change in the project) started
    another build."""
    (tmp_path / "store" / "0").mkdir(parents=True)
    link = tmp_path / "result"
    link.symlink_to(tmp_path / "store" / "0")
    rules = IgnoreRules.build([tmp_path], (), [link], project_root=tmp_path)
    assert rules.ignored(str(link))
    assert rules.ignored(str(tmp_path.resolve() / "store" / "0" / "index.html"))
    assert not rules.ignored(str(tmp_path.resolve() / "src" / "index.md"))
