// tokenguard's live dashboard: subscribes to /v1/usage/stream on the node that served
// this page and shows, per key, three gauges (a fourth, spend, for a key under a spend
// limit), the last 60 s as a chart, and the most recent rejections. Plain JavaScript, no build step, nothing loaded from elsewhere.
//
// The token lives in the `token` variable only (never localStorage, cookies or the
// URL): a reload forgets it. It is sent in the first websocket message, since a
// browser cannot set an Authorization header on a websocket.
//
// The page asks for the feed's batched mode (`batch=1`): a message carries every event
// pending for it, one JSON object per line, which costs the node far less under load
// than a message per event.
"use strict";

const DIMENSIONS = ["requests", "input_tokens", "output_tokens"];
// Gauges a key gets only once its usage shows the dimension limited (a spend limit).
const OPTIONAL = ["spend"];
const LABELS = {
  requests: "requests",
  input_tokens: "input tokens",
  output_tokens: "output tokens",
  spend: "spend",
};
const MICRO = 1_000_000; // spend is counted in micro-units of the operator's currency
const HISTORY_MS = 60_000;
const MAX_REJECTIONS = 20;
const RECONNECT_MS = [500, 1000, 2000, 5000];
const SVG = "http://www.w3.org/2000/svg";
const ARC = 125.66; // length of the gauge's half circle (radius 40)

let token = null; // in memory only
let filter = "";
let socket = null;
let reconnectTimer = null;
let attempts = 0;
const keys = new Map(); // name -> {card, gauges: {dim: el}, usage: {dim: entry|null}, history: []}

const $ = (selector) => document.querySelector(selector);

function setState(state, text) {
  const el = $("#state");
  el.dataset.state = state;
  $("#state-text").textContent = text || state;
}

// --- connection ---------------------------------------------------------------------

function streamUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = (filter ? "key=" + encodeURIComponent(filter) + "&" : "") + "batch=1";
  return `${scheme}//${location.host}/v1/usage/stream?${query}`;
}

function connect() {
  clearTimeout(reconnectTimer);
  if (!token) return;
  setState(attempts ? "reconnecting" : "connecting", attempts ? "reconnecting…" : "connecting…");
  const ws = new WebSocket(streamUrl());
  socket = ws;
  ws.onopen = () => {
    ws.send(JSON.stringify({ type: "auth", token: token }));
  };
  ws.onmessage = (message) => {
    if (ws !== socket) return;
    // One event per line, in order (JSON never holds a raw newline).
    for (const line of String(message.data).split("\n")) {
      let event;
      try {
        event = JSON.parse(line);
      } catch (err) {
        continue;
      }
      handle(event);
    }
  };
  ws.onclose = (close) => {
    if (ws !== socket) return;
    socket = null;
    if (close.code === 1008) {
      // Refused: the token is wrong (or may not use that filter). Forget it.
      token = null;
      setState("refused", "refused: " + (close.reason || "invalid token"));
      $("#connect").disabled = false;
      $("#disconnect").disabled = true;
      return;
    }
    if (!token) {
      setState("disconnected");
      return;
    }
    const delay = RECONNECT_MS[Math.min(attempts, RECONNECT_MS.length - 1)];
    attempts += 1;
    setState("reconnecting", `connection lost (${close.code}); retrying in ${delay / 1000} s`);
    reconnectTimer = setTimeout(connect, delay);
  };
}

function disconnect() {
  token = null;
  clearTimeout(reconnectTimer);
  if (socket) {
    const ws = socket;
    socket = null;
    ws.close(1000);
  }
  setState("disconnected");
  $("#connect").disabled = false;
  $("#disconnect").disabled = true;
}

// --- events -------------------------------------------------------------------------

function handle(event) {
  switch (event.type) {
    case "ready":
      attempts = 0;
      setState("live", event.role === "admin"
        ? (event.key ? `live · admin · ${event.key}` : "live · admin")
        : `live · ${event.key}`);
      $("#node").textContent = `(via node ${event.node})`;
      break;
    case "admitted":
    case "snapshot":
      updateUsage(event.key, event.usage, event.ts);
      break;
    case "settled": {
      // The snapshot that follows corrects any drift; this just shows it at once.
      const entry = keyEntry(event.key);
      const settled = {};
      const output = entry.usage.output_tokens;
      if (output && event.refund) {
        settled.output_tokens = { ...output, used: Math.max(0, output.used - event.refund) };
      }
      const spend = entry.usage.spend;
      if (spend && typeof event.spend === "number" && typeof event.reserved_spend === "number") {
        const freed = event.reserved_spend - event.spend;
        settled.spend = { ...spend, used: Math.max(0, spend.used - freed) };
      }
      if (Object.keys(settled).length) updateUsage(event.key, settled, event.ts);
      break;
    }
    case "rejected":
      addRejection(event);
      updateUsage(event.key, {
        [event.dimension]: { used: event.used, limit: event.limit },
      }, event.ts);
      break;
    case "queued":
    case "dequeued":
      updateWaiting(event);
      break;
    case "would_reject":
      // Admitted by shadow mode: shown with the rejections it would have been.
      addRejection(event);
      break;
    case "lagged":
      // Some events were dropped for us; the next snapshots bring the totals back.
      break;
    default:
      break;
  }
}

function keyEntry(name) {
  let entry = keys.get(name);
  if (entry) return entry;
  const card = $("#key-card").content.firstElementChild.cloneNode(true);
  card.dataset.key = name;
  card.querySelector(".key-name").textContent = name;
  const gauges = {};
  for (const dimension of DIMENSIONS) {
    gauges[dimension] = makeGauge(name, dimension);
    card.querySelector(".gauges").appendChild(gauges[dimension]);
  }
  entry = { card: card, gauges: gauges, usage: {}, history: [] };
  keys.set(name, entry);
  // Keep the cards sorted by key name.
  const names = [...keys.keys()].sort();
  const next = names[names.indexOf(name) + 1];
  $("#keys").insertBefore(card, next ? keys.get(next).card : null);
  $("#no-keys").hidden = true;
  return entry;
}

// Requests waiting in the admission queue, per key: +1 on queued, -1 on dequeued. A
// lagged stream may have lost some of either: the count never goes below zero.
function updateWaiting(event) {
  if (typeof event.key !== "string") return;
  const entry = keyEntry(event.key);
  const el = entry.card.querySelector(".waiting");
  const now = Number(el.dataset.waiting) + (event.type === "queued" ? 1 : -1);
  el.dataset.waiting = String(Math.max(0, now));
  el.querySelector(".waiting-count").textContent = el.dataset.waiting;
  if (event.type === "dequeued") {
    el.querySelector(".waiting-last").textContent =
      `(last: ${event.outcome} after ${(event.waited_ms / 1000).toFixed(1)} s)`;
  }
}

function makeGauge(name, dimension) {
  const el = document.createElement("div");
  el.className = "gauge";
  el.dataset.key = name;
  el.dataset.dimension = dimension;
  el.dataset.used = "";
  el.dataset.limit = "";
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 100 60");
  for (const cls of ["track", "fill"]) {
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", "M 10 55 A 40 40 0 0 1 90 55");
    path.setAttribute("class", cls);
    if (cls === "fill") {
      path.setAttribute("stroke-dasharray", String(ARC));
      path.setAttribute("stroke-dashoffset", String(ARC));
    }
    svg.appendChild(path);
  }
  el.appendChild(svg);
  const value = document.createElement("div");
  value.className = "value";
  value.textContent = "–";
  const label = document.createElement("div");
  label.className = "label";
  label.textContent = LABELS[dimension];
  el.append(value, label);
  return el;
}

function updateUsage(name, usage, ts) {
  if (typeof name !== "string" || !usage) return;
  const entry = keyEntry(name);
  for (const dimension of DIMENSIONS) {
    if (!(dimension in usage)) continue;
    const value = usage[dimension];
    entry.usage[dimension] = value;
    drawGauge(entry.gauges[dimension], value);
  }
  for (const dimension of OPTIONAL) {
    const value = usage[dimension];
    if (!value && !entry.gauges[dimension]) continue; // not limited: no gauge
    if (!entry.gauges[dimension]) {
      entry.gauges[dimension] = makeGauge(name, dimension);
      entry.card.querySelector(".gauges").appendChild(entry.gauges[dimension]);
    }
    if (!(dimension in usage)) continue;
    entry.usage[dimension] = value;
    drawGauge(entry.gauges[dimension], value);
  }
  const point = { t: Date.now() };
  for (const dimension of DIMENSIONS) {
    const value = entry.usage[dimension];
    point[dimension] = value && value.limit ? Math.min(1, value.used / value.limit) : null;
  }
  entry.history.push(point);
  trimHistory(entry);
  drawChart(entry);
}

function drawGauge(el, value) {
  const fill = el.querySelector(".fill");
  const text = el.querySelector(".value");
  if (!value) {
    el.dataset.used = "";
    el.dataset.limit = "";
    el.dataset.level = "ok";
    fill.setAttribute("stroke-dashoffset", String(ARC));
    text.textContent = "unlimited";
    return;
  }
  const share = value.limit > 0 ? Math.min(1, value.used / value.limit) : 1;
  el.dataset.used = String(value.used);
  el.dataset.limit = String(value.limit);
  el.dataset.level = share >= 0.9 ? "bad" : share >= 0.7 ? "warn" : "ok";
  fill.setAttribute("stroke-dashoffset", String(ARC * (1 - share)));
  text.textContent = el.dataset.dimension === "spend"
    ? `${money(value.used)} / ${money(value.limit)}`
    : `${value.used.toLocaleString()} / ${value.limit.toLocaleString()}`;
}

// Micro-units as an amount of the operator's currency, to the micro-unit (no symbol:
// the currency is whatever the prices were written in).
function money(micro) {
  return (micro / MICRO).toLocaleString(undefined, {
    minimumFractionDigits: 2,
    maximumFractionDigits: 6,
  });
}

function trimHistory(entry) {
  const oldest = Date.now() - HISTORY_MS;
  // Keep one point older than the window, so the line starts at its left edge.
  while (entry.history.length > 1 && entry.history[1].t < oldest) entry.history.shift();
}

function drawChart(entry) {
  const canvas = entry.card.querySelector(".chart");
  const ctx = canvas.getContext("2d");
  const width = canvas.width;
  const height = canvas.height;
  const now = Date.now();
  ctx.clearRect(0, 0, width, height);
  ctx.strokeStyle = "#dde1e8";
  ctx.lineWidth = 1;
  for (const share of [0.5, 1]) {
    const y = height - 2 - share * (height - 6);
    ctx.beginPath();
    ctx.moveTo(0, y);
    ctx.lineTo(width, y);
    ctx.stroke();
  }
  const style = getComputedStyle(document.documentElement);
  for (const dimension of DIMENSIONS) {
    ctx.strokeStyle = style.getPropertyValue("--" + dimension).trim() || "#000";
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    let lastY = null;
    for (const point of entry.history) {
      const share = point[dimension];
      if (share === null || share === undefined) continue;
      const x = Math.max(0, width - ((now - point.t) / HISTORY_MS) * width);
      const y = height - 2 - share * (height - 6);
      if (!started) {
        ctx.moveTo(x, y);
        started = true;
      } else {
        ctx.lineTo(x, lastY); // a step: usage holds until the next reading
        ctx.lineTo(x, y);
      }
      lastY = y;
    }
    if (started) {
      ctx.lineTo(width, lastY);
      ctx.stroke();
      // The current value, visible even before the line has any length.
      ctx.fillStyle = ctx.strokeStyle;
      ctx.beginPath();
      ctx.arc(width - 3, lastY, 3, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
}

function addRejection(event) {
  const row = document.createElement("tr");
  row.dataset.key = event.key;
  let retry = event.retry_after === null ? "never fits" : `${event.retry_after} s`;
  if (event.type === "would_reject") retry = "admitted (shadow mode)";
  const cells = [
    new Date(event.ts).toLocaleTimeString(),
    event.key,
    event.model,
    LABELS[event.dimension] || event.dimension,
    event.dimension === "spend"
      ? `${money(event.used)} / ${money(event.limit)}`
      : `${event.used} / ${event.limit}`,
    event.dimension === "spend" ? money(event.requested) : String(event.requested),
    retry,
    String(event.node),
  ];
  for (const text of cells) {
    const cell = document.createElement("td");
    cell.textContent = text; // never innerHTML: names and models come from outside
    row.appendChild(cell);
  }
  const body = $("#rejections tbody");
  body.insertBefore(row, body.firstChild);
  while (body.children.length > MAX_REJECTIONS) body.removeChild(body.lastChild);
}

// --- page ---------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#auth").addEventListener("submit", (submit) => {
    submit.preventDefault();
    token = $("#token").value.trim();
    filter = $("#filter").value.trim();
    $("#token").value = ""; // out of the DOM too: only `token` holds it
    if (!token) return;
    attempts = 0;
    $("#connect").disabled = true;
    $("#disconnect").disabled = false;
    if (socket) {
      const old = socket;
      socket = null;
      old.close(1000);
    }
    connect();
  });
  $("#disconnect").addEventListener("click", disconnect);
  // The chart scrolls even when no event comes.
  setInterval(() => {
    for (const entry of keys.values()) {
      trimHistory(entry);
      drawChart(entry);
    }
  }, 1000);
});
