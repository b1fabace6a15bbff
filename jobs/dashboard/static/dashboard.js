"use strict";
// A run's page: polls /api/run/ID/records and /status about once a second and redraws the charts
// with plotly.js. The x axis of every step chart is the job's step: each stage's steps follow the
// previous stages' planned steps, with a dashed line and the stage's name where it starts.
// window.moeforge holds what the page has (its records, the last redraw), for tests and the console.

const RUN_ID = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const POLL_MS = 1000;
const MAX_HEAT_COLUMNS = 600;
const STATE_COLORS = { done: "#2e7d32", running: "#1565c0", preempted: "#ef6c00", failed: "#b3261e", pending: "#9aa3ad",
                       dead: "#d7ccc8", interrupted: "#6d4c41" };  // dead: light, hatched dark (below)
// Stage events (RUN/events.jsonl) drawn on the timeline; "started" and "finished" are the bars' ends.
const EVENT_MARKERS = { preempted: { symbol: "x-thin-open", color: "#ef6c00" }, resumed: { symbol: "triangle-right", color: "#00838f" },
                        resized: { symbol: "diamond-wide-open", color: "#6a1b9a" }, failed: { symbol: "x", color: "#b3261e" } };
// An elastic stage's resize: "4 -> 2 workers" (of the requested size when below it).
const resizeText = ev => ev.kind === "resized" && ev.world_size != null
  ? `: ${ev.from_world_size} -> ${ev.world_size} workers${ev.requested_world_size > ev.world_size ? ` (of ${ev.requested_world_size})` : ""}` : "";

// Each step chart: the series it draws (exact keys, or a pattern whose first group names the trace).
const CHARTS = [
  { id: "loss", title: "Training loss (total, cross-entropy)", keys: ["loss", "ce"] },
  { id: "aux", title: "Auxiliary losses: load balancing, z-loss, KD", keys: ["lbl", "z_loss", "kd"], log: true },
  { id: "eval", title: "Held-out loss per domain", match: /^eval\/([^/]+)\/loss$/, markers: true },
  { id: "lr", title: "Learning rate", keys: ["lr"] },
  { id: "throughput", title: "Throughput: tokens per second, all ranks", keys: ["tokens_per_s"] },
  { id: "grad_norm", title: "Gradient norm (before clipping)", keys: ["grad_norm"] },
  { id: "max_over_mean", title: "Expert load: busiest expert / mean, per MoE layer", match: /^moe\/(\d+)\/max_over_mean$/, prefix: "layer " },
  // The straggler ratio (about 1-2) on its own right-hand axis: on the copies' axis (0 to tens) it would be a flat line.
  { id: "ep", title: "ep/fssdp: straggler (busiest rank / mean), expert copies", keys: ["ep/straggler", "ep/copies", "ep/peak_copies_rank"],
    y2: ["ep/straggler"], ytitle: "copies", y2title: "straggler ratio" },
  { id: "replay", title: "Replay share delivered (this step, whole stage)", keys: ["data/replay_fraction", "data/replay_fraction_total"] },
  { id: "continual", title: "Continual: forgetting, adaptation, stability-gap depth", keys: ["cl/forgetting", "cl/adaptation", "cl/old/gap_depth", "cl/new/gap_depth"], markers: true },
  { id: "distill", title: "Distillation: top-1 agreement, teacher's missing mass", keys: ["agreement", "teacher_missing_mass"], match: /^eval\/([^/]+)\/teacher_agreement$/, prefix: "held-out " },
];

const S = window.moeforge = { run: RUN_ID, gen: -1, next: 0, records: [], status: null, draws: 0, lastDraw: null, error: null };

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
}

async function pull() {
  let changed = false;
  for (let i = 0; i < 200; i++) {  // at most 200 pages (1M records) per look
    const j = await getJSON(`/api/run/${encodeURIComponent(RUN_ID)}/records?gen=${S.gen}&since=${S.next}`);
    if (j.reset) { S.records = []; changed = true; }
    S.gen = j.gen;
    if (j.records.length) { S.records.push(...j.records); changed = true; }
    S.next = j.next;
    if (S.next >= j.total) break;
  }
  const status = await getJSON(`/api/run/${encodeURIComponent(RUN_ID)}/status`);
  const drawn = st => st && JSON.stringify([st.stages, st.events, st.liveness && st.liveness.state]);
  if (drawn(status) !== drawn(S.status)) changed = true;
  S.status = status;
  return changed;
}

// Stage order (planned first) and where each stage starts on the job-step axis.
function stageOffsets() {
  const order = (S.status ? S.status.stages : []).map(s => s.name);
  const planned = Object.fromEntries((S.status ? S.status.stages : []).map(s => [s.name, s.steps]));
  const maxStep = {};
  for (const r of S.records) {
    if (!order.includes(r.stage)) order.push(r.stage);
    maxStep[r.stage] = Math.max(maxStep[r.stage] || 0, r.step);
  }
  const offset = {};
  let at = 0;
  for (const name of order) {
    offset[name] = at;
    at += Math.max(planned[name] || 0, maxStep[name] || 0);
  }
  return { order, offset };
}

function seriesOf(chart) {
  const out = new Map();  // trace name -> {x, y, customdata}
  const add = (name, r, v, off) => {
    if (v == null || typeof v !== "number") return;
    if (!out.has(name)) out.set(name, { x: [], y: [], customdata: [] });
    const s = out.get(name);
    s.x.push(off[r.stage] + r.step); s.y.push(v); s.customdata.push([r.stage, r.step]);
  };
  const { offset } = stageOffsets();
  for (const r of S.records) {
    for (const k of chart.keys || []) if (k in r) add(k, r, r[k], offset);
    if (chart.match) {
      for (const k in r) {
        const m = chart.match.exec(k);
        if (m) add((chart.prefix || "") + m[1], r, r[k], offset);
      }
    }
  }
  return out;
}

function stageShapes() {
  const { order, offset } = stageOffsets();
  const shapes = [], annotations = [];
  for (const name of order) {
    shapes.push({ type: "line", xref: "x", yref: "paper", x0: offset[name], x1: offset[name], y0: 0, y1: 1,
                  line: { dash: "dot", width: 1, color: "#8a939e" } });
    annotations.push({ xref: "x", yref: "paper", x: offset[name], y: 1, text: name, showarrow: false,
                       xanchor: "left", yanchor: "bottom", font: { size: 10, color: "#68717d" } });
  }
  return { shapes, annotations };
}

// Titles on the left (plotly's mode bar sits on the right); the x axis (job step) is said once, in the page.
const BASE_LAYOUT = { margin: { l: 60, r: 20, t: 42, b: 30 }, legend: { orientation: "h", y: -0.12 },
                      font: { size: 11 }, hovermode: "x unified", paper_bgcolor: "#fff", plot_bgcolor: "#fff" };
const CONFIG = { displaylogo: false, responsive: true };

function drawStepCharts() {
  const grid = document.getElementById("grid");
  const absent = [];
  const deco = stageShapes();
  for (const c of CHARTS) {
    const series = seriesOf(c);
    let div = document.getElementById(`chart-${c.id}`);
    if (!series.size) {
      absent.push(c.title.split(":")[0]);
      if (div) div.hidden = true;
      continue;
    }
    if (!div) {
      div = document.createElement("div");
      div.id = `chart-${c.id}`;
      div.className = "chart";
      grid.appendChild(div);
    }
    div.hidden = false;
    const traces = [...series.entries()].map(([name, s]) => ({
      // SVG while it is cheap (no WebGL needed); WebGL for long series.
      name, x: s.x, y: s.y, customdata: s.customdata, type: s.x.length > 5000 ? "scattergl" : "scatter",
      mode: c.markers ? "lines+markers" : "lines", yaxis: (c.y2 || []).includes(name) ? "y2" : "y",
      hovertemplate: "%{y:.4g}<br>%{customdata[0]} step %{customdata[1]}",
    }));
    const layout = { ...BASE_LAYOUT, title: { text: c.title, x: 0.01, xanchor: "left", font: { size: 13 } }, ...deco,
                     yaxis: { type: c.log ? "log" : "linear", title: c.ytitle ? { text: c.ytitle } : undefined },
                     uirevision: c.id };
    if (c.y2) {
      layout.yaxis2 = { overlaying: "y", side: "right", showgrid: false, tickmode: "auto", title: { text: c.y2title } };
      layout.margin = { ...BASE_LAYOUT.margin, r: 60 };
    }
    Plotly.react(div, traces, layout, CONFIG);
  }
  document.getElementById("absent").textContent = absent.length ? `Not in this run: ${absent.join("; ")}.` : "";
}

function drawHeatmap() {
  const layers = new Set();
  for (const r of S.records) for (const k in r) { const m = /^moe\/(\d+)\/tokens_per_expert$/.exec(k); if (m) layers.add(+m[1]); }
  const sel = document.getElementById("layer");
  const want = [...layers].sort((a, b) => a - b);
  if (sel.options.length !== want.length) {
    const keep = sel.value;
    sel.replaceChildren(...want.map(l => new Option(`${l}`, `${l}`)));
    if (keep !== "" && want.includes(+keep)) sel.value = keep;
  }
  const div = document.getElementById("chart-heatmap");
  div.parentElement.hidden = !want.length;
  if (!want.length) return;
  const layer = +sel.value;
  const key = `moe/${layer}/tokens_per_expert`;
  const { offset } = stageOffsets();
  const rows = S.records.filter(r => Array.isArray(r[key]));
  const stride = Math.max(1, Math.ceil(rows.length / MAX_HEAT_COLUMNS));
  const x = [], cols = [];
  for (let i = 0; i < rows.length; i += stride) {
    const r = rows[i], counts = r[key];
    const mean = counts.reduce((a, b) => a + b, 0) / counts.length;
    x.push(offset[r.stage] + r.step);
    cols.push(counts.map(c => (mean > 0 ? c / mean : 0)));
  }
  const nExp = cols.length ? cols[0].length : 0;
  const z = Array.from({ length: nExp }, (_, e) => cols.map(col => col[e]));
  const layout = { ...BASE_LAYOUT, ...stageShapes(), hovermode: "closest", margin: { l: 60, r: 20, t: 42, b: 48 },
                   title: { text: `Expert load over steps, MoE layer ${layer}` + (stride > 1 ? ` (every ${stride}th step)` : ""),
                            x: 0.01, xanchor: "left", font: { size: 13 } },
                   xaxis: { title: { text: "job step" } }, yaxis: { title: { text: "expert" }, dtick: nExp > 16 ? undefined : 1 },
                   uirevision: "heat" };
  Plotly.react(div, [{ type: "heatmap", x, y: [...Array(nExp).keys()], z, colorscale: "Viridis", zmin: 0,
                       colorbar: { title: { text: "/ mean" } },
                       hovertemplate: "expert %{y}, step %{x}: %{z:.2f} × mean<extra></extra>" }], layout, CONFIG);
}

const iso = t => new Date(t * 1000).toISOString();

// Stages over wall-clock time: from a stage's first metrics line to its last (a dead driver's stage
// hatched), with the stage events of RUN/events.jsonl (preempted, resumed, resized, failed) as markers on its row.
function drawTimeline() {
  const stages = S.status ? S.status.stages : [];
  const span = {};
  for (const r of S.records) {
    const s = span[r.stage] || (span[r.stage] = { t0: r.time, t1: r.time, step: 0 });
    s.t0 = Math.min(s.t0, r.time); s.t1 = Math.max(s.t1, r.time); s.step = Math.max(s.step, r.step);
  }
  const y = [], base = [], x = [], colors = [], patterns = [], fonts = [], text = [], bars = [];
  let t0 = Infinity, t1 = -Infinity;
  for (const st of stages) {
    const s = span[st.name];
    y.push(st.name);
    colors.push(STATE_COLORS[st.state] || "#555");
    patterns.push(st.state === "dead" ? "/" : "");
    fonts.push(st.state === "dead" ? "#3e2723" : "#fff");
    const steps = s ? `step ${s.step}${st.steps ? ` of ${st.steps}` : ""}` : "";
    text.push(`${st.state}${steps ? ", " + steps : ""}`);
    if (s) {
      const end = Math.max(s.t1, s.t0 + 1);
      base.push(iso(s.t0)); x.push((end - s.t0) * 1000);
      bars.push({ start: s.t0, end, label: text[text.length - 1] });
      t0 = Math.min(t0, s.t0); t1 = Math.max(t1, end);
    } else { base.push(null); x.push(0); }
  }
  const marks = { x: [], y: [], symbol: [], color: [], text: [] };
  for (const ev of (S.status && S.status.events) || []) {
    const m = EVENT_MARKERS[ev.kind];
    if (!m || ev.stage == null) continue;
    marks.x.push(iso(ev.time)); marks.y.push(ev.stage); marks.symbol.push(m.symbol); marks.color.push(m.color);
    marks.text.push(`${ev.kind}${ev.step != null ? " at step " + ev.step : ""}${resizeText(ev)}`);
    t0 = Math.min(t0, ev.time); t1 = Math.max(t1, ev.time);
  }
  const margin = { l: 90, r: 20, t: 34, b: 30 };
  const layout = { ...BASE_LAYOUT, hovermode: "closest", margin, showlegend: false,
                   title: { text: "Stages over time", x: 0.01, xanchor: "left", font: { size: 13 } },
                   xaxis: { type: "date", range: t1 >= t0 ? timelineRange(bars, t0, t1, margin) : undefined },
                   yaxis: { autorange: "reversed" }, uirevision: "timeline" };
  const traces = [{ type: "bar", orientation: "h", y, x, base, text, textposition: "auto", name: "stages",
                    insidetextanchor: "start", cliponaxis: false, insidetextfont: { color: fonts },
                    marker: { color: colors, pattern: { shape: patterns, fgcolor: "#3e2723", solidity: 0.25 } },
                    hovertemplate: "%{y}: %{text}<extra></extra>" }];
  if (marks.x.length) {
    traces.push({ type: "scatter", mode: "markers", name: "events", x: marks.x, y: marks.y, text: marks.text,
                  marker: { symbol: marks.symbol, color: marks.color, size: 13, line: { width: 2, color: marks.color } },
                  hovertemplate: "%{y}: %{text}<br>%{x}<extra></extra>" });
  }
  Plotly.react("chart-timeline", traces, layout, CONFIG);
}

// The time axis's range: the bars and events, plus room on the right for a label that plotly puts
// after a bar too short to hold it (the running stage's, early on), which the edge would cut.
function timelineRange(bars, t0, t1, margin) {
  const plotPx = Math.max(200, document.getElementById("chart-timeline").clientWidth - margin.l - margin.r);
  const labelPx = label => 6.5 * label.length + 12;  // font size 11, plus plotly's padding
  let width = Math.max(1, t1 - t0);
  for (let pass = 0; pass < 3; pass++) {  // widening the range narrows the bars: look again
    for (const b of bars) {
      const need = labelPx(b.label);
      if ((b.end - b.start) / width * plotPx < need) width = Math.max(width, (b.end - t0) * plotPx / Math.max(plotPx - need, plotPx / 3));
    }
  }
  const pad = 0.01 * width;
  return [iso(t0 - pad), iso(t0 + width + pad)];
}

function drawStatus() {
  const el = document.getElementById("status");
  if (!S.status) return;
  const now = S.status.now, last = S.status.metrics_mtime;
  const live = S.status.liveness || { state: "unknown" };  // "unknown": a run from before heartbeats
  const driver = `the driver on ${live.host} (pid ${live.pid})`;
  const running = S.status.stages.find(s => s.state === "running");
  const failed = S.status.stages.find(s => s.state === "failed");
  const lastRec = S.records[S.records.length - 1];
  const parts = [];
  let cls = "muted";
  if (live.state === "dead") {
    parts.push(`DEAD: ${driver} has not written its heartbeat for ${live.age_s.toFixed(0)} s (killed, or its host is gone); ` +
               "run the same command again to resume");
    cls = "state-dead";
  } else if (failed) { parts.push(`stage ${failed.name} failed: ${failed.detail}`); cls = "state-failed"; }
  else if (live.state === "interrupted") parts.push(`interrupted: ${driver} was stopped (Ctrl-C); run the same command again to resume`);
  else if (running && lastRec) parts.push(`stage ${running.name}: step ${lastRec.step}${running.steps ? " of " + running.steps : ""}`);
  else if (S.status.stages.length && S.status.stages.every(s => s.state === "done")) parts.push("finished");
  else if (S.status.stages.some(s => s.state === "preempted")) parts.push("preempted: run the same command again to resume");
  else if (live.state === "running") parts.push("starting");
  parts.push(`${S.records.length} metric lines`);
  if (last != null) parts.push(`last written ${Math.max(0, now - last).toFixed(0)} s ago`);
  if (live.state === "running") parts.push(`${driver}, heartbeat ${Math.max(0, live.age_s).toFixed(0)} s ago`);
  el.textContent = parts.join(" · ");
  el.className = cls;
}

function draw() {
  drawStatus();
  drawTimeline();
  drawStepCharts();
  drawHeatmap();
  S.draws += 1;
  S.lastDraw = { at: Date.now(), records: S.records.length,
                 lastStep: Object.fromEntries(S.records.map(r => [r.stage, r.step])) };
}

async function loop() {
  try {
    const changed = await pull();
    S.error = null;
    if (changed || !S.draws) draw(); else drawStatus();
  } catch (e) {
    S.error = String(e);
    document.getElementById("status").textContent = `cannot reach the dashboard server: ${e}`;
  }
  setTimeout(loop, POLL_MS);
}

document.getElementById("run-name").textContent = RUN_ID;
document.title = `moeforge: ${RUN_ID}`;
document.getElementById("layer").addEventListener("change", drawHeatmap);
loop();
