// fledger dashboard: polls /api/fleet and redraws; no framework, no inline script (CSP).
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
// The central evaluation if the coordinator runs one (--evaluate), else what the devices reported.
const PREFERRED_METRICS = ["test_accuracy", "test_mse", "clients_test_accuracy", "clients_test_mse",
  "clients_global_test_accuracy", "clients_global_test_mse", "clients_train_loss"];

function $(id) { return document.getElementById(id); }

function text(id, value) { $(id).textContent = value; }

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  return Math.abs(value) >= 1000 || Number.isInteger(value) ? String(value) : value.toPrecision(4);
}

function fillTable(id, rows) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell !== null && typeof cell === "object") {
        td.textContent = cell.text;
        if (cell.cls) td.className = cell.cls;
      } else {
        td.textContent = cell;
      }
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

function chooseMetric(rounds) {
  const names = new Set();
  for (const r of rounds) {
    for (const [k, v] of Object.entries(r.metrics || {})) if (typeof v === "number") names.add(k);
  }
  for (const name of PREFERRED_METRICS) if (names.has(name)) return name;
  return names.size ? [...names].sort()[0] : null;
}

function el(name, attrs, content) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (content !== undefined) node.textContent = content;
  return node;
}

function drawChart(rounds, metric) {
  const svg = $("chart");
  svg.replaceChildren();
  const points = rounds.filter(r => typeof (r.metrics || {})[metric] === "number")
    .map(r => [r.round, r.metrics[metric]]);
  // As wide as the card, so the labels keep their size.
  const W = Math.max(360, Math.round(svg.getBoundingClientRect().width) || 720), H = 240, L = 60, R = 16, T = 14,
    B = 30;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}));
  svg.appendChild(el("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}));
  if (!points.length) {
    svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "waiting for the first round"));
    return;
  }
  const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const pad = (y1 - y0) * 0.1 || Math.abs(y0) * 0.1 || 1;
  y0 -= pad; y1 += pad;
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    svg.appendChild(el("line", {x1: L, y1: sy(y), x2: W - R, y2: sy(y), class: "grid"}));
    svg.appendChild(el("text", {x: L - 6, y: sy(y) + 4, "text-anchor": "end"}, fmt(y)));
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 10));
  for (let x = Math.ceil(x0); x <= x1; x += step) {
    svg.appendChild(el("text", {x: sx(x), y: H - B + 16, "text-anchor": "middle"}, String(x)));
  }
  svg.appendChild(el("text", {x: W - R, y: H - 2, "text-anchor": "end"}, "round"));
  svg.appendChild(el("polyline", {points: points.map(p => `${sx(p[0])},${sy(p[1])}`).join(" "), class: "line"}));
  for (const [x, y] of points) {
    const dot = el("circle", {cx: sx(x), cy: sy(y), r: 4, class: "dot"});
    dot.appendChild(el("title", {}, `round ${x}: ${metric} ${fmt(y)}`));
    svg.appendChild(dot);
  }
}

function render(fleet) {
  const status = fleet.status || {};
  const rounds = fleet.rounds || [];
  text("fleet", fleet.fleet);
  text("task", fleet.task || "?");
  text("round", fmt(status.round));
  text("height", fmt(fleet.ledger.height));
  text("head", (fleet.ledger.head || "").slice(0, 16) || "?");
  const state = status.state || "unknown";
  text("state", state);
  $("state").className = "badge " + state;
  text("updated", "updated " + new Date().toLocaleTimeString());
  if (status.halted) {
    $("problem").hidden = false;
    text("problem", "halted: " + status.halted);
  } else {
    $("problem").hidden = true;
  }

  const metric = chooseMetric(rounds);
  text("metric-name", metric || "no round aggregated yet");
  drawChart(rounds, metric);

  const accepted = status.accepted || [];
  text("open-round", status.round === undefined ? "…" :
    state === "done" ? `training finished at round ${status.round - 1}` :
    `round ${status.round}: ${accepted.length} of ${status.min_clients} updates`);
  const openRejected = Object.entries((fleet.open_round || {}).rejected || {}).map(([k, v]) => `${k} ${v}`);
  text("open-detail", (status.waiting_for ? `waiting for ${status.waiting_for} more` : "") +
    (openRejected.length ? ` · rejected in this round: ${openRejected.join(", ")}` : ""));

  const presence = status.presence || {};
  const devices = [...new Set([...Object.keys(presence), ...Object.keys(status.datasets || {})])].sort();
  text("online-count", String(devices.filter(d => presence[d] === "online").length));
  fillTable("devices", devices.map(d => [d, {text: presence[d] || "never seen", cls: presence[d] || ""},
    accepted.includes(d) ? "update accepted" : ""]));

  const rejections = Object.entries(status.rejections || {}).sort((a, b) => b[1] - a[1]);
  fillTable("rejections", rejections);
  $("no-rejections").hidden = rejections.length > 0;

  fillTable("rounds", rounds.slice().reverse().map(r => [
    r.round, r.participants.join(", "), fmt(r.num_samples), metric ? fmt(r.metrics[metric]) : "–",
    Object.entries(r.rejected || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "0",
    `${r.block} ${r.hash.slice(0, 12)}`]));
  fillTable("blocks", (fleet.ledger.recent || []).map(b => [
    b.index, new Date(b.time * 1000).toLocaleTimeString(), b.what, b.hash.slice(0, 16)]));
}

async function poll() {
  try {
    const response = await fetch("/api/fleet", {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (err) {
    $("problem").hidden = false;
    text("problem", `cannot reach the coordinator (${err.message}); retrying`);
    text("state", "offline");
    $("state").className = "badge offline";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
