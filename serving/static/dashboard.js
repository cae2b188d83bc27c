// streamrec live dashboard: polls v1/dashboard/stats and keeps the last 10 minutes in charts.
// No build step and no framework: one file, uPlot (vendored) for the charts.
"use strict";

(() => {
  const params = new URLSearchParams(window.location.search);
  // ?poll_ms= lets a test (or a curious operator) poll faster than the default 2 s.
  const POLL_MS = Math.max(250, Number(params.get("poll_ms")) || 2000);
  const WINDOW_S = 600;
  const HEIGHT = 220;
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04"];

  // --- formatting -----------------------------------------------------------------------
  const fixed = (digits) =>
    new Intl.NumberFormat("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  const F0 = fixed(0);
  const F1 = fixed(1);
  const F2 = fixed(2);
  const F4 = fixed(4);

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const fmtMs = (v) => (!isNum(v) ? "—" : `${(v < 10 ? F2 : v < 1000 ? F1 : F0).format(v)} ms`);
  const fmtCount = (v) => (isNum(v) ? F0.format(v) : "—");
  const fmtRate = (v) => (!isNum(v) ? "—" : (v < 10 ? F1 : F0).format(v));
  const fmtMetric = (v) => (!isNum(v) ? "—" : Math.abs(v) >= 100 ? F1.format(v) : F4.format(v));
  function fmtAge(s) {
    if (!isNum(s)) return "—";
    if (s < 60) return `${F0.format(s)} s ago`;
    if (s < 3600) return `${F0.format(s / 60)} min ago`;
    return `${F1.format(s / 3600)} h ago`;
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // --- charts ---------------------------------------------------------------------------
  // One time axis and one column per series; series appear as they are first reported
  // (a worker that starts later gets its own line), which rebuilds the uPlot instance.
  function lastValue(values) {
    for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] !== null) return values[i];
    return null;
  }

  class LiveChart {
    // format: axis ticks; legend: the values in the legend (default: format).
    constructor(id, { format, legend = format, series = [], scales = {} }) {
      this.card = document.getElementById(id);
      this.plot = this.card.querySelector(".plot");
      this.format = format;
      this.legend = legend;
      this.specs = new Map(series.map((s) => [s.name, s]));
      this.scales = scales;
      this.t = [];
      this.cols = new Map();
      this.uplot = null;
      for (const name of this.specs.keys()) this.cols.set(name, []);
    }

    spec(name) {
      if (!this.specs.has(name)) {
        this.specs.set(name, { name, color: PALETTE[this.specs.size % PALETTE.length] });
      }
      return this.specs.get(name);
    }

    push(t, values) {
      let added = false;
      for (const name of Object.keys(values)) {
        if (!this.cols.has(name)) {
          this.spec(name);
          this.cols.set(name, new Array(this.t.length).fill(null));
          added = true;
        }
      }
      this.t.push(t);
      for (const [name, col] of this.cols) col.push(isNum(values[name]) ? values[name] : null);
      while (this.t.length && this.t[0] < t - WINDOW_S) {
        this.t.shift();
        for (const col of this.cols.values()) col.shift();
      }
      const hasData = [...this.cols.values()].some((col) => col.some((v) => v !== null));
      this.card.classList.toggle("has-data", hasData);
      if (added || !this.uplot) this.build();
      else this.uplot.setData(this.data());
    }

    data() {
      return [this.t, ...this.cols.values()];
    }

    build() {
      if (this.uplot) this.uplot.destroy();
      const used = new Set([...this.cols.keys()].map((n) => this.spec(n).scale || "y"));
      const scales = { x: { time: true } };
      const axes = [{ stroke: "#667085", grid: { stroke: "#eef1f5" } }];
      [...used].forEach((scale, i) => {
        const cfg = this.scales[scale] || {};
        scales[scale] = {
          range: cfg.range || ((u, min, max) => [0, isNum(max) && max > 0 ? max * 1.15 : 1]),
        };
        const format = cfg.format || this.format;
        axes.push({
          scale,
          side: i === 0 ? 3 : 1,
          size: 64,
          stroke: "#667085",
          grid: { show: i === 0, stroke: "#eef1f5" },
          values: (u, ticks) => ticks.map(format),
        });
      });
      // Without the cursor over the plot the legend shows the newest values, not dashes.
      const series = [{
        label: "time",
        value: (u, v) => (isNum(v) ? new Date(v * 1000).toLocaleTimeString() : "now"),
      }];
      for (const name of this.cols.keys()) {
        const s = this.spec(name);
        const format = (this.scales[s.scale || "y"] || {}).legend || this.legend;
        series.push({
          label: name,
          stroke: s.color,
          width: 2,
          scale: s.scale || "y",
          points: { size: 5, fill: s.color },
          value: (u, v, si, idx) => {
            const shown = idx === null || idx === undefined ? lastValue(u.data[si]) : v;
            return isNum(shown) ? format(shown) : "—";
          },
        });
      }
      const width = Math.max(200, this.plot.clientWidth);
      this.uplot = new uPlot({ width, height: HEIGHT, scales, axes, series, cursor: { drag: { x: false, y: false } } },
        this.data(), this.plot);
    }

    resize() {
      if (this.uplot) this.uplot.setSize({ width: Math.max(200, this.plot.clientWidth), height: HEIGHT });
    }
  }

  const charts = {
    throughput: new LiveChart("chart-throughput", { format: fmtRate }),
    lag: new LiveChart("chart-lag", { format: fmtCount }),
    freshness: new LiveChart("chart-freshness", {
      format: (v) => F0.format(v),
      legend: fmtMs,
      series: [{ name: "p50", color: PALETTE[0] }, { name: "p99", color: PALETTE[1] }],
    }),
    latency: new LiveChart("chart-latency", {
      format: (v) => (v < 10 ? F1 : F0).format(v),
      legend: fmtMs,
      series: [{ name: "p50", color: PALETTE[0] }, { name: "p99", color: PALETTE[1] }],
    }),
    rps: new LiveChart("chart-rps", {
      format: fmtRate,
      legend: (v) => F2.format(v),
      series: [{ name: "requests/s", color: PALETTE[2] }, { name: "5xx/s", color: PALETTE[1] }],
    }),
    learner: new LiveChart("chart-learner", {
      format: (v) => F2.format(v),
      legend: (v) => F4.format(v),
      series: [
        { name: "AUC", color: PALETTE[3], scale: "auc" },
        { name: "log loss", color: PALETTE[4], scale: "loss" },
      ],
      scales: {
        auc: {
          range: (u, min, max) => [Math.min(0.5, isNum(min) ? min - 0.02 : 0.5),
            Math.min(1, isNum(max) ? max + 0.02 : 1)],
          format: (v) => F2.format(v),
          legend: (v) => F4.format(v),
        },
      },
    }),
  };
  window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.resize()));

  // --- tiles and tables -----------------------------------------------------------------
  function tile(id, value, sub, empty) {
    const node = document.getElementById(id);
    node.querySelector(".tile-value").textContent = value;
    node.querySelector(".tile-sub").textContent = sub;
    node.classList.toggle("empty-state", empty);
  }

  const sum = (values) => values.filter(isNum).reduce((a, b) => a + b, 0);

  function renderTiles(s) {
    const live = s.workers.filter((w) => w.state === "live");
    if (!s.workers.length) tile("tile-events", "—", "no stream worker reporting yet", true);
    else tile("tile-events", `${fmtRate(sum(live.map((w) => w.consumed_per_s)))}/s`,
      `${live.length} of ${s.workers.length} workers live`, !live.length);
    if (!live.length) tile("tile-lag", "—", "no live worker", true);
    else tile("tile-lag", fmtCount(sum(live.map((w) => w.lag))), "records not yet consumed", false);

    const f = s.freshness;
    if (!f) tile("tile-freshness", "—", "no freshness figures yet", true);
    else tile("tile-freshness", fmtMs(f.p99_ms), `p50 ${fmtMs(f.p50_ms)} · event → online`, false);

    const api = s.api;
    if (!api.requests) tile("tile-latency", "—", `no API requests in the last ${F0.format(api.window_s)} s`, true);
    else tile("tile-latency", fmtMs(api.p99_ms), `p50 ${fmtMs(api.p50_ms)} · last ${F0.format(api.window_s)} s`, false);
    tile("tile-rps", fmtRate(api.requests_per_s),
      `${fmtCount(api.errors)} errors (5xx) in the last ${F0.format(api.window_s)} s`, !api.requests);

    const l = s.learner;
    if (!l) tile("tile-auc", "—", "no learner running yet", true);
    else tile("tile-auc", isNum(l.auc) ? F4.format(l.auc) : "—",
      `log loss ${isNum(l.log_loss) ? F4.format(l.log_loss) : "—"} · ${l.state}, ${fmtAge(l.age_s)}`,
      !isNum(l.auc));
  }

  function renderWorkers(workers) {
    const body = document.querySelector("#workers tbody");
    body.replaceChildren(...workers.map((w) => el("tr", { "data-worker": w.name },
      el("td", {}, w.name),
      el("td", {}, el("span", { class: `state state-${w.state}`, title: w.error || "" }, w.state)),
      el("td", { class: "num" }, w.state === "live" ? fmtRate(w.consumed_per_s) : "—"),
      el("td", { class: "num" }, fmtCount(w.consumed)),
      el("td", { class: "num" }, fmtCount(w.lag)),
      el("td", { class: "num" }, fmtCount(w.dead_lettered)),
      el("td", { class: "num" }, fmtAge(w.age_s)))));
    document.getElementById("workers-empty").hidden = workers.length > 0;
  }

  const KIND_LABEL = { ranker: "Ranker (PyTorch)", online: "Online model (River)" };

  function renderModels(models) {
    const body = document.querySelector("#models tbody");
    body.replaceChildren(...models.map((m) => {
      const metrics = Object.entries(m.metrics).slice(0, 6)
        .map(([k, v]) => `${k} ${fmtMetric(v)}`).join(" · ");
      const champion = m.error ? el("span", { class: "metrics" }, m.error)
        : m.version ? el("code", {}, m.version)
          : el("span", { class: "metrics" },
            m.versions ? `no model promoted yet (${m.versions} registered)` : "no model yet");
      const created = m.created_at ? new Date(m.created_at).toLocaleString() : "—";
      return el("tr", { "data-kind": m.kind },
        el("td", {}, KIND_LABEL[m.kind] || m.kind),
        el("td", {}, champion),
        el("td", {}, created),
        el("td", { class: "metrics" }, metrics || "—"),
        el("td", { class: "num" }, fmtCount(m.versions)));
    }));
  }

  // Fetched rather than linked from <img src>: an image request cannot carry the API key.
  let cpsShown = null;
  async function renderCps(cps) {
    const img = document.getElementById("cps-img");
    document.getElementById("cps-empty").hidden = Boolean(cps);
    if (!cps) {
      img.hidden = true;
      cpsShown = null;
      return;
    }
    if (cps.url === cpsShown) return;
    const response = await fetch(cps.url, { headers: authHeaders() });
    if (!response.ok) return;
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(await response.blob());
    img.hidden = false;
    cpsShown = cps.url;
  }

  // --- access ---------------------------------------------------------------------------
  const KEY = "streamrec.apiKey";
  function authHeaders() {
    const key = window.sessionStorage.getItem(KEY);
    return key ? { "X-API-Key": key } : {};
  }
  const keyForm = document.getElementById("key-form");
  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = document.getElementById("key-input").value.trim();
    if (key) window.sessionStorage.setItem(KEY, key);
    else window.sessionStorage.removeItem(KEY);
    keyForm.hidden = true;
    connection("pill-wait", "connecting…");
  });

  // --- polling --------------------------------------------------------------------------
  let apiSeen = false;
  let polls = 0;

  async function render(s) {
    renderTiles(s);
    renderWorkers(s.workers);
    renderModels(s.models);

    const live = (w) => w.state === "live";
    const rates = {};
    const lags = {};
    for (const w of s.workers) {
      if (isNum(w.consumed_per_s)) rates[w.name] = live(w) ? w.consumed_per_s : null;
      if (isNum(w.lag)) lags[w.name] = live(w) ? w.lag : null;
    }
    charts.throughput.push(s.ts, rates);
    charts.lag.push(s.ts, lags);
    const f = s.freshness || {};
    charts.freshness.push(s.ts, { p50: f.p50_ms, p99: f.p99_ms });
    charts.latency.push(s.ts, { p50: s.api.p50_ms, p99: s.api.p99_ms });
    // Zero requests/s is data once the API has served something; before that, an empty state.
    apiSeen = apiSeen || s.api.requests > 0;
    charts.rps.push(s.ts, apiSeen
      ? { "requests/s": s.api.requests_per_s, "5xx/s": s.api.errors / s.api.window_s } : {});
    const l = s.learner && s.learner.state !== "stopped" ? s.learner : {};
    charts.learner.push(s.ts, { AUC: l.auc, "log loss": l.log_loss });
    await renderCps(s.cps);
  }

  function connection(cls, text) {
    const pill = document.getElementById("connection");
    pill.className = `pill ${cls}`;
    pill.textContent = text;
  }

  async function poll() {
    try {
      const response = await fetch("v1/dashboard/stats", { cache: "no-store", headers: authHeaders() });
      if (response.status === 401 || response.status === 403) {
        keyForm.hidden = false;
        const detail = (await response.json().catch(() => ({}))).detail || `HTTP ${response.status}`;
        connection("pill-bad", `${detail} Enter a key with the read scope.`);
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      await render(await response.json());
      connection("pill-ok", `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      connection("pill-bad", `API unreachable (${err.message}); retrying every ${POLL_MS / 1000} s`);
    } finally {
      polls += 1;
      document.body.dataset.polls = String(polls);
      window.setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
