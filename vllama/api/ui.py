"""The status page (GET /ui, and GET / from a browser): one self-contained HTML page, no external assets, that
polls the admin API (/vllama/ps every 2 s, /vllama/info every 10 s) and starts, sleeps and stops models with it.

GET / from anything that is not a browser answers "Ollama is running", as Ollama does (some Ollama clients
check it)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root(request: Request) -> Response:
    if "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(PAGE)
    return PlainTextResponse("Ollama is running")


@router.get("/ui", include_in_schema=False)
async def ui() -> HTMLResponse:
    return HTMLResponse(PAGE)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vllama</title>
<style>
  :root { --bg: #f6f7f9; --card: #fff; --fg: #1d2330; --muted: #6b7280; --line: #e3e6eb; --accent: #2f6fde; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background: var(--bg);
         color: var(--fg); }
  header { display: flex; align-items: baseline; gap: 16px; padding: 14px 24px; background: #1d2330; color: #fff; }
  header h1 { margin: 0; font-size: 20px; letter-spacing: .5px; }
  header .meta { color: #b8c0cc; font-size: 13px; }
  header .right { margin-left: auto; font-size: 13px; color: #b8c0cc; }
  main { padding: 18px 24px; max-width: 1400px; }
  h2 { font-size: 15px; margin: 22px 0 8px; color: #374151; text-transform: uppercase; letter-spacing: .6px; }
  .devices { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 12px; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
  .card .title { font-weight: 600; }
  .bar { height: 12px; border-radius: 6px; background: #e5e7eb; overflow: hidden; margin: 8px 0 6px; display: flex; }
  .bar .used { background: #6b8fd6; } .bar .reserved { background: #f2b84b; }
  .small { color: var(--muted); font-size: 12px; }
  table { width: 100%; border-collapse: collapse; background: var(--card); border: 1px solid var(--line);
          border-radius: 8px; overflow: hidden; }
  th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
  th { background: #f0f2f5; font-weight: 600; font-size: 12px; color: #4b5563; text-transform: uppercase; }
  tr:last-child td { border-bottom: 0; }
  td.num { font-variant-numeric: tabular-nums; }
  .state { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
           background: #e5e7eb; color: #374151; }
  .s-running { background: #d1fae5; color: #065f46; } .s-sleeping { background: #e0e7ff; color: #3730a3; }
  .s-starting, .s-waking, .s-draining, .s-stopping { background: #fef3c7; color: #92400e; }
  .s-error { background: #fee2e2; color: #991b1b; } .s-stopped { background: #f3f4f6; color: #6b7280; }
  button { font: inherit; font-size: 12px; padding: 3px 9px; margin: 0 3px 3px 0; border: 1px solid #c9ced6;
           border-radius: 5px; background: #fff; cursor: pointer; }
  button:hover:not(:disabled) { border-color: var(--accent); color: var(--accent); }
  button:disabled { opacity: .4; cursor: default; }
  .err { color: #991b1b; font-size: 12px; max-width: 520px; overflow-wrap: anywhere; }
  #banner { display: none; margin: 0 0 12px; padding: 8px 12px; border-radius: 6px; background: #fee2e2;
            color: #991b1b; }
  #auth { display: none; margin: 0 0 12px; }
  .empty { color: var(--muted); padding: 10px 0; }
</style>
</head>
<body>
<header>
  <h1>vllama</h1><span class="meta" id="meta">connecting…</span>
  <span class="right" id="updated"></span>
</header>
<main>
  <div id="banner"></div>
  <div id="auth">API key: <input id="key" type="password" size="40">
    <button id="save-key" type="button">Use key</button></div>
  <h2>Devices</h2>
  <div class="devices" id="devices"><div class="empty">…</div></div>
  <h2>Models</h2>
  <table>
    <thead><tr><th>Model</th><th>State</th><th>Address</th><th>Devices</th><th>Memory</th><th>In flight</th>
      <th>Idle</th><th>Next step</th><th>Actions</th></tr></thead>
    <tbody id="models"></tbody>
  </table>
  <h2>Recent evictions</h2>
  <table>
    <thead><tr><th>Time</th><th>Model</th><th>Action</th><th>Reason</th><th>What happened</th></tr></thead>
    <tbody id="evictions"></tbody>
  </table>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let configured = [], lastPs = null, info = null;

function esc(s) {
  return String(s == null ? "" : s).replace(/[&<>"']/g, (c) =>
    ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function gib(n) { return n == null ? "-" : (n / 1073741824).toFixed(1) + " GiB"; }
function ago(seconds) {
  if (seconds == null) return "-";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 90) return seconds + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}
function headers() {
  const h = {"Content-Type": "application/json"};
  const key = localStorage.getItem("vllama-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
function banner(text) { $("banner").textContent = text || ""; $("banner").style.display = text ? "block" : "none"; }

async function call(method, path, body) {
  const r = await fetch(path, {method, headers: headers(), body: body ? JSON.stringify(body) : undefined});
  if (r.status === 401) { $("auth").style.display = "block"; throw new Error("this daemon needs an API key"); }
  let data = null;
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error((data && data.error && (data.error.message || data.error)) || ("HTTP " + r.status));
  return data;
}

function renderDevices(devices) {
  if (!devices.length) { $("devices").innerHTML = '<div class="empty">no devices</div>'; return; }
  $("devices").innerHTML = devices.map((d) => {
    const used = d.total_bytes - d.free_bytes, reserved = Math.max(0, d.free_bytes - d.available_bytes);
    const pct = (n) => (100 * n / Math.max(1, d.total_bytes)).toFixed(1) + "%";
    return `<div class="card device" data-device="${esc(d.index)}">
      <div class="title">[${esc(d.index)}] ${esc(d.name)} <span class="small">${esc(d.kind)}</span></div>
      <div class="bar"><div class="used" style="width:${pct(used)}"></div>
        <div class="reserved" style="width:${pct(reserved)}"></div></div>
      <div class="small"><span class="free">${gib(d.free_bytes)}</span> free of ${gib(d.total_bytes)}
        (${gib(d.available_bytes)} unreserved)</div>
      <div class="small">models: ${esc((d.models || []).join(", ") || "-")}</div></div>`;
  }).join("");
}

function actions(name, state) {
  const can = {
    start: state !== "running" && state !== "starting" && state !== "waking",
    sleep1: state === "running", sleep2: state === "running",
    stop: state !== "stopped",
  };
  const label = {start: state === "sleeping" ? "Wake" : "Start", sleep1: "Sleep L1", sleep2: "Sleep L2", stop: "Stop"};
  return Object.keys(can).map((a) =>
    `<button type="button" data-action="${a}" data-model="${esc(name)}" ${can[a] ? "" : "disabled"}>` +
    `${label[a]}</button>`
  ).join("");
}

function renderModels(rows) {
  const byName = new Map(rows.map((r) => [r.model, r]));
  for (const name of configured) if (!byName.has(name)) byName.set(name, {model: name, state: "stopped"});
  if (!byName.size) {
    $("models").innerHTML = '<tr><td colspan="9" class="empty">no models configured or requested yet</td></tr>';
    return;
  }
  const now = Date.now() / 1000;
  $("models").innerHTML = [...byName.values()].map((r) => {
    const level = r.sleep_level ? " L" + r.sleep_level : "";
    const memory = Object.values(r.memory_bytes || {}).filter((n) => n > 0).map(gib).join(" + ") || "-";
    const next = r.expires_at ? "in " + ago(r.expires_at - now) : (r.pinned ? "pinned" : "-");
    const error = r.last_error ? `<div class="err">${esc(r.last_error)}</div>` : "";
    return `<tr data-model="${esc(r.model)}">
      <td><b>${esc(r.model)}</b>${error}</td>
      <td><span class="state s-${esc(r.state)}" data-state="${esc(r.state)}">${esc(r.state + level)}</span></td>
      <td class="num">${esc(r.socket ? r.socket.split("/").pop() : (r.port || "-"))}</td>
      <td>${esc((r.state !== "stopped" && (r.devices || []).join(",")) || "-")}</td>
      <td class="num">${memory}</td>
      <td class="num">${esc(r.in_flight == null ? "-" : r.in_flight)}</td>
      <td class="num">${r.idle_seconds == null ? "-" : ago(r.idle_seconds)}</td>
      <td class="num">${esc(next)}</td>
      <td>${actions(r.model, r.state)}</td></tr>`;
  }).join("");
}

function renderEvictions(list) {
  if (!list || !list.length) {
    $("evictions").innerHTML = '<tr><td colspan="5" class="empty">none yet</td></tr>';
    return;
  }
  $("evictions").innerHTML = list.slice().reverse().slice(0, 20).map((e) => `<tr>
    <td class="num">${esc(new Date(e.time * 1000).toLocaleTimeString())}</td><td>${esc(e.model)}</td>
    <td>${esc(e.action)}</td><td>${esc(e.reason)}</td><td>${esc(e.message)}</td></tr>`).join("");
}

async function refreshInfo() {
  try {
    info = await call("GET", "/vllama/info");
    configured = info.configured_models || [];
    $("meta").textContent = `${info.version} · ${info.device_kind} · sleep mode ${info.sleep_mode ? "on" : "off"}` +
      (info.config_error ? " · CONFIG ERROR: " + info.config_error : "");
  } catch (e) { banner(String(e.message || e)); }
}

async function refresh() {
  try {
    const ps = await call("GET", "/vllama/ps");
    lastPs = ps;
    renderDevices(ps.devices || []);
    renderModels(ps.models || []);
    renderEvictions(ps.recent_evictions || []);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    if ($("banner").dataset.kind !== "action") banner("");
  } catch (e) { banner("cannot reach vllama: " + (e.message || e)); }
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  const model = b.dataset.model, action = b.dataset.action;
  b.disabled = true;
  try {
    if (action === "start") await call("POST", "/vllama/start", {model, wait: false});
    else if (action === "stop") await call("POST", "/vllama/stop", {model});
    else await call("POST", "/vllama/sleep", {model, level: action === "sleep1" ? 1 : 2});
    $("banner").dataset.kind = ""; banner("");
  } catch (e) { $("banner").dataset.kind = "action"; banner(`${action} ${model}: ${e.message || e}`); }
  refresh();
});
$("save-key").addEventListener("click", () => {
  localStorage.setItem("vllama-key", $("key").value); $("auth").style.display = "none"; refreshInfo(); refresh();
});

refreshInfo().then(refresh);
setInterval(refresh, 2000);
setInterval(refreshInfo, 10000);
</script>
</body>
</html>
"""
