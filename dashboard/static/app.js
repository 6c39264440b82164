// The live page: one snapshot per server-sent event (or per poll when the stream is unavailable).
"use strict";
(function () {
  const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4d7c0f"];
  const charts = {};
  window.alignfedCharts = charts; // read by the browser test: points per chart
  let origin = 0;

  const $ = (id) => document.getElementById(id);
  const fmt = (x, d) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
  const bytes = (n) => {
    const u = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + u[i];
  };
  const ago = (t) => (t === null || t === undefined ? "–" : "+" + (t - origin).toFixed(1) + " s");

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text; // textContent only: nothing from the feed is parsed as HTML
    if (cls) td.className = cls;
    tr.appendChild(td);
  }

  function rows(tableId, items, fill) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren();
    for (const item of items) {
      const tr = document.createElement("tr");
      fill(tr, item);
      body.appendChild(tr);
    }
  }

  function plot(id, series, data, opts) {
    const el = $(id);
    const points = data.length ? data[0].length : 0;
    el.dataset.points = String(points);
    const key = series.map((s) => s.label).join("|");
    if (!points) return;
    const width = Math.max(300, el.clientWidth || 480);
    if (charts[id] && charts[id].key === key) {
      charts[id].plot.setData(data);
      return;
    }
    if (charts[id]) charts[id].plot.destroy();
    const all = [{ label: opts.x || "time (s)" }].concat(series);
    const config = { width: width, height: 220, series: all, scales: { x: { time: false } }, legend: { live: false } };
    if (opts.integerX) {
      config.scales.x.range = (u, min, max) => [min - 0.5, max + 0.5];
      config.axes = [{ incrs: [1, 2, 5, 10, 20, 50, 100] }, {}];
    }
    if (opts.yValues) config.axes = [config.axes ? config.axes[0] : {}, { size: 70, values: (u, vs) => vs.map(opts.yValues) }];
    if (opts.bars) {
      config.scales.y = { range: (u, min, max) => [0, Math.max(1, max) * 1.15] }; // bars stand on zero
      config.series[1].paths = uPlot.paths.bars({ size: [0.6, 60] });
      config.series[1].points = { show: false };
    }
    charts[id] = { key: key, plot: new uPlot(config, data, el) };
  }

  function line(label, i) {
    return { label: label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { size: 5 } };
  }

  function render(s) {
    origin = s.origin || 0;
    $("federation").textContent = s.federation;
    $("version").textContent = s.version;
    $("strategy").textContent = s.strategy || "–";
    $("online").textContent = s.devices_online + " / " + s.devices.length;
    $("counts").textContent = s.totals.accepted + " / " + s.totals.rejected;
    $("jain").textContent = s.jain.length ? fmt(s.jain[s.jain.length - 1][1], 3) : "–";
    $("bytes").textContent = bytes(s.totals.bytes_up) + " / " + bytes(s.totals.bytes_down);
    $("buffered").textContent = s.queue.buffered + (s.queue.queued ? " (+" + s.queue.queued + " queued)" : "");

    rows("devices", s.devices, (tr, d) => {
      cell(tr, d.id);
      const status = d.online === null ? "unknown" : d.online ? "online (" + d.state + ")" : "offline";
      cell(tr, status, d.online === null ? "unknown" : d.online ? "on" : "off");
      cell(tr, d.profile || "–");
      cell(tr, d.version === null ? "–" : "v" + d.version);
      cell(tr, ago(d.last_update));
      cell(tr, d.accepted);
      cell(tr, d.rejected);
      cell(tr, (100 * d.share).toFixed(0) + " %");
      cell(tr, d.staleness === null ? "–" : d.staleness);
      cell(tr, d.eval_loss === null ? "–" : fmt(d.eval_loss, 4) + " (v" + d.eval_version + ")");
    });
    rows("lineage", s.lineage.slice().reverse(), (tr, v) => {
      cell(tr, "v" + v.version);
      cell(tr, v.parent < 0 ? "–" : "v" + v.parent);
      cell(tr, ago(v.at));
      cell(tr, Object.entries(v.devices).map(([d, n]) => d + "×" + n).join(", ") || "(initial)");
    });
    rows("rejects", s.rejects, (tr, r) => { cell(tr, ago(r.at)); cell(tr, r.device); cell(tr, r.reason); });

    // eval loss: one line per device over a shared time axis (gaps where a device has no point)
    const names = Object.keys(s.eval_loss);
    const xs = Array.from(new Set([].concat(...names.map((n) => s.eval_loss[n].map((p) => p[0]))))).sort((a, b) => a - b);
    const lossData = [xs.map((t) => t - origin)].concat(
      names.map((n) => { const m = new Map(s.eval_loss[n]); return xs.map((t) => (m.has(t) ? m.get(t) : null)); })
    );
    plot("chart-loss", names.map(line), lossData, {});

    const hist = Object.entries(s.staleness_histogram).map(([k, v]) => [Number(k), v]).sort((a, b) => a[0] - b[0]);
    plot("chart-staleness", [{ label: "updates", stroke: COLORS[0], fill: "rgba(37,99,235,.35)" }],
      [hist.map((h) => h[0]), hist.map((h) => h[1])], { bars: true, integerX: true, x: "staleness τ" });
    plot("chart-residual", [line("mean ρ", 0), line("max ρ", 1)],
      [s.residuals.map((r) => r[0]), s.residuals.map((r) => r[1]), s.residuals.map((r) => r[2])], { x: "version", integerX: true });
    plot("chart-jain", [line("Jain", 2)], [s.jain.map((j) => j[0]), s.jain.map((j) => j[1])], { x: "version", integerX: true });
    plot("chart-bytes", [line("up", 0), line("down", 1)],
      [s.bytes.map((b) => b[0] - origin), s.bytes.map((b) => b[1]), s.bytes.map((b) => b[2])], { yValues: bytes });
  }

  function poll() {
    fetch("api/state").then((r) => r.json()).then(render).catch(() => {}).finally(() => setTimeout(poll, 2000));
  }

  if (window.EventSource) {
    const source = new EventSource("events");
    source.onopen = () => { $("feed").textContent = "live"; };
    source.onmessage = (e) => render(JSON.parse(e.data));
    source.onerror = () => { $("feed").textContent = "reconnecting…"; };
  } else {
    $("feed").textContent = "polling";
    poll();
  }
})();
