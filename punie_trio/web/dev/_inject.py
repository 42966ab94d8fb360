"""The live-reload script and its injection into HTML (sans-I/O).

A page gets a ``<script src="/__reload__.js" data-punie-reload="" data-state="...">`` tag:
the script is *external* and same-origin, so a page whose Content-Security-Policy says
``script-src 'self'`` runs it (an inline script was blocked there; found by a dev app audit).
The page's state (server run, generation, build running, last build error) travels as JSON
in the ``data-state`` attribute, escaped, so nothing in it can end the attribute or the
element, and the tag is ASCII, so it fits a page in any ASCII-compatible charset. The script
finds it through ``document.currentScript``.

The tag goes before the *last* ``</body>`` (case-insensitive; ``</BODY >`` too), or at the
end when there is none: a ``</body>`` inside an earlier inline script or comment must not
receive it. When that last one is itself inside a comment (after the real one), the tag
goes at the end too. An XHTML page (``application/xhtml+xml``) gets it too, but only before a
``</body>``: the tag is well-formed XML, and appended after the root element it would not be.

What the script does, and why:

* **EventSource with capped backoff.** Automatic EventSource reconnection is replaced by our
  own (close on error, retry after 0.25 s doubling up to 10 s, with jitter) so a stopped server
  is not hammered and the ``since`` generation can be passed on every reconnect.
* **Closes on ``pagehide`` and while the tab is hidden**: browsers allow about six HTTP/1.1
  connections per host; background tabs must not hold them. On ``visible`` it reconnects with
  ``?since=<generation>``, and the server replays what it missed, merged: nothing is lost.
* **CSS hot swap**: each same-origin stylesheet ``<link>`` is cloned with a cache-busting query;
  the old one is removed only when the new one has loaded (or failed), so there is no flash.
* **Scroll kept across reloads** in ``sessionStorage``, keyed by path.
* **One connection per tab, not per frame.** A window connects only when no same-origin
  ancestor window runs the script; one that started first (frames load before their parent's
  script runs) is told to stand down when the ancestor starts. The connected window swaps
  stylesheets in its same-origin frames too, and its reload reloads them. A page with five
  same-site iframes opened six streams: Chromium's six HTTP/1.1 connections per host, never
  released, and every later request of the page hung (found by a dev app audit). A page shown
  in a *cross-origin* frame (an IDE's preview pane) still connects: reading a cross-origin
  ancestor's properties throws, and that ancestor is skipped.
* **"rebuilding" badge** while a build runs, and a **build-error overlay** (command, exit
  status, tail of the output) on ``build_error``, cleared on ``build_ok``. Text is set with
  ``textContent``, so output is never parsed as HTML.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

_BODY_CLOSE = re.compile(rb"</body\s*>", re.IGNORECASE)

SCRIPT_PATH = "/__reload__.js"

SCRIPT_JS = r"""(function () {
  "use strict";
  var me = document.currentScript;
  if (window.__punieReloadStarted || !me) return;
  var S;
  try { S = JSON.parse(me.getAttribute("data-state")); } catch (e) { return; }
  window.__punieReload = S;
  var gen = S.generation, es = null, timer = null, attempt = 0, swapping = 0, passive = false;
  var KEY = "punie-scroll:" + location.pathname + location.search;
  var STYLE_BADGE = "position:fixed;right:12px;bottom:12px;z-index:2147483647;" +
    "font:12px/1.4 system-ui,sans-serif;background:#1f2937;color:#fff;padding:4px 10px;" +
    "border-radius:12px;opacity:.9;pointer-events:none";
  var STYLE_OVERLAY = "position:fixed;inset:0;z-index:2147483646;overflow:auto;" +
    "background:rgba(17,17,17,.92);color:#eee;font:13px/1.45 ui-monospace,monospace;" +
    "padding:24px";
  function root() { return document.body || document.documentElement; }
  function byId(id) { return document.getElementById(id); }
  function ancestorRuns() {
    var w = window;
    while (w !== w.parent) {
      w = w.parent;
      try { if (w.__punieReloadStarted) return true; } catch (e) {}
    }
    return false;
  }
  function eachFrame(fn, w) {
    var n = 0;
    w = w || window;
    try { n = w.length; } catch (e) { return; }
    for (var i = 0; i < n; i++) {
      var f = null, same = false;
      try { f = w[i]; same = !!f.document; } catch (e) {}
      if (!f) continue;
      if (same) { try { fn(f); } catch (e) {} }
      eachFrame(fn, f);
    }
  }
  function api(f) { return f.__punieReloadStarted || null; }
  function badge(show) {
    var b = byId("__punie_badge");
    if (show && !b) {
      b = document.createElement("div");
      b.id = "__punie_badge";
      b.setAttribute("style", STYLE_BADGE);
      b.textContent = "rebuilding\u2026";
      root().appendChild(b);
    } else if (!show && b) {
      b.parentNode.removeChild(b);
    }
  }
  function overlay(err) {
    var o = byId("__punie_overlay");
    if (o) o.parentNode.removeChild(o);
    if (!err) return;
    o = document.createElement("div");
    o.id = "__punie_overlay";
    o.setAttribute("style", STYLE_OVERLAY);
    var title = document.createElement("div");
    title.setAttribute("style", "font-size:16px;color:#f87171;margin-bottom:8px");
    title.textContent = "Build failed (exit status " + err.exit_status + ")";
    var cmd = document.createElement("pre");
    cmd.setAttribute("style", "color:#93c5fd;white-space:pre-wrap");
    cmd.textContent = "$ " + (err.command || "");
    var out = document.createElement("pre");
    out.setAttribute("style", "white-space:pre-wrap");
    out.textContent = err.output || "";
    var close = document.createElement("button");
    close.textContent = "dismiss";
    close.onclick = function () { overlay(null); };
    o.appendChild(title); o.appendChild(cmd); o.appendChild(out); o.appendChild(close);
    root().appendChild(o);
  }
  function saveScroll() {
    try {
      sessionStorage.setItem(KEY, JSON.stringify([window.scrollX, window.scrollY]));
    } catch (e) {}
  }
  function restoreScroll() {
    try {
      var v = sessionStorage.getItem(KEY);
      if (!v) return;
      sessionStorage.removeItem(KEY);
      var p = JSON.parse(v);
      window.scrollTo(p[0], p[1]);
    } catch (e) {}
  }
  function reload() {
    saveScroll();
    eachFrame(function (f) { if (api(f)) api(f).saveScroll(); });
    disconnect();
    location.reload();
  }
  function swapCssIn(doc) {
    var links = doc.querySelectorAll('link[rel~="stylesheet"]');
    for (var i = 0; i < links.length; i++) {
      var old = links[i], url;
      if (old.getAttribute("data-punie-old")) continue;
      try { url = new URL(old.href, doc.baseURI); } catch (e) { continue; }
      if (url.origin !== location.origin) continue;
      url.searchParams.set("__punie", gen + "-" + (++swapping));
      var link = old.cloneNode(false);
      link.href = url.href;
      old.setAttribute("data-punie-old", "1");
      (function (old, link) {
        var done = false;
        function drop() {
          if (done) return;
          done = true;
          if (old.parentNode) old.parentNode.removeChild(old);
        }
        link.addEventListener("load", drop);
        link.addEventListener("error", drop);
      })(old, link);
      old.parentNode.insertBefore(link, old.nextSibling);
    }
  }
  function swapCss() {
    swapCssIn(document);
    eachFrame(function (f) { swapCssIn(f.document); });
  }
  function reloadPendingFrames() {
    eachFrame(function (f) { if (api(f) && api(f).pending) f.location.reload(); });
  }
  function disconnect() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (es) { es.close(); es = null; }
  }
  function schedule() {
    if (passive || timer !== null || document.visibilityState === "hidden") return;
    var delay = Math.min(10000, 250 * Math.pow(2, attempt++)) * (0.75 + Math.random() / 2);
    timer = setTimeout(function () { timer = null; connect(); }, delay);
  }
  function data(m) { try { return JSON.parse(m.data); } catch (e) { return {}; } }
  function connect() {
    if (passive || es || document.visibilityState === "hidden") return;
    es = new EventSource("/__reload__?since=" + encodeURIComponent(S.run + "." + gen));
    es.onopen = function () { attempt = 0; };
    es.onerror = function () { disconnect(); schedule(); };
    es.addEventListener("reload", function (m) {
      var d = data(m);
      if (typeof d.generation === "number") gen = d.generation;
      S.generation = gen;
      if (d.action === "reload-css" && !S.pending) swapCss(); else reload();
    });
    es.addEventListener("build_start", function () { badge(true); });
    es.addEventListener("build_ok", function () {
      badge(false); overlay(null); reloadPendingFrames();
      if (S.pending) reload();
    });
    es.addEventListener("build_error", function (m) {
      badge(false); overlay(data(m)); reloadPendingFrames();
      if (S.pending) reload();
    });
    es.addEventListener("shutdown", function () { disconnect(); schedule(); });
  }
  window.__punieReloadStarted = {
    pending: !!S.pending,
    saveScroll: saveScroll,
    standDown: function () { passive = true; disconnect(); badge(false); overlay(null); }
  };
  passive = ancestorRuns();
  if (!passive) {
    eachFrame(function (f) { if (api(f)) api(f).standDown(); });
    badge(S.building);
    overlay(S.error);
  }
  if (document.readyState === "complete") restoreScroll();
  else window.addEventListener("load", restoreScroll);
  window.addEventListener("pagehide", disconnect);
  window.addEventListener("pageshow", function () { connect(); });
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") disconnect(); else connect();
  });
  connect();
})();
"""

#: The script as served, and its validator (it changes only with the code).
SCRIPT_BYTES = SCRIPT_JS.encode()
SCRIPT_ETAG = f'"{zlib.crc32(SCRIPT_BYTES):08x}-{len(SCRIPT_BYTES):x}"'


_ATTRIBUTE_ESCAPES = str.maketrans({"&": "&amp;", "'": "&#39;", "<": "&lt;", ">": "&gt;"})


def script_tag(state: dict[str, Any]) -> bytes:
    """The ``<script>`` element for a page served in ``state``: ASCII, and well-formed XML."""
    # ensure_ascii: ASCII. In a single-quoted attribute the JSON's own quotes stay as they are;
    # & ' < > are escaped, so no string in it ends the attribute or the element (in HTML or
    # XML), and getAttribute() gives the JSON back.
    state_json = json.dumps(state, separators=(",", ":")).translate(_ATTRIBUTE_ESCAPES)
    return (
        f'<script src="{SCRIPT_PATH}" data-punie-reload="" data-state=\'{state_json}\'></script>'
    ).encode()


def inject(
    html: bytes, state: dict[str, Any], charset: str | None = None, *, xml: bool = False
) -> bytes:
    """Insert the script before the last ``</body>`` (any case), else append it (but for
    ``xml``, an XHTML page: there nothing may follow the root element, so no script).

    The tag is ASCII, and so is ``</body>`` in every encoding a page can declare in ASCII
    bytes, so the bytes are searched and spliced as they are. A UTF-16 page (a BOM says so)
    is the exception: there the tag and the search are in UTF-16 too.
    """
    if charset in ("utf-16le", "utf-16be"):
        assert charset is not None
        try:
            text = html.decode(charset, errors="surrogatepass")
        except UnicodeDecodeError:  # an odd number of bytes: not UTF-16 after all
            return html
        as_utf8 = inject(text.encode("utf-8", errors="surrogatepass"), state, xml=xml)
        return as_utf8.decode("utf-8", errors="surrogatepass").encode(charset, "surrogatepass")
    tag = script_tag(state)
    last = None
    for last in _BODY_CLOSE.finditer(html):  # noqa: B007 - keep the final match
        pass
    if last is None:
        return html if xml else html + tag
    if not xml and _in_comment(html, last.start()):
        # A comment after the real </body> (an old footer commented out) held the last
        # one, and the tag went into the comment: the page never connected. At the end,
        # after the comment, a browser runs it in the body as for a page without </body>.
        return html + tag
    return html[: last.start()] + tag + html[last.start() :]


def _in_comment(html: bytes, at: int) -> bool:
    """Whether ``at`` is after an HTML comment's ``<!--`` and before its ``-->``. (A
    ``<!--`` in an inline script's string may look like one; the tag then goes at the
    end, which a browser runs too.)"""
    opened = html.rfind(b"<!--", 0, at)
    return opened >= 0 and html.find(b"-->", opened + 4, at) < 0
