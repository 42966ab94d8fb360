"""Watch -> debounce -> build -> reload, end to end: real files, real builds, real Hypercorn.

No test sleeps for a guessed time: each waits for the SSE event that proves the step happened
(``trio.fail_after`` is only a safety net).
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from devsupport import BuildProject, process_running, running, sse, write

from punie_trio.web.dev import DevApp, _inotify, open_browser_when_ready

DEADLINE = 30


async def test_no_build_command_site_change_reloads(tmp_path: Path) -> None:
    site = tmp_path / "proj" / "public"
    write(site / "index.html", "<html><body>v1</body></html>")
    write(site / "style.css", "a{}")
    dev = DevApp(site_dir=site, project_root=tmp_path / "proj", closing=trio.Event(), debounce=0.02)
    with trio.fail_after(DEADLINE):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            async with sse(client, "/__reload__") as stream:
                await stream.wait_open()
                write(site / "index.html", "<html><body>v2</body></html>")
                event = (await stream.next_named("reload")).json()
                assert event == {"action": "reload", "paths": ["index.html"], "generation": 1}
                write(site / "style.css", "a{color:red}")
                event = (await stream.next_named("reload")).json()
                assert event == {"action": "reload-css", "paths": ["style.css"], "generation": 2}
                # A change outside the output triggers nothing (the next event is ours).
                write(tmp_path / "proj" / "notes.txt", "x")
                write(site / "index.html", "<html><body>v3</body></html>")
                event = (await stream.next_named("reload")).json()
                assert event["generation"] == 3 and event["paths"] == ["index.html"]
            page = await client.get("/")
            assert b"v3" in page.content and b'"generation":3' in page.content


async def test_a_symlink_loop_in_the_site_does_not_stop_the_server(tmp_path: Path) -> None:
    """``ln -s loop2 loop1; ln -s loop1 loop2`` in the output: the snapshot after that change
    raised ELOOP, and the dev app's loop took the whole server down (also at start, when the
    loop was there already). Now the links are not part of the output, and the next change
    is reloaded as ever."""
    site = tmp_path / "proj" / "public"
    write(site / "index.html", "<html><body>v1</body></html>")
    (site / "loop1").symlink_to("loop2")
    (site / "loop2").symlink_to("loop1")
    dev = DevApp(site_dir=site, project_root=tmp_path / "proj", closing=trio.Event(), debounce=0.02)
    with trio.fail_after(DEADLINE):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            async with sse(client, "/__reload__") as stream:
                await stream.wait_open()
                (site / "loop3").symlink_to("loop4")
                (site / "loop4").symlink_to("loop3")
                (site / "self").symlink_to(".")
                write(site / "index.html", "<html><body>v2</body></html>")
                event = (await stream.next_named("reload")).json()
                assert event["paths"] == ["index.html"]
            assert b"v2" in (await client.get("/")).content
            assert (await client.get("/loop1")).status_code == 404


async def test_build_reload_css_and_error(tmp_path: Path) -> None:
    project = BuildProject.create(tmp_path)
    dev = project.dev_app(debounce=0.02)
    with trio.fail_after(DEADLINE):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            assert project.builds() == 1  # the initial build ran before started
            assert b"v1" in (await client.get("/")).content
            async with sse(client, "/__reload__") as stream:
                await stream.wait_open()
                # Held at the gate, the build outlasts build_start_delay: it is announced.
                project.gate.unlink()
                write(project.root / "src" / "index.html", "<html><body><h1>v2</h1></body></html>")
                assert (await stream.next()).event == "build_start"
                project.gate.touch()
                ok = await stream.next()
                assert ok.event == "build_ok" and ok.json()["command"] == project.command()
                reload = (await stream.next()).json()
                assert reload == {"action": "reload", "paths": ["index.html"], "generation": 2}
                assert b"v2" in (await client.get("/")).content

                write(project.root / "src" / "style.css", "h1 { color: blue; }")
                event = (await stream.next_named("reload")).json()
                assert event["action"] == "reload-css" and event["paths"] == ["style.css"]

                # A failing build: error event with details; the old output stays served.
                write(project.root / "src" / "fail", "")
                error = await stream.next_named("build_error")
                details = error.json()
                assert details["exit_status"] == 3
                assert details["command"] == project.command()
                assert "<b>boom</b> the build failed" in details["output"]
                page = await client.get("/")
                assert page.status_code == 200 and b"v2" in page.content
                assert b'"exit_status":3' in page.content  # a new tab shows the overlay too

            # A tab opened during the failure still learns about it on connect.
            async with sse(client, "/__reload__") as late:
                assert (await late.next()).event == "build_error"

            async with sse(client, f"/__reload__?since={dev.broadcaster.run}.3") as stream:
                assert (await stream.next()).event == "build_error"
                (project.root / "src" / "fail").unlink()
                # The fix produced the same output as before: build_ok clears the overlay,
                # and there is no reload.
                assert (await stream.next_named("build_ok")).json()["generation"] == 3
            assert b'"error":null' in (await client.get("/")).content


async def test_a_build_that_cannot_be_started_is_a_failed_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of file descriptors (a flood of connections: the accept loop is documented to
    survive it), the build's pipe could not be made: ``OSError: [Errno 24] Too many open
    files`` left the build loop and took the whole server down, ACP sessions and all. It
    is a failed build now, shown in the overlay, and the next change builds again."""
    from punie_trio.web.dev import _builder

    project = BuildProject.create(tmp_path)
    dev = project.dev_app(debounce=0.02)
    real = _builder._spawn_listed
    refuse = True

    async def out_of_descriptors(*args: Any, **kwargs: Any) -> Any:
        if refuse:  # (as its pipe, or the fork, fails then)
            raise OSError(errno.EMFILE, "Too many open files")
        return await real(*args, **kwargs)

    with trio.fail_after(DEADLINE):
        async with (
            running(dev) as url,
            httpx.AsyncClient(base_url=url) as client,
            sse(client, "/__reload__") as stream,
        ):
            await stream.wait_open()
            monkeypatch.setattr(_builder, "_spawn_listed", out_of_descriptors)
            write(project.root / "src" / "index.html", "<html><body><h1>v2</h1></body></html>")
            error = (await stream.next_named("build_error")).json()
            assert error["exit_status"] == 126
            assert "could not be started" in error["output"]
            assert "Too many open files" in error["output"]
            assert b"v1" in (await client.get("/")).content  # the last good output
            refuse = False
            write(project.root / "src" / "index.html", "<html><body><h1>v3</h1></body></html>")
            await stream.next_named("build_ok")
            assert b"v3" in (await client.get("/")).content


async def test_changes_during_a_build_make_one_follow_up(tmp_path: Path) -> None:
    project = BuildProject.create(tmp_path)
    dev = project.dev_app(debounce=0.02)
    with trio.fail_after(DEADLINE):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            async with sse(client, "/__reload__") as stream:
                await stream.wait_open()
                project.gate.unlink()  # the next build waits at the gate
                write(project.root / "src" / "a.html", "a")
                assert (await stream.next()).event == "build_start"
                # While it runs: a missing page gets the rebuilding page, pages the badge.
                r = await client.get("/later.html")
                assert r.status_code == 503 and b'"pending":true' in r.content
                assert b'"building":true' in (await client.get("/")).content
                for name in "bcd":
                    write(project.root / "src" / f"{name}.html", name)
                wanted = {"b.html", "c.html", "d.html"}
                # Polls observed state (the watcher saw them), no guessed margin.
                while not wanted <= {Path(p).name for p in dev.pending.paths}:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                project.gate.touch()
                # Status is state (a newer one replaces one not yet written); reloads are
                # never dropped (merged at worst). Read until a reload arrived and the
                # follow-up finished (its build_ok is the last event: its output equals the
                # one before, so it reloads nothing).
                seen = []
                while not (
                    any(e.event == "reload" for e in seen)
                    and dev.loop.builds == 3
                    and not dev.broadcaster.building
                ):
                    seen.append(await stream.next())
                reloads = [e.json() for e in seen if e.event == "reload"]
                assert reloads and "a.html" in reloads[0]["paths"]
                assert reloads[0]["action"] == "reload"
                assert not dev.pending
                assert not dev.broadcaster.building
            assert project.builds() == 3  # initial, the change, exactly one follow-up
            assert dev.loop.builds == 3
            assert (await client.get("/later.html")).status_code == 404


async def test_no_watch_builds_once(tmp_path: Path) -> None:
    project = BuildProject.create(tmp_path)
    dev = project.dev_app(no_watch=True)
    with trio.fail_after(DEADLINE):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            assert project.builds() == 1
            assert (await client.get("/style.css")).status_code == 200
            assert dev.broadcaster.generation == 1  # the initial build produced the output


async def test_open_browser_when_ready(tmp_path: Path) -> None:
    write(tmp_path / "site" / "index.html", "<html><body>x</body></html>")
    dev = DevApp(
        site_dir=tmp_path / "site", project_root=tmp_path, closing=trio.Event(), no_watch=True
    )
    opened: list[str] = []
    with trio.fail_after(DEADLINE):
        async with running(dev) as url:
            await open_browser_when_ready(url + "/", opener=opened.append)
    assert opened == [url + "/"]
    # Nobody listening: gives up without opening.
    await open_browser_when_ready(url + "/", give_up_after=0.3, opener=opened.append)
    assert opened == [url + "/"]


async def test_build_leftovers_are_stopped_by_the_next_build_and_at_shutdown(
    tmp_path: Path,
) -> None:
    """A build script ending with ``sleep 600 &`` (a helper daemon): the build never
    finished (badge stuck, later edits built nothing) and the child outlived SIGTERM (found
    by a dev app audit)."""
    root = tmp_path / "proj"
    write(root / "src" / "index.html", "v1")
    pids = tmp_path / "pids"
    script = root / "build.sh"
    script.write_text(
        f"mkdir -p out\ncp src/index.html out/index.html\nsleep 600 &\necho $! >> {pids}\n"
    )
    dev = DevApp(
        site_dir=root / "out",
        project_root=root,
        closing=trio.Event(),
        build_cmd=f"sh {script}",
        debounce=0,
    )
    with trio.fail_after(DEADLINE):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            (first,) = map(int, pids.read_text().split())
            assert process_running(first) and not dev.broadcaster.building
            async with sse(client, "/__reload__") as stream:
                await stream.wait_open()
                write(root / "src" / "index.html", "v2")
                assert (await stream.next_named("reload")).json()["paths"] == ["index.html"]
            first, second = map(int, pids.read_text().split())
            assert not process_running(first) and process_running(second)
            assert b"v2" in (await client.get("/")).content
    assert not process_running(second)


@pytest.mark.skipif(not _inotify.available(), reason="the guard needs the inotify watcher")
async def test_a_build_that_changes_a_watched_file_itself_stops_after_saying_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A build that writes a file in the project outside the site (a log, a cache nobody
    ignored) rebuilt itself every 0.2 s, forever (found by a dev app audit). Now, once the
    same paths, changed only while builds ran, have started builds again, they are named
    in the log, once, and their changes during a build no longer start one. Edits between
    builds still do, and an edit made during a build still gets its follow-up."""
    project = BuildProject.create(tmp_path)
    log_file = project.root / "build.log"
    dev = project.dev_app(f"{project.command()} && echo built >> {log_file}", debounce=0.02)

    def loop_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "starts the next" in r.getMessage()]

    caplog.set_level(logging.INFO, "punie_trio.dev")
    with trio.fail_after(DEADLINE):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            while not loop_warnings():  # noqa: ASYNC110 (observed state; no guessed margin)
                await trio.sleep(0.01)
            (warning,) = loop_warnings()
            assert "build.log" in warning and "--ignore" in warning
            assert dev.loop.builds == project.builds() == 3  # the first, and two it started
            async with sse(client, "/__reload__") as stream:
                await stream.wait_open()
                write(project.root / "src" / "index.html", "v2")  # between builds
                assert (await stream.next_named("reload")).json()["paths"] == ["index.html"]
                assert dev.loop.builds == 4
                # During a build: its own follow-up, still.
                project.gate.unlink()
                write(project.root / "src" / "a.html", "a")
                assert (await stream.next()).event == "build_start"
                write(project.root / "src" / "b.html", "b")
                while not any(p.endswith("b.html") for p in dev.pending.paths):  # noqa: ASYNC110
                    await trio.sleep(0.01)
                project.gate.touch()
                paths: set[str] = set()
                while dev.loop.builds < 6 or dev.broadcaster.building:
                    event = await stream.next()
                    if event.event == "reload":
                        paths.update(event.json()["paths"])
                assert {"a.html", "b.html"} <= paths
                assert dev.loop.builds == 6 and not dev.pending
    assert len(loop_warnings()) == 1
    assert log_file.read_text().count("built") == 6


async def test_a_file_saved_during_each_build_is_not_taken_for_the_builds_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A user saving the same source during each build, each build started by the save
    before (auto-save with a slow build), looks like an echo: the loop guard took the file
    for the build's own, said so, and dropped the saves (a review). A build's own files also
    change during builds they did not start; a user's saves do not."""
    project = BuildProject.create(tmp_path)
    page = project.root / "src" / "index.html"
    dev = project.dev_app(debounce=0.02)
    caplog.set_level(logging.INFO, "punie_trio.dev")
    with trio.fail_after(DEADLINE):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            async with sse(client, "/__reload__") as stream:
                await stream.wait_open()
                project.gate.unlink()
                write(page, "v2")  # between builds: starts build 2, held at the gate
                assert (await stream.next()).event == "build_start"
                for version in range(3, 7):  # saved during each build, which it then starts
                    write(page, f"v{version}")
                    while not any(p.endswith("index.html") for p in dev.pending.paths):  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    project.gate.touch()
                    while not dev.broadcaster.building or dev.loop.builds < version:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    project.gate.unlink()
                project.gate.touch()
                while dev.broadcaster.building or dev.pending:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert (project.site / "index.html").read_text() == "v6"
            assert (await client.get("/index.html")).text.count("v6") == 1
    assert not [r for r in caplog.records if "starts the next" in r.getMessage()]


async def test_a_build_that_re_points_its_site_link_to_a_new_output_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A build that writes each output anew and re-points the site link to it (``site ->
    out/N``, in the project) was seen writing a new directory each time, which no ignore
    rule made at the start covers: 20 builds in 4 s without an edit (a review). Changes
    under where the link leads now are the build's; the temporary link it renames into
    place is named by the loop guard, and the loop stops."""
    root = tmp_path / "proj"
    write(root / "src" / "index.html", "<html><body>v1</body></html>")
    write(root / "out" / "0" / "index.html", "<html><body>v0</body></html>")
    (root / "site").symlink_to("out/0")
    build = (
        f'd=out/$("{sys.executable}" -c "import time; print(time.time_ns())") && '
        'mkdir -p "$d" && cp src/index.html "$d/" && ln -sfn "$d" site.tmp && mv -T site.tmp site'
    )
    dev = DevApp(
        site_dir=root / "site",
        project_root=root,
        closing=trio.Event(),
        build_cmd=build,
        debounce=0.02,
    )
    caplog.set_level(logging.INFO, "punie_trio.dev")

    def loop_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "starts the next" in r.getMessage()]

    with trio.fail_after(DEADLINE):
        async with running(dev) as url, httpx.AsyncClient(base_url=url) as client:
            while not loop_warnings():  # noqa: ASYNC110 (observed state; no guessed margin)
                await trio.sleep(0.01)
            (warning,) = loop_warnings()
            assert "site.tmp" in warning
            while dev.broadcaster.building or dev.pending:  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert dev.loop.builds == 3  # the first, and two it started
            assert "v1" in (await client.get("/index.html")).text
