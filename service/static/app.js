// archopt's page: asks POST /v1/query and draws its answer (no framework, no build step).
// Every number shown comes from the archopt.query/1 document; each point and row carries the raw
// value in a data- attribute, so what is drawn can be checked against the API.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const state = { models: {}, model: null, doc: null, selected: null, retry: null };
const $ = (id) => document.getElementById(id);

// --- formatting (as the CLI prints: Python's "{:.4g}" and "{:,}") --------------------------------
function g4(x) {
  if (x === null || x === undefined) return "-";
  if (x === 0) return "0";
  const exp = Math.floor(Math.log10(Math.abs(x)));
  if (exp < -4 || exp >= 4) {
    const [m, e] = x.toExponential(3).split("e");
    const mant = m.includes(".") ? m.replace(/0+$/, "").replace(/\.$/, "") : m;
    const n = parseInt(e, 10);
    return `${mant}e${n < 0 ? "-" : "+"}${String(Math.abs(n)).padStart(2, "0")}`;
  }
  const s = x.toPrecision(4);
  return s.includes(".") ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
}
const g2 = (x) => (x === null || x === undefined ? "-" : Number(x.toPrecision(2)).toString());
const commas = (n) => n.toLocaleString("en-US");
function size(n, digits) {
  for (const [s, v] of [["T", 1e12], ["B", 1e9], ["M", 1e6], ["K", 1e3]]) {
    if (n >= v) return (n / v).toFixed(digits === undefined ? (v >= 1e9 ? 2 : 1) : digits) + s;
  }
  return String(Math.round(n));
}
// Tick labels that tell the ticks apart: the fewest digits (from `from`) giving distinct labels.
function distinctLabels(values, label, from) {
  const wanted = new Set(values).size;
  for (let d = from; d < from + 8; d++) {
    const out = values.map((v) => label(v, d));
    if (new Set(out).size >= wanted) return out;
  }
  return values.map((v) => label(v, from + 8));
}
const sig = (v, d) => String(Number(v.toPrecision(Math.min(21, d))));

// --- API ---------------------------------------------------------------------------------------------
async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let doc = null;
  try { doc = await response.json(); } catch (e) { doc = null; }
  if (!response.ok) {
    const err = new Error(doc && doc.error ? doc.error : `HTTP ${response.status}`);
    err.status = response.status;
    err.retryAfter = parseFloat(response.headers.get("Retry-After") || "");
    throw err;
  }
  return doc;
}

function status(text, kind) {
  const el = $("status");
  el.textContent = text || "";
  el.className = kind || "";
}

// --- models ------------------------------------------------------------------------------------------
async function loadModels() {
  const doc = await api("GET", "/v1/models");
  const select = $("model");
  select.innerHTML = "";
  for (const m of doc.models) {
    state.models[m.name] = m;
    const opt = document.createElement("option");
    opt.value = m.name;
    opt.textContent = `${m.name} (${m.size}, ${m.archs} archs)`;
    select.appendChild(opt);
  }
  if (!doc.models.length) {
    status("The archive holds no base models yet: ingest evaluations first (archopt ingest FILE).", "error");
    return;
  }
  await selectModel(select.value);
}

async function selectModel(name) {
  const info = await api("GET", `/v1/models/${encodeURIComponent(name)}`);
  state.model = info;
  const ppl = info.metrics.filter((m) => m.startsWith("ppl"));
  const select = $("ppl-metric");
  select.innerHTML = "";
  for (const m of (ppl.length ? ppl : ["ppl_wikitext2"])) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = m;
    select.appendChild(opt);
  }
  if (ppl.includes("ppl_wikitext2")) select.value = "ppl_wikitext2";
  const hasMmlu = info.metrics.includes("mmlu");
  $("use-mmlu").disabled = !hasMmlu;
  $("use-mmlu").checked = hasMmlu;
}

// --- query -------------------------------------------------------------------------------------------
function objectives() {
  const out = [$("ppl-metric").value];
  if ($("use-mmlu").checked && !$("use-mmlu").disabled) out.push("mmlu");
  return out;
}

async function runQuery(event) {
  if (event) event.preventDefault();
  clearTimeout(state.retry);
  const body = {
    model: $("model").value, params: $("params").value.trim(), tolerance: $("tolerance").value.trim() || "2%",
    objectives: objectives(), top: parseInt($("top").value, 10) || 10,
  };
  status("Searching…", "busy");
  document.body.dataset.state = "busy";
  try {
    const doc = await api("POST", "/v1/query", body);
    state.doc = doc;
    state.selected = doc.results.length ? doc.results[0].arch_id : null;
    render();
    status("");
    document.body.dataset.queryId = doc.query_id;
    document.body.dataset.state = "done";
  } catch (err) {
    document.body.dataset.state = "error";
    if (err.status === 503 && err.retryAfter > 0) {
      status(`${err.message}. Asking again in ${err.retryAfter} s…`, "busy");
      state.retry = setTimeout(runQuery, err.retryAfter * 1000);
    } else {
      status(err.message, "error");
    }
  }
}

// --- rendering ---------------------------------------------------------------------------------------
function render() {
  const doc = state.doc;
  const versions = Object.entries(doc.predictor_versions).map(([k, v]) => `${k} v${v}`).join(", ");
  const stale = Object.entries(doc.predictors_stale || {}).filter(([, v]) => v).map(([k]) => k);
  $("summary").textContent =
    `${doc.model} at ${size(doc.target_params)} (window ${size(doc.window[0])}–${size(doc.window[1])}): ` +
    `${doc.results.length} Pareto-optimal architectures; predictors ${versions}` +
    (quality(doc) ? ` (${quality(doc)})` : "") +
    (stale.length ? ` (stale: ${stale.join(", ")}; retraining in the background)` : "") +
    `; query #${doc.query_id}${doc.served_from_store ? " served from the store" : ""} in ${Math.round(doc.elapsed_ms)} ms`;
  warningsList(doc.warnings || []);
  const [ppl] = doc.objectives;
  $("caption-ppl").textContent = `Pareto front: parameters against predicted ${ppl}`;
  scatter($("plot-ppl"), doc.results, ppl);
  const hasMmlu = doc.objectives.includes("mmlu");
  $("panel-mmlu").hidden = !hasMmlu;
  if (hasMmlu) scatter($("plot-mmlu"), doc.results, "mmlu");
  table(doc);
  strip();
}

// "gp on 53 rows, CV Kendall τ 0.82, R² 0.75, ± band held 70% of held-out values (nominal 68%)"
function quality(doc) {
  return Object.entries(doc.predictor_quality || {}).map(([metric, q]) => {
    const f2 = (x) => (x === null || x === undefined ? "-" : x.toFixed(2));
    return `${metric}: ${q.algorithm} on ${q.rows} rows, CV Kendall τ ${f2(q.kendall_tau)}, R² ${f2(q.r2)}` +
      (q.coverage === null || q.coverage === undefined ? "" :
        `, ± band held ${Math.round(100 * q.coverage)}% of held-out values (nominal 68%)`);
  }).join("; ");
}

function warningsList(warnings) {
  const list = $("warnings");
  list.innerHTML = "";
  list.hidden = !warnings.length;
  for (const w of warnings) {
    const li = document.createElement("li");
    li.className = "warning";
    li.textContent = w;
    list.appendChild(li);
  }
}

function el(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((k) => k * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
  return out;
}

function scatter(svg, results, metric) {
  svg.innerHTML = "";
  svg.dataset.metric = metric;
  const W = 560, H = 340, L = 64, R = 16, T = 14, B = 44;
  const ys = [];
  for (const r of results) {
    const v = r.predicted[metric], u = r.uncertainty[metric] || 0;
    ys.push(v - u, v + u);
    if (r.measured[metric] !== null && r.measured[metric] !== undefined) ys.push(r.measured[metric]);
  }
  const base = (state.doc.base_measured || {})[metric];
  const hasBase = base !== null && base !== undefined;
  if (hasBase) ys.push(base);
  const xs = results.map((r) => r.params);
  if (!results.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg).textContent = "no results";
    return;
  }
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const padX = (x1 - x0 || x0 * 0.01 || 1) * 0.06, padY = (y1 - y0 || Math.abs(y0) * 0.05 || 1) * 0.08;
  [x0, x1, y0, y1] = [x0 - padX, x1 + padX, y0 - padY, y1 + padY];
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const axes = el("g", { class: "axes" }, svg);
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B }, axes);
  el("line", { x1: L, y1: T, x2: L, y2: H - B }, axes);
  const xt = niceTicks(x0, x1, 5), xl = distinctLabels(xt, (v, d) => size(Math.round(v), d), 1);
  xt.forEach((t, i) => {
    el("line", { x1: sx(t), y1: H - B, x2: sx(t), y2: H - B + 4 }, axes);
    el("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle", class: "tick-x" }, axes).textContent = xl[i];
  });
  const yt = niceTicks(y0, y1, 5), yl = distinctLabels(yt, sig, 4);
  yt.forEach((t, i) => {
    el("line", { x1: L - 4, y1: sy(t), x2: L, y2: sy(t) }, axes);
    el("line", { x1: L, y1: sy(t), x2: W - R, y2: sy(t), class: "grid" }, axes);
    el("text", { x: L - 7, y: sy(t) + 4, "text-anchor": "end", class: "tick-y" }, axes).textContent = yl[i];
  });
  if (hasBase) {
    const ref = el("g", { class: "base-ref", "data-value": base }, svg);
    el("line", { x1: L, y1: sy(base), x2: W - R, y2: sy(base) }, ref);
    el("text", { x: W - R - 4, y: sy(base) - 4, "text-anchor": "end" }, ref).textContent =
      `base model, measured: ${g4(base)}`;
  }
  el("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "label" }, axes).textContent = "parameters";
  el("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "label",
               transform: `rotate(-90 14 ${(T + H - B) / 2})` }, axes).textContent = `predicted ${metric}`;
  const points = el("g", { class: "points" }, svg);
  for (const r of results) {
    const v = r.predicted[metric], u = r.uncertainty[metric] || 0;
    const g = el("g", { class: "point" + (r.arch_id === state.selected ? " selected" : ""),
                        "data-arch-id": r.arch_id }, points);
    el("line", { x1: sx(r.params), x2: sx(r.params), y1: sy(v - u), y2: sy(v + u), class: "err",
                 "data-arch-id": r.arch_id, "data-low": v - u, "data-high": v + u }, g);
    const c = el("circle", { cx: sx(r.params), cy: sy(v), r: 5, class: "pt-pred", "data-arch-id": r.arch_id,
                             "data-rank": r.rank, "data-params": r.params, "data-value": v, "data-uncertainty": u }, g);
    el("title", {}, c).textContent = `#${r.rank} ${r.arch_id.slice(0, 10)}: ${commas(r.params)} params, ` +
      `predicted ${metric} ${g4(v)} ± ${g2(u)}`;
    const m = r.measured[metric];
    if (m !== null && m !== undefined) {
      const x = sx(r.params), y = sy(m);
      const d = el("path", { d: `M${x} ${y - 6} L${x + 6} ${y} L${x} ${y + 6} L${x - 6} ${y} Z`, class: "pt-meas",
                             "data-arch-id": r.arch_id, "data-params": r.params, "data-value": m }, g);
      el("title", {}, d).textContent = `#${r.rank} ${r.arch_id.slice(0, 10)}: measured ${metric} ${g4(m)}`;
    }
    g.addEventListener("click", () => select(r.arch_id));
  }
}

function table(doc) {
  const head = $("results-head");
  head.innerHTML = "";
  const cols = ["#", "arch", "params", "% base", ...doc.objectives.map((o) => `${o} pred`),
                ...doc.objectives.map((o) => `${o} meas`), "per-layer kept (sketch)"];
  for (const c of cols) {
    const th = document.createElement("th");
    th.textContent = c;
    head.appendChild(th);
  }
  const body = document.querySelector("#results tbody");
  body.innerHTML = "";
  for (const r of doc.results) {
    const tr = document.createElement("tr");
    tr.dataset.archId = r.arch_id;
    tr.dataset.rank = r.rank;
    if (r.arch_id === state.selected) tr.classList.add("selected");
    const cell = (text, cls, value) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      if (value !== undefined) td.dataset.value = value === null ? "" : value;
      tr.appendChild(td);
      return td;
    };
    cell(String(r.rank), "num rank", r.rank);
    const id = cell(r.arch_id.slice(0, 10), "arch");
    id.title = r.arch_id;
    cell(commas(r.params), "num params", r.params);
    cell(`${(100 * r.fraction).toFixed(1)}%`, "num fraction", r.fraction);
    for (const o of doc.objectives) {
      const td = cell(`${g4(r.predicted[o])} ± ${g2(r.uncertainty[o] || 0)}`, "num pred", r.predicted[o]);
      td.dataset.metric = o;
      td.dataset.uncertainty = r.uncertainty[o] || 0;
    }
    for (const o of doc.objectives) {
      const m = r.measured[o];
      const td = cell(g4(m), "num meas", m === undefined ? null : m);
      td.dataset.metric = o;
    }
    const sk = cell(r.sketch || "", "sketch");
    if (r.sketch_note) {
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = r.sketch_note;
      sk.appendChild(note);
    }
    tr.addEventListener("click", () => select(r.arch_id));
    body.appendChild(tr);
  }
  const foot = document.querySelector("#results tfoot");
  foot.innerHTML = "";
  const base = doc.base_measured || {};
  if (doc.objectives.some((o) => base[o] !== null && base[o] !== undefined)) {
    const tr = document.createElement("tr");
    tr.className = "base-ref";
    const texts = ["base", "(unpruned)", commas(state.model ? state.model.params : 0), "100.0%",
                   ...doc.objectives.map(() => ""), ...doc.objectives.map((o) => g4(base[o])), "the base model, measured"];
    texts.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i >= 4 + doc.objectives.length && i < 4 + 2 * doc.objectives.length) {
        td.className = "num meas";
        td.dataset.metric = doc.objectives[i - 4 - doc.objectives.length];
        td.dataset.value = base[td.dataset.metric];
      }
      tr.appendChild(td);
    });
    foot.appendChild(tr);
  }
}

function select(archId) {
  state.selected = archId;
  for (const node of document.querySelectorAll("[data-arch-id]")) {
    if (node.classList.contains("point") || node.tagName === "TR") {
      node.classList.toggle("selected", node.dataset.archId === archId);
    }
  }
  strip();
}

function strip() {
  const svg = $("strip");
  const r = state.doc && state.doc.results.find((x) => x.arch_id === state.selected);
  $("strip-section").hidden = !r;
  svg.innerHTML = "";
  if (!r) return;
  $("strip-title").textContent = `${r.arch_id.slice(0, 12)} (#${r.rank}, ${commas(r.params)} params)`;
  svg.dataset.archId = r.arch_id;
  const m = state.model;
  const heads = m.heads, kv = m.kv_heads, inter = m.intermediate, group = heads / kv;
  const n = r.layers.length;
  const colW = Math.max(14, Math.min(40, Math.floor(1100 / n))), cell = Math.max(3, Math.min(10, Math.floor(150 / heads)));
  const attnH = heads * cell + (kv - 1) * 2, mlpH = 80, top = 8, gap = 14;
  const W = 40 + n * colW, H = top + attnH + gap + mlpH + 24;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  el("text", { x: 2, y: top + attnH / 2, class: "axis-name" }, svg).textContent = "attn";
  el("text", { x: 2, y: top + attnH + gap + mlpH / 2, class: "axis-name" }, svg).textContent = "mlp";
  for (const layer of r.layers) {
    const x = 40 + layer.layer * colW, w = colW - 4;
    const g = el("g", { class: "layer" + (layer.dropped ? " dropped" : ""), "data-layer": layer.layer,
                        "data-dropped": layer.dropped, "data-q-heads": layer.q_heads, "data-kv-heads": layer.kv_heads,
                        "data-intermediate": layer.intermediate }, svg);
    el("title", {}, g).textContent = layer.dropped ? `layer ${layer.layer}: dropped` :
      `layer ${layer.layer}: ${layer.q_heads}/${heads} query heads, ${layer.kv_heads}/${kv} KV heads, ` +
      `${commas(layer.intermediate)}/${commas(inter)} MLP channels`;
    if (layer.dropped) {
      el("rect", { x, y: top, width: w, height: attnH + gap + mlpH, class: "gone" }, g);
      el("path", { d: `M${x} ${top} L${x + w} ${top + attnH + gap + mlpH} M${x + w} ${top} L${x} ${top + attnH + gap + mlpH}`,
                   class: "cross" }, g);
    } else {
      // Kept KV groups come first: which groups were kept is in the pruned model, not the encoding.
      for (let h = 0; h < heads; h++) {
        const grp = Math.floor(h / group);
        el("rect", { x, y: top + h * cell + grp * 2, width: w, height: cell - 1,
                     class: h < layer.q_heads ? "head kept" : "head" }, g);
      }
      const frac = layer.intermediate / inter, y0 = top + attnH + gap;
      el("rect", { x, y: y0, width: w, height: mlpH, class: "mlp-full" }, g);
      el("rect", { x, y: y0 + mlpH * (1 - frac), width: w, height: mlpH * frac, class: "mlp-kept",
                   "data-fraction": frac }, g);
    }
    el("text", { x: x + w / 2, y: H - 8, "text-anchor": "middle", class: "layer-label" }, g).textContent = layer.layer;
  }
}

// --- start -------------------------------------------------------------------------------------------
$("query-form").addEventListener("submit", runQuery);
$("model").addEventListener("change", (e) => selectModel(e.target.value).catch((err) => status(err.message, "error")));
loadModels().then(() => { document.body.dataset.ready = "1"; })
  .catch((err) => status(`Cannot load the models: ${err.message}`, "error"));
