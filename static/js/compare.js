/* The comparison page: every chart has one colour per run (the summary table's swatches match). */
(function () {
  "use strict";
  var runs = JSON.parse(document.getElementById("compare-data").textContent);
  var PALETTE = ["#2f6fed", "#f08c00", "#12b886", "#d6336c", "#7950f2", "#1098ad", "#5c940d", "#e8590c"];
  var FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif';
  var CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
  var STATIC = Object.assign({}, CONFIG, { displayModeBar: false });
  var FP_LEVEL = 9;

  function color(i) { return PALETTE[i % PALETTE.length]; }
  function finite(v) { return typeof v === "number" && isFinite(v); }
  function label(r) { return "#" + r.id + " " + (r.name.length > 28 ? r.name.slice(0, 27) + "…" : r.name); }

  document.querySelectorAll(".swatch[data-run-index]").forEach(function (el) {
    el.style.background = color(parseInt(el.getAttribute("data-run-index"), 10));
  });

  function layout(extra) {
    return Object.assign({
      margin: { l: 52, r: 14, t: 26, b: 38 }, font: { family: FONT, size: 11, color: "#344054" },
      paper_bgcolor: "#fff", plot_bgcolor: "#fff", hovermode: "closest",
      legend: { orientation: "h", x: 0, y: 1.16, font: { size: 10.5 } },
      xaxis: episodeAxis(),
      yaxis: { gridcolor: "#eef1f5", zeroline: false }
    }, extra || {});
  }

  // whole-number episode ticks, however few episodes the runs have (no 1, 1.5, 2)
  function episodeAxis() {
    var n = runs.reduce(function (m, r) { return Math.max(m, r.total || 0); }, 0);
    var axis = { title: { text: "episode" }, gridcolor: "#eef1f5", zeroline: false, tickformat: "d" };
    if (n >= 1 && n <= 12) { axis.dtick = 1; }
    return axis;
  }

  // Best-so-far by reward within budget, as the run page draws it.
  function bestSoFar(eps, get) {
    var xs = [], ys = [], best = null;
    eps.forEach(function (e) {
      if (e.is_best) { best = e; }
      if (best && finite(get(best))) { xs.push(e.number); ys.push(get(best)); }
    });
    return { x: xs, y: ys };
  }

  function curves(id, get, title, fmt) {
    var traces = [];
    runs.forEach(function (r, i) {
      var pts = r.episodes.filter(function (e) { return finite(get(e)); });
      traces.push({ type: "scatter", mode: "markers", name: label(r) + " episodes", showlegend: false,
        x: pts.map(function (e) { return e.number; }), y: pts.map(get),
        marker: { color: color(i), size: 4, opacity: 0.35 }, hoverinfo: "skip" });
      var b = bestSoFar(r.episodes, get);
      traces.push({ type: "scatter", mode: "lines", name: label(r), x: b.x, y: b.y,
        line: { color: color(i), width: 2.2, shape: "hv" } });
    });
    var l = layout({ yaxis: { title: { text: title }, gridcolor: "#eef1f5", zeroline: false } });
    if (fmt) { l.yaxis.tickformat = fmt; }
    Plotly.newPlot(id, traces, l, CONFIG);
  }

  curves("cmp-reward", function (e) { return e.reward; }, "reward");
  curves("cmp-accuracy", function (e) { return e.accuracy; }, "accuracy", ".0%");

  var allLatency = runs.every(function (r) { return r.cost_field === "latency_ms"; });
  var costGet = allLatency ? function (e) { return e.latency_ms; } : function (e) { return e.cost_ratio; };
  var objectives = runs.map(function (r) { return r.cost_label; })
    .filter(function (v, i, a) { return a.indexOf(v) === i; });
  var costLabel = allLatency ? "latency (ms)" :
    objectives.length > 1 ? "cost / original (each run's own objective)" : objectives[0];
  (function () {
    var traces = runs.map(function (r, i) {
      var pts = r.episodes.filter(function (e) { return finite(costGet(e)); });
      return { type: "scatter", mode: "markers", name: label(r), x: pts.map(function (e) { return e.number; }),
        y: pts.map(costGet), marker: { color: color(i), size: 5, opacity: 0.7 } };
    });
    Plotly.newPlot("cmp-cost", traces, layout({ yaxis: { title: { text: costLabel }, gridcolor: "#eef1f5" } }), CONFIG);
  })();

  (function () {
    var traces = [];
    runs.forEach(function (r, i) {
      var pts = r.episodes.filter(function (e) { return finite(costGet(e)) && finite(e.accuracy); })
        .map(function (e) { return [costGet(e), e.accuracy, e.number]; });
      traces.push({ type: "scatter", mode: "markers", showlegend: false, name: label(r),
        x: pts.map(function (p) { return p[0]; }), y: pts.map(function (p) { return p[1]; }),
        marker: { color: color(i), size: 5, opacity: 0.25 }, hoverinfo: "skip" });
      var sorted = pts.slice().sort(function (a, b) { return a[0] - b[0] || b[1] - a[1]; });
      var front = [], best = -Infinity;
      sorted.forEach(function (p) { if (p[1] > best) { front.push(p); best = p[1]; } });
      traces.push({ type: "scatter", mode: "lines+markers", name: label(r),
        x: front.map(function (p) { return p[0]; }), y: front.map(function (p) { return p[1]; }),
        text: front.map(function (p) { return "episode " + p[2]; }),
        line: { color: color(i), width: 2, shape: "hv" }, marker: { color: color(i), size: 7 } });
    });
    Plotly.newPlot("cmp-pareto", traces, layout({
      xaxis: { title: { text: costLabel }, gridcolor: "#eef1f5", zeroline: false },
      yaxis: { title: { text: "accuracy" }, tickformat: ".0%", gridcolor: "#eef1f5", zeroline: false }
    }), CONFIG);
  })();

  // Best policies: layers (union, in first-seen order) x runs.
  var layers = [];
  runs.forEach(function (r) {
    var names = r.layers.length ? r.layers : Object.keys((r.best_policy.layers) || {});
    names.forEach(function (n) { if (layers.indexOf(n) < 0) { layers.push(n); } });
  });
  function heat(id, get, opts) {
    var z = layers.map(function (n) {
      return runs.map(function (r) {
        var has = r.layers.indexOf(n) >= 0 || ((r.best_policy.layers || {})[n] !== undefined);
        if (!has || !r.best_policy.layers) { return null; }
        return get((r.best_policy.layers || {})[n] || {});
      });
    });
    var trace = Object.assign({ type: "heatmap", x: runs.map(label), y: layers, z: z, xgap: 2, ygap: 1,
      hoverongaps: false }, opts);
    Plotly.newPlot(id, [trace], layout({ margin: { l: 110, r: 10, t: 10, b: 60 },
      xaxis: { type: "category", tickangle: -15, automargin: true },
      yaxis: { type: "category", autorange: "reversed", automargin: true, tickfont: { size: 10 } } }), STATIC);
  }
  heat("cmp-keep", function (lp) { return finite(lp.keep_ratio) ? lp.keep_ratio : 1; }, {
    zmin: 0, zmax: 1, colorscale: "Viridis", colorbar: { title: { text: "keep" }, thickness: 10, tickformat: ".0%" },
    hovertemplate: "%{x}<br>%{y}<br>keep %{z:.0%}<extra></extra>" });
  heat("cmp-bits", function (lp) { var b = lp.w_bits; return !b || b >= 32 ? FP_LEVEL : b; }, {
    zmin: 1, zmax: FP_LEVEL,
    colorscale: [[0, "#440154"], [0.375, "#31688e"], [0.75, "#35b779"], [0.875, "#fde725"], [1, "#e9ecef"]],
    colorbar: { title: { text: "bits" }, thickness: 10, tickvals: [1, 2, 4, 6, 8, FP_LEVEL], ticktext: ["1", "2", "4", "6", "8", "fp32"] },
    hovertemplate: "%{x}<br>%{y}<br>%{z} bits (9 = float)<extra></extra>" });
})();
