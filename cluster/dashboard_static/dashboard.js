// FleetLM dashboard: polls dashboard/data and draws it with uPlot (vendored, see VENDORED.md).
// Plain ES2017, no build step. The browser sends the API key (HTTP Basic) with every request.
"use strict";

const POLL_MS = 5000;
const WIDTH = 420, HEIGHT = 180;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];
const charts = new Map();  // chart id -> {plot, keys}

// Per model: [id, title, unit, [[series key, label], ...]]
const MODEL_CHARTS = [
  ["replicas", "Replicas", "", [["replicas", "replicas"]]],
  ["queue", "Queue depth", "requests", [["waiting", "waiting"], ["running", "running"]]],
  ["kv", "KV cache usage (max over replicas)", "%", [["kv_usage", "KV usage"]]],
  ["ttft", "Time to first token", "s", [["ttft_p50", "p50"], ["ttft_p90", "p90"], ["ttft_p99", "p99"]]],
  ["tpot", "Time per output token", "s", [["tpot_p50", "p50"], ["tpot_p90", "p90"], ["tpot_p99", "p99"]]],
  ["tokens", "Tokens per second", "tok/s", [["tokens_per_s", "generated"], ["prompt_tokens_per_s", "prompt"]]],
  ["hits", "Prefix cache hit rate", "%", [["hit_rate", "hit rate"]]],
];

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function chartBox(parent, id, title) {
  let box = document.getElementById(id);
  if (!box) {
    box = el("div", {id: id, class: "chart"});
    box.appendChild(el("div", {class: "title"}, title));
    parent.appendChild(box);
  }
  return box;
}

function scaled(values, unit) {
  return unit === "%" ? values.map(v => (v === null ? null : 100 * v)) : values;
}

function draw(parent, id, title, unit, t, lines) {
  const box = chartBox(parent, id, title);
  const data = [t, ...lines.map(l => scaled(l.values, unit))];
  const have = data.slice(1).some(col => col.some(v => v !== null));
  box.dataset.points = String(data.slice(1).reduce((n, col) => n + col.filter(v => v !== null).length, 0));
  const key = lines.map(l => l.label).join("|");
  let c = charts.get(id);
  if (c && c.key !== key) { c.plot.destroy(); charts.delete(id); c = undefined; }
  if (!c) {
    const opts = {
      width: WIDTH, height: HEIGHT,
      scales: {x: {time: true}},
      axes: [{}, {label: unit, size: 56}],
      series: [{}, ...lines.map((l, i) => ({label: l.label, stroke: COLORS[i % COLORS.length], width: 2,
                                            spanGaps: true}))],
    };
    c = {plot: new uPlot(opts, data, box), key: key};
    charts.set(id, c);
  } else {
    c.plot.setData(data);
  }
  box.classList.toggle("has-data", have);
}

function render(d) {
  document.getElementById("period").textContent = d.period_s;
  document.getElementById("window").textContent = d.window_s;
  const models = document.getElementById("models");
  for (const [model, rows] of Object.entries(d.models)) {
    const sid = "model-" + model.replace(/[^A-Za-z0-9_-]/g, "_");
    let sec = document.getElementById(sid);
    if (!sec) {
      sec = el("div", {id: sid});
      sec.appendChild(el("h2", {}, model));
      sec.appendChild(el("div", {class: "grid"}));
      models.appendChild(sec);
    }
    const grid = sec.querySelector(".grid");
    for (const [cid, title, unit, keys] of MODEL_CHARTS) {
      draw(grid, sid + "-" + cid, title, unit, rows.t,
           keys.map(([k, label]) => ({label: label, values: rows[k]})));
    }
  }
  const scaling = document.getElementById("scaling");
  for (const [dep, rows] of Object.entries(d.deployments)) {
    draw(scaling, "dep-" + dep.replace(/[^A-Za-z0-9_-]/g, "_"), dep, "replicas", rows.t,
         [{label: "running", values: rows.running}, {label: "wanted", values: rows.wanted}]);
  }
  const body = document.querySelector("#events tbody");
  body.replaceChildren(...d.events.slice().reverse().map(e => {
    const tr = el("tr");
    tr.appendChild(el("td", {}, new Date(e.t * 1000).toLocaleTimeString()));
    tr.appendChild(el("td", {}, e.deployment));
    tr.appendChild(el("td", {}, e.kind));
    tr.appendChild(el("td", {}, e.from + " \u2192 " + e.to));
    return tr;
  }));
  if (!d.events.length) {
    const tr = el("tr");
    tr.appendChild(el("td", {colspan: "4", class: "hint"}, "no scaling decision in the last minutes"));
    body.appendChild(tr);
  }
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("dashboard/data", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    status.textContent = "live";
    status.className = "status ok";
  } catch (e) {
    status.textContent = "no data: " + e.message;
    status.className = "status err";
  }
  setTimeout(poll, POLL_MS);
}

poll();
