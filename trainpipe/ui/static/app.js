// trainpipe ui: charts (uPlot), live polling of server-rendered fragments, the verify button.
// No inline script anywhere (the CSP forbids it); data arrives as JSON in <script type="application/json">.
"use strict";

const COLORS = ["#1f77b4", "#d9480f", "#2b8a3e", "#7048e8", "#c2255c", "#0c8599", "#e67700", "#495057"];
const POLL_MS = 1500;
const charts = [];

function readJSON(id) {
  const el = document.getElementById(id);
  return el ? JSON.parse(el.textContent) : null;
}

function chartWidth(area) {
  return Math.max(320, Math.min(560, (area.clientWidth || 900) / 2 - 24));
}

// One chart: x = step; series = {label: [[step, value], ...]}. uPlot.join aligns the x values of
// series that logged different steps; gaps are bridged.
function lineChart(area, title, series, opts) {
  const labels = Object.keys(series);
  const data = uPlot.join(labels.map((l) => [series[l].map((p) => p[0]), series[l].map((p) => p[1])]));
  const box = document.createElement("div");
  box.className = "chart";
  box.dataset.title = title;
  area.appendChild(box);
  const plot = new uPlot({
    title: title, width: chartWidth(area), height: 240,
    scales: { x: { time: false } },
    axes: [{ label: (opts && opts.xLabel) || "step" }, {}],
    cursor: { drag: { x: true, y: false } },  // drag to zoom, double-click to reset
    series: [{ label: (opts && opts.xLabel) || "step" }].concat(labels.map((l, i) => ({
      label: l, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
      points: { show: (opts && opts.points) || data[0].length < 40 },
    }))),
  }, data, box);
  box.dataset.points = String(data[0].length);
  box.uplot = plot;  // what was drawn, for a test to read back
  return { plot: plot, labels: labels, box: box };
}

function drawRunCharts(payload) {
  const area = document.getElementById("chart-area");
  if (!area) return;
  charts.splice(0).forEach((c) => c.plot.destroy());
  area.textContent = "";
  for (const chart of payload) {
    for (const [name, points] of Object.entries(chart.curves)) {
      // A stage taken from the stage cache: the curves of the run that trained it, and the title says so.
      const from = chart.origin ? " (from the cache: run " + chart.origin + ")" : "";
      const entry = lineChart(area, chart.stage + " · " + name + from, { [name]: points });
      entry.key = chart.stage + "/" + name + "/" + points.length;
      charts.push(entry);
    }
  }
  const none = document.getElementById("no-curves");
  if (none) none.hidden = payload.length > 0;
}

function runChartsKey(payload) {
  return payload.map((c) => Object.entries(c.curves).map(([n, p]) => c.stage + "/" + n + "/" + p.length).join()).join();
}

async function poll(container) {
  const url = container.dataset.poll;
  try {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (!response.ok) return true;
    const html = await response.text();  // rendered and escaped by the server (Jinja2 autoescape)
    container.innerHTML = html;
    container.dataset.updated = String(Date.now());
    const state = container.querySelector("#run-state");
    return !(state && !["pending", "running"].includes(state.textContent.trim()));
  } catch (e) {
    return true;  // the server restarting: try again next tick
  }
}

function startPolling(container, onTick) {
  const tick = async () => {
    if (document.hidden) { setTimeout(tick, POLL_MS); return; }
    const more = await poll(container);
    if (onTick) await onTick();
    if (more) setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

function setupRun() {
  const dataEl = document.getElementById("charts-data");
  if (!dataEl) return;
  let payload = JSON.parse(dataEl.textContent);
  drawRunCharts(payload);
  let key = runChartsKey(payload);
  const live = document.getElementById("run-live");
  const bottom = document.getElementById("run-live-bottom");
  if (live && live.dataset.poll) {
    startPolling(live, async () => {
      await poll(bottom);
      const response = await fetch(dataEl.dataset.src, { credentials: "same-origin" });
      if (!response.ok) return;
      payload = (await response.json()).charts;
      const next = runChartsKey(payload);
      if (next !== key) { key = next; drawRunCharts(payload); }
    });
  }
  const button = document.getElementById("verify-btn");
  if (button) {
    button.addEventListener("click", async () => {
      const out = document.getElementById("verify-result");
      button.disabled = true;
      out.textContent = "re-hashing…";
      const response = await fetch(button.dataset.src, { credentials: "same-origin" });
      out.innerHTML = await response.text();  // server-rendered, escaped
      button.disabled = false;
    });
  }
}

function setupRuns() {
  const live = document.getElementById("runs-live");
  if (!live) return;
  const keepChecked = () => new Set([...live.querySelectorAll("input[name=run]:checked")].map((i) => i.value));
  const tick = async () => {
    if (!document.hidden) {
      const checked = keepChecked();
      await poll(live);
      live.querySelectorAll("input[name=run]").forEach((i) => { i.checked = checked.has(i.value); });
    }
    setTimeout(tick, POLL_MS * 1.5);
  };
  setTimeout(tick, POLL_MS * 1.5);
}

function setupCompare() {
  const overlay = readJSON("overlay-data");
  const area = document.getElementById("overlay-area");
  if (!overlay || !area) return;
  for (const chart of overlay) lineChart(area, chart.title, chart.series);
}

function drawObjective(area, data, previous) {
  if (previous) { previous.plot.destroy(); previous.box.remove(); }
  if (!data.points.length) return null;
  const series = { [data.metric]: data.points.map((p) => [p[0], p[1]]) };
  const entry = lineChart(area, data.metric + " per trial (drag to zoom)", series, { xLabel: "trial", points: true });
  entry.plot.setSeries(1, { width: 0 });
  return entry;
}

// A running sweep's page follows it: every tick fetches /api/sweeps/{id} (JSON: the state, the chart's
// points, and the head-and-table and best-trial parts rendered and escaped by the server) and swaps
// them in, until the sweep is no longer running.
function setupSweep() {
  const dataEl = document.getElementById("objective-data");
  const area = document.getElementById("objective-chart");
  if (!dataEl || !area) return;
  const data = JSON.parse(dataEl.textContent);
  let chart = drawObjective(area, data, null);
  let key = JSON.stringify(data.points);
  const live = document.getElementById("sweep-live");
  const best = document.getElementById("sweep-best");
  if (!live || live.dataset.state !== "running") return;
  const tick = async () => {
    let more = true;
    if (!document.hidden) {
      try {
        const response = await fetch(dataEl.dataset.src, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (response.ok) {
          const next = await response.json();
          live.innerHTML = next.html.top;
          best.innerHTML = next.html.best;
          live.dataset.state = next.state;
          live.dataset.updated = String(Date.now());
          const nextKey = JSON.stringify(next.points);
          if (nextKey !== key) { key = nextKey; chart = drawObjective(area, next, chart); }
          more = next.state === "running";
        }
      } catch (e) {
        // the server restarting: try again next tick
      }
    }
    if (more) setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  setupRuns();
  setupRun();
  setupCompare();
  setupSweep();
});
