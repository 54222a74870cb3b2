"""The dashboard's page, style and script (served by web.py; separate files, as its
Content-Security-Policy allows no inline style or script): plain HTML and JS,
no build step. The script takes the token a browser signs in with from the
address (``?token=`` or ``#token=``) into the tab's ``sessionStorage`` and
off the address, polls ``/api/snapshot`` every second with it as a Bearer
header (web.py says why no cookie), and fills the page with
``textContent`` only (no data ever becomes markup)."""

PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedexec relay</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/dashboard.css"></head>
<body>
<header><h1>fedexec relay</h1><span id="relay"></span><span id="user"></span><span id="updated"></span></header>
<main>
<section class="wide"><h2>Endpoints</h2>
<table id="endpoints"><thead><tr><th>name</th><th>id</th><th>state</th><th>workers busy / idle</th>
<th>queued at relay</th><th>queued at endpoint</th><th>sent, unfinished</th><th>blocks (scheduler job)</th></tr></thead>
<tbody></tbody></table></section>
<section><h2>Tasks</h2><div class="counters">
<div class="counter">success<b id="count-success">-</b></div>
<div class="counter">exception<b id="count-exception">-</b></div>
<div class="counter">failed<b id="count-failed">-</b></div>
<div class="counter">cancelled<b id="count-cancelled">-</b></div>
<div class="counter">in flight<b id="count-in-flight">-</b></div></div>
<h2 class="below">Finished per second (last 5 minutes)</h2>
<svg id="rates" viewBox="0 0 300 90" preserveAspectRatio="none"><polyline id="rate-done" fill="none"
stroke="#2563eb" stroke-width="1.5"/><polyline id="rate-failed" fill="none" stroke="#dc2626" stroke-width="1.5"/></svg>
<div><span id="rate-now"></span></div></section>
<section><h2>Latency by stage (traced tasks: executor trace=True)</h2>
<table id="latency"><thead><tr><th>stage</th><th>p50</th><th>p90</th><th>p99</th><th>tasks</th></tr></thead>
<tbody></tbody></table></section>
<section class="wide"><h2>Recent failures</h2>
<table id="failures"><thead><tr><th>when</th><th>task</th><th>endpoint</th><th>state</th><th>error</th></tr></thead>
<tbody></tbody></table></section>
</main>
<script src="/dashboard.js"></script>
</body></html>
"""

PAGE_JS = r"""
"use strict";
function row(cells, classes) {
  const tr = document.createElement("tr");
  cells.forEach((text, i) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (classes && classes[i]) td.className = classes[i];
    tr.appendChild(td);
  });
  return tr;
}
function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows);
}
function seconds(s) {
  if (s === null || s === undefined) return "-";
  if (s < 1e-3) return (s * 1e6).toFixed(0) + " \u00b5s";
  if (s < 1) return (s * 1e3).toFixed(1) + " ms";
  return s.toFixed(2) + " s";
}
function line(id, values, top) {
  const n = values.length;
  const points = values.map((v, i) => ((n < 2 ? 0 : i * 300 / (n - 1)).toFixed(1) + "," +
                                       (88 - 86 * v / top).toFixed(1)));
  document.getElementById(id).setAttribute("points", points.join(" "));
}
function render(s) {
  document.getElementById("relay").textContent = s.relay.address + " (" + s.relay.auth + " mode)";
  document.getElementById("user").textContent = "signed in as " + s.user;
  document.getElementById("updated").textContent = "updated " + new Date(s.time * 1000).toLocaleTimeString();
  // (null: a shared endpoint's numbers that count every user's work, shown to its owner only)
  fill("endpoints", s.endpoints.map(e => row([
    e.name, e.id, e.status, e.busy_workers === null ? "-" : e.busy_workers + " / " + e.idle_workers,
    e.queued_at_relay, e.queued_at_endpoint === null ? "-" : e.queued_at_endpoint,
    e.at_endpoint, e.blocks.map(b => b.id + (b.job ? " (" + b.job + ")" : "") + " " + b.state).join(", ") || "-"],
    [null, null, e.status, "n", "n", "n", "n", null])));
  for (const [state, count] of Object.entries(s.tasks.counts)) {
    const el = document.getElementById("count-" + state);
    if (el) el.textContent = count;
  }
  document.getElementById("count-in-flight").textContent = s.tasks.in_flight;
  const done = s.rates.map(r => r.done), failed = s.rates.map(r => r.failed);
  const top = Math.max(1, ...done, ...failed);
  line("rate-done", done, top);
  line("rate-failed", failed, top);
  const last = s.rates[s.rates.length - 1];
  document.getElementById("rate-now").textContent = last ?
    "now: " + last.done.toFixed(1) + " finished/s, " + last.failed.toFixed(1) + " failed/s (scale: " +
    top.toFixed(0) + "/s)" : "";
  fill("latency", s.latency.map(l => row([l.stage, seconds(l.p50), seconds(l.p90), seconds(l.p99), l.count],
                                          [null, "n", "n", "n", "n"])));
  fill("failures", s.failures.map(f => row([new Date(f.time * 1000).toLocaleTimeString(), f.task, f.endpoint,
                                            f.state, f.error], [null, null, null, null, "err"])));
}
const TOKEN_KEY = "fedexec-dashboard-token";
function takeToken() {
  // a token in the address (?token= or #token=) moves into this tab's storage (this origin's only:
  // scheme, host and port) and off the address, so it is neither kept in history nor shown
  const given = new URLSearchParams(location.hash.slice(1)).get("token") ||
                new URLSearchParams(location.search).get("token");
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given);
    history.replaceState(null, "", "/");
  }
  return sessionStorage.getItem(TOKEN_KEY);
}
const token = takeToken();
async function poll() {
  if (!token) {
    document.getElementById("updated").textContent = "not signed in: open /?token=TOKEN (or /#token=TOKEN)";
    return;
  }
  try {
    const response = await fetch("/api/snapshot", {credentials: "omit", cache: "no-store",
                                                    headers: {"Authorization": "Bearer " + token}});
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      document.getElementById("updated").textContent = "signed out: open /?token=TOKEN again";
      return;
    } else if (response.ok) {
      render(await response.json());
    }
  } catch (e) {
    document.getElementById("updated").textContent = "relay unreachable";
  }
  setTimeout(poll, 1000);
}
poll();
"""

PAGE_CSS = """body{font:14px system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2b4f;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:18px;margin:0}header span{opacity:.8}
main{padding:16px 20px;display:grid;gap:16px;grid-template-columns:1fr 1fr}
section{background:#fff;border-radius:6px;padding:12px 16px;box-shadow:0 1px 2px #0002}
section.wide{grid-column:1/3}h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e5e7eb}
th{font-weight:600;color:#4b5563}td.n{text-align:right;font-variant-numeric:tabular-nums}
.counters{display:flex;gap:12px;flex-wrap:wrap}.counter{padding:6px 12px;border-radius:4px;background:#eef2ff}
.counter b{display:block;font-size:22px}.online{color:#047857}.offline{color:#b91c1c}
.err{font-family:monospace;white-space:pre-wrap;word-break:break-all}svg{width:100%;height:90px}
h2.below{margin-top:12px}
"""
