"""The dashboard: one self-contained HTML page over the admin API.

The page itself holds no data and needs no token, so a browser can open it;
its script then calls `routes`, `upstreams`, `reload` and `shadow` with the
bearer token, which it takes from a `#token=...` fragment (fragments never
reach a server or a log) or from a password field, keeps in `sessionStorage`
for the tab's lifetime, and removes from the address bar at once. Everything is
drawn with `textContent`, never as HTML, and a Content-Security-Policy that
pins the inline script and style by hash forbids anything else to run.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["DASHBOARD_HEADERS", "DASHBOARD_HTML"]

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d232a; }
h1 { font-size: 1.3rem; margin: 0 0 .3rem; }
h2 { font-size: 1.05rem; margin: 1.6rem 0 .5rem; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid #d5dae0; padding: .3rem .5rem; vertical-align: top; }
th { background: #f1f3f5; text-align: left; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #687580; font-size: .85em; }
.runtime { background: #fff4d6; }
.ok { color: #1a7f37; font-weight: 600; }
.bad { color: #c62828; font-weight: 600; }
#status.bad { font-weight: normal; }
form { margin: .8rem 0; }
[hidden] { display: none; }
"""

_SCRIPT = """
"use strict";
(function () {
  const KEY = "strangler-admin-token";
  const REFRESH_MS = 2000;
  let timer = null;

  function byId(id) { return document.getElementById(id); }

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function takeTokenFromFragment() {
    const hash = window.location.hash;
    if (hash.startsWith("#token=")) {
      const value = decodeURIComponent(hash.slice("#token=".length));
      if (value) sessionStorage.setItem(KEY, value);
      history.replaceState(null, "", window.location.pathname);
    }
  }

  function token() { return sessionStorage.getItem(KEY) || ""; }

  async function getJson(path) {
    const headers = {"Accept": "application/json"};
    if (token()) headers["Authorization"] = "Bearer " + token();
    const options = {headers, cache: "no-store", credentials: "omit"};
    const response = await fetch(path, options);
    if (response.status === 401) {
      const error = new Error("the admin API refused the token");
      error.unauthorized = true;
      throw error;
    }
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try { message = (await response.json()).message || message; } catch (_) { }
      throw new Error(message);
    }
    return response.json();
  }

  function percent(value) { return (Math.round(value * 100) / 100) + "%"; }

  function latency(traffic) {
    return traffic.requests ? traffic.mean_ms.toFixed(1) + " ms" : "-";
  }

  function legacyUpstream(routes) {
    const fallback = routes.find((r) => r.match === null);
    return fallback ? fallback.split[0].upstream : null;
  }

  function compareLatency(route, legacy) {
    const old = route.split.find((e) => e.upstream === legacy);
    if (route.split.length < 2 || !old) return "-";
    const others = route.split.filter((e) => e !== old && e.traffic.requests > 0);
    if (!old.traffic.requests || !others.length) return "not enough traffic yet";
    return others.map((e) => {
      const ratio = old.traffic.mean_ms ? e.traffic.mean_ms / old.traffic.mean_ms : 0;
      return "old " + latency(old.traffic) + " vs " + e.upstream + " " +
        latency(e.traffic) + (ratio ? " (" + ratio.toFixed(2) + "x)" : "");
    }).join("; ");
  }

  function shadowText(route, summary) {
    if (!route.shadow) return "no shadow";
    const head = "shadow to " + route.shadow.to + " (" +
      percent(route.shadow.percent) + "): ";
    if (!summary || !summary.compared) return head + "no pairs compared yet";
    let text = head + percent(100 * summary.agreement) + " agree (" +
      summary.agreed + " of " + summary.compared + ")";
    if (summary.top_field) text += "; most differing: " + summary.top_field;
    return text;
  }

  function renderRoutes(routes, shadows) {
    const agreement = new Map(shadows.map((s) => [s.route, s]));
    const legacy = legacyUpstream(routes);
    const body = byId("routes-body");
    body.replaceChildren();
    for (const route of routes) {
      const total = route.split.reduce((sum, e) => sum + e.traffic.requests, 0);
      const span = route.split.length;
      route.split.forEach((entry, index) => {
        const row = el("tr");
        if (index === 0) {
          const name = el("td");
          name.append(el("strong", route.name));
          const matched = route.match ? route.match.summary : "unmatched requests";
          name.append(el("div", matched, "muted"));
          if (route.sticky) {
            const sticky = "sticky by " + route.sticky.by + " " + route.sticky.name;
            name.append(el("div", sticky, "muted"));
          }
          const runtime = route.source === "runtime";
          const source = el("td", runtime ? "runtime" : "rule file");
          if (runtime) {
            source.className = "runtime";
            source.append(el("div", "by " + route.by + " at " + route.set_at, "muted"));
          }
          name.rowSpan = span;
          source.rowSpan = span;
          row.append(name, source);
        }
        const weight = el("td", percent(entry.weight), "num");
        if (entry.weight !== entry.rule_weight) {
          weight.append(el("div", "file: " + percent(entry.rule_weight), "muted"));
        }
        const traffic = entry.traffic;
        row.append(
          el("td", entry.upstream + (entry.upstream === legacy ? " (old)" : "")),
          weight,
          el("td", traffic.requests, "num"),
          el("td", total ? percent(100 * traffic.requests / total) : "-", "num"),
          el("td", traffic.status["5xx"], "num"),
          el("td", traffic.errors, "num"),
          el("td", latency(traffic), "num"),
        );
        if (index === 0) {
          const compared = el("td", compareLatency(route, legacy));
          const shadow = el("td", shadowText(route, agreement.get(route.name)),
            route.shadow ? "" : "muted");
          compared.rowSpan = span;
          shadow.rowSpan = span;
          row.append(compared, shadow);
        }
        body.append(row);
      });
    }
  }

  function renderUpstreams(upstreams) {
    const body = byId("upstreams-body");
    body.replaceChildren();
    for (const upstream of upstreams) {
      upstream.targets.forEach((target, index) => {
        const row = el("tr");
        if (index === 0) {
          const name = el("td", upstream.name);
          const balance = el("td", upstream.balance);
          name.rowSpan = upstream.targets.length;
          balance.rowSpan = upstream.targets.length;
          row.append(name, balance);
        }
        row.append(
          el("td", target.url),
          el("td", target.weight, "num"),
          el("td", target.available ? "up" : "down", target.available ? "ok" : "bad"),
          el("td", target.active, "num"),
        );
        body.append(row);
      });
    }
  }

  function renderReload(result) {
    const box = byId("reload");
    box.replaceChildren(
      el("span", result.ok ? "ok" : "refused", result.ok ? "ok" : "bad"),
      el("span", " at " + result.at + " from " + result.source),
    );
    if (!result.ok) {
      const list = el("ul");
      for (const error of result.errors) list.append(el("li", error));
      box.append(list);
    }
  }

  function setStatus(text, bad) {
    const status = byId("status");
    status.textContent = text;
    status.className = bad ? "bad" : "muted";
  }

  function askForToken(message) {
    byId("login").hidden = false;
    byId("forget").hidden = true;
    setStatus(message, true);
    byId("token").focus();
  }

  async function refresh() {
    timer = null;
    try {
      const [routes, upstreams, reload, shadows] = await Promise.all(
        [getJson("routes"), getJson("upstreams"), getJson("reload"),
          getJson("shadow")]);
      renderRoutes(routes.routes, shadows.routes);
      renderUpstreams(upstreams.upstreams);
      renderReload(reload);
      byId("login").hidden = true;
      byId("forget").hidden = !token();
      setStatus("updated " + new Date().toLocaleTimeString(), false);
    } catch (error) {
      if (error.unauthorized) {
        askForToken(token() ? "The token was refused; enter the admin token." :
          "Enter the admin token (admin.token in the rule file).");
        return;
      }
      setStatus("cannot read the admin API: " + error.message, true);
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  function restart() {
    if (timer !== null) clearTimeout(timer);
    refresh();
  }

  byId("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = byId("token").value.trim();
    byId("token").value = "";
    if (value) sessionStorage.setItem(KEY, value);
    restart();
  });
  byId("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    if (timer !== null) clearTimeout(timer);
    timer = null;
    askForToken("Token forgotten.");
  });

  takeTokenFromFragment();
  refresh();
})();
"""

_BODY = """
<h1>strangler</h1>
<div id="status" class="muted">loading...</div>
<form id="login" hidden>
  <label>Admin token <input id="token" type="password" autocomplete="off"></label>
  <button type="submit">Use token</button>
</form>
<button id="forget" type="button" hidden>Forget token</button>

<h2>Routes</h2>
<table>
  <thead><tr>
    <th>Route</th><th>Weights from</th><th>Upstream</th><th>Weight</th>
    <th>Requests</th><th>Traffic share</th><th>5xx</th>
    <th title="requests no upstream answered (502/504 from the gateway)">Failed</th>
    <th>Mean latency</th><th>Latency old vs new</th><th>Shadow agreement</th>
  </tr></thead>
  <tbody id="routes-body"></tbody>
</table>

<h2>Upstreams</h2>
<table>
  <thead><tr>
    <th>Upstream</th><th>Balance</th><th>Target</th><th>Weight</th>
    <th>Health</th><th>Active requests</th>
  </tr></thead>
  <tbody id="upstreams-body"></tbody>
</table>

<h2>Last reload</h2>
<div id="reload">-</div>
"""


def _sha256(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


DASHBOARD_HTML = (
    "<!doctype html>\n"
    '<html lang="en"><head><meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    "<title>strangler admin</title>\n"
    f"<style>{_STYLE}</style>\n"
    f"</head><body>{_BODY}<script>{_SCRIPT}</script>\n"
    "</body></html>\n"
).encode()

_POLICY = "; ".join(
    [
        "default-src 'none'",
        f"script-src {_sha256(_SCRIPT)}",
        f"style-src {_sha256(_STYLE)}",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

DASHBOARD_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Content-Security-Policy", _POLICY.encode("ascii")),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
)
"""Headers that lock the page down to its own script, style and API calls."""
