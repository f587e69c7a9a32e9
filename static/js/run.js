/* The live run page.
 *
 * Data arrives over the run's websocket (/ws/runs/<id>/): a "history" message on connect (episodes,
 * possibly downsampled, the run's status and the log tail; a long history continues in "history_more"
 * parts, each under the server's 1 MiB message limit), then "episode", "status" and "log" increments.
 * Every episode carries its number; an episode whose number is not above the last one drawn is dropped, so
 * nothing is drawn twice, also after a reconnect (the server sends the history again). Charts are built once
 * and then grown with Plotly.extendTraces, so a zoomed chart stays zoomed while points arrive. While the
 * socket is down the page polls the JSON API for increments and keeps trying to reconnect.
 */
(function () {
  "use strict";

  var page = JSON.parse(document.getElementById("run-page").textContent);
  var ACTIVE = ["queued", "running", "finalizing"];
  var FLOAT_BITS = 32;
  var FP_LEVEL = 9; // where float (32-bit) sits on the bits colour scale

  var state = {
    last: 0, // highest episode number drawn
    drawn: 0, // episodes drawn
    best: null, // best episode (is_best) so far
    layers: page.layers.slice(),
    points: [], // [cost, accuracy, number] for the Pareto plot
    walls: [], // wall time of recent episodes (for the time-left estimate)
    run: page.run,
    runAt: Date.now(),
    logSeq: 0,
    built: false,
    axisN: 0, // the last episode the episode axes show
    socket: null,
    retries: 0,
    polling: null,
    wasActive: ACTIVE.indexOf(page.run.status) >= 0,
    reloading: false,
    messages: 0,
    received: [] // [message type, episode numbers] of the last messages (for tests and debugging)
  };
  window.runPage = state; // for the browser tests and for curious users

  var C = { ok: "#2f6fed", over: "#b8c1cf", best: "#f08c00", front: "#d6336c", bar: "#4c6ef5", a: "#12b886" };
  var FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif';
  var CONFIG = { displaylogo: false, responsive: true, displayModeBar: "hover",
    modeBarButtonsToRemove: ["lasso2d", "select2d"] };
  var STATIC = Object.assign({}, CONFIG, { displayModeBar: false });
  var WAITING = "waiting for the first episode…";

  // An empty chart shows a sentence instead of meaningless default axes.
  function placeholder(l, text) {
    l.xaxis = Object.assign({}, l.xaxis, { visible: false });
    l.yaxis = Object.assign({}, l.yaxis, { visible: false });
    l.showlegend = false;
    l.annotations = [{ text: text || WAITING, showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5,
      font: { size: 12.5, color: "#98a2b3" } }];
    return l;
  }

  function layout(extra) {
    var base = {
      margin: { l: 52, r: 14, t: 26, b: 38 },
      font: { family: FONT, size: 11, color: "#344054" },
      paper_bgcolor: "#fff",
      plot_bgcolor: "#fff",
      hovermode: "closest",
      uirevision: "keep",
      showlegend: true,
      legend: { orientation: "h", x: 0, y: 1.14, font: { size: 10.5 } },
      xaxis: { title: { text: "episode", standoff: 4 }, gridcolor: "#eef1f5", zeroline: false, automargin: true },
      yaxis: { gridcolor: "#eef1f5", zeroline: false, automargin: true }
    };
    return Object.assign(base, extra || {});
  }

  // --- metrics ---------------------------------------------------------------------------------------

  var useLatency = page.has_latency;
  var METRICS = {
    "chart-reward": { get: function (e) { return e.reward; }, label: "reward", fmt: ".4f" },
    "chart-accuracy": { get: function (e) { return e.accuracy; }, label: "accuracy", fmt: ".2%", pct: true },
    "chart-latency": {
      get: function (e) { return useLatency ? e.latency_ms : e.cost_ratio; },
      label: useLatency ? "latency (ms)" : page.objective + " / original",
      fmt: useLatency ? ".3f" : ".3f"
    },
    "chart-size": { get: function (e) { return e.bytes / 1024; }, label: "size (KiB)", fmt: ".1f" }
  };

  function finite(v) { return typeof v === "number" && isFinite(v); }

  function lineTraces(id) {
    var m = METRICS[id];
    var hover = "episode %{x}<br>" + m.label + " %{y:" + m.fmt + "}<extra></extra>";
    return [
      { name: "within budget", x: [], y: [], mode: "markers", type: "scatter", hovertemplate: hover,
        marker: { color: C.ok, size: 5, opacity: 0.8 } },
      { name: "over budget", x: [], y: [], mode: "markers", type: "scatter", hovertemplate: hover,
        marker: { color: C.over, size: 5, symbol: "circle-open" } },
      { name: "best so far", x: [], y: [], mode: "lines", type: "scatter", hovertemplate: hover,
        line: { color: C.best, width: 2, shape: "hv" } }
    ];
  }

  // Episode axes span the whole run (1 .. the planned episodes) with whole-number ticks: early in a run an
  // automatic range would tick at 1, 1.5, 2.
  function episodeAxis() {
    var n = Math.max((state.run && state.run.episodes_total) || 0, state.last || 0);
    var axis = { title: { text: "episode", standoff: 4 }, gridcolor: "#eef1f5", zeroline: false, automargin: true,
      tickformat: "d" };
    if (n >= 1) { axis.range = [0.5, n + 0.5]; axis.autorange = false; }
    if (n >= 1 && n <= 12) { axis.dtick = 1; }
    state.axisN = n;
    return axis;
  }

  // More episodes than planned (a resumed run given more): widen the episode axes once.
  function growEpisodeAxes() {
    if (!state.built || state.last <= state.axisN) { return; }
    var axis = episodeAxis();
    Object.keys(METRICS).concat(["heat-keep", "heat-bits"]).forEach(function (id) {
      Plotly.relayout(id, { "xaxis.range": axis.range, "xaxis.dtick": axis.dtick === undefined ? null : axis.dtick });
    });
  }

  function lineLayout(id) {
    var m = METRICS[id];
    var extra = { xaxis: episodeAxis(),
      yaxis: { title: { text: m.label, standoff: 4 }, gridcolor: "#eef1f5", zeroline: false, automargin: true } };
    if (m.pct) { extra.yaxis.tickformat = ".1%"; }
    if (id === "chart-latency" && !useLatency && finite(page.budget)) {
      extra.shapes = [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: page.budget, y1: page.budget,
        line: { color: C.front, width: 1, dash: "dash" } }];
    }
    return layout(extra);
  }

  // --- heatmaps --------------------------------------------------------------------------------------

  function policyOf(e) { return (e.policy && e.policy.layers) || {}; }

  function keepRow(e) {
    var p = policyOf(e);
    return state.layers.map(function (n) { return p[n] && finite(p[n].keep_ratio) ? p[n].keep_ratio : 1.0; });
  }

  function bitsLevel(b) { return b === undefined || b === null || b >= FLOAT_BITS ? FP_LEVEL : b; }

  function bitsRow(e) {
    var p = policyOf(e);
    return state.layers.map(function (n) { return bitsLevel(p[n] ? p[n].w_bits : FLOAT_BITS); });
  }

  function heatTrace(kind) {
    // z holds one row per episode; transpose shows episodes along x and layers along y, so a new episode is
    // one appended row (extendTraces) rather than a new column in every row.
    var t = { type: "heatmap", x: [], z: [], y: state.layers, transpose: true, hoverongaps: false,
      xgap: 0, ygap: 1 };
    if (kind === "keep") {
      t.zmin = 0; t.zmax = 1; t.colorscale = "Viridis";
      t.colorbar = { title: { text: "keep", side: "right" }, thickness: 10, tickformat: ".0%" };
      t.hovertemplate = "episode %{x}<br>%{y}<br>keep %{z:.0%}<extra></extra>";
    } else {
      t.zmin = 1; t.zmax = FP_LEVEL;
      t.colorscale = [[0, "#440154"], [0.375, "#31688e"], [0.75, "#35b779"], [0.875, "#fde725"], [1, "#e9ecef"]];
      t.colorbar = { title: { text: "bits", side: "right" }, thickness: 10, tickvals: [1, 2, 4, 6, 8, FP_LEVEL],
        ticktext: ["1", "2", "4", "6", "8", "fp32"] };
      t.hovertemplate = "episode %{x}<br>%{y}<br>%{z} bits (9 = float)<extra></extra>";
    }
    return t;
  }

  function heatLayout() {
    return layout({ showlegend: false, margin: { l: 110, r: 10, t: 10, b: 38 }, xaxis: episodeAxis(),
      // category: layer names such as "0" or "12" (nn.Sequential) must not become a numeric axis
      yaxis: { type: "category", autorange: "reversed", automargin: true, tickfont: { size: 10 } } });
  }

  // --- Pareto ----------------------------------------------------------------------------------------

  function costOf(e) { return e[page.cost_field]; }

  function front(points) {
    var pts = points.filter(function (p) { return finite(p[0]) && finite(p[1]); })
      .sort(function (a, b) { return a[0] - b[0] || b[1] - a[1]; });
    var out = [], best = -Infinity;
    pts.forEach(function (p) { if (p[1] > best) { out.push(p); best = p[1]; } });
    return out;
  }

  function paretoTraces() {
    return [
      { name: "episodes", x: [], y: [], text: [], mode: "markers", type: "scatter",
        marker: { color: C.over, size: 6, opacity: 0.8 },
        hovertemplate: "episode %{text}<br>" + page.cost_label + " %{x:.3f}<br>accuracy %{y:.2%}<extra></extra>" },
      { name: "Pareto front", x: [], y: [], text: [], mode: "lines+markers", type: "scatter",
        line: { color: C.front, width: 2, shape: "hv" }, marker: { color: C.front, size: 8 },
        hovertemplate: "episode %{text}<br>" + page.cost_label + " %{x:.3f}<br>accuracy %{y:.2%}<extra></extra>" },
      { name: "best (reward)", x: [], y: [], mode: "markers", type: "scatter",
        marker: { color: C.best, size: 14, symbol: "star", line: { color: "#fff", width: 1 } }, hoverinfo: "skip" }
    ];
  }

  function paretoLayout() {
    return layout({ xaxis: { title: { text: page.cost_label }, gridcolor: "#eef1f5", zeroline: false },
      yaxis: { title: { text: "accuracy" }, tickformat: ".1%", gridcolor: "#eef1f5", zeroline: false } });
  }

  function updateFront() {
    // One restyle for the front and the best marker: every Plotly call is a redraw.
    var f = front(state.points);
    var b = state.best && finite(costOf(state.best)) ? state.best : null;
    Plotly.restyle("chart-pareto", {
      x: [f.map(function (p) { return p[0]; }), b ? [costOf(b)] : []],
      y: [f.map(function (p) { return p[1]; }), b ? [b.accuracy] : []],
      text: [f.map(function (p) { return p[2]; }), []]
    }, [1, 2]);
  }

  // --- best policy -----------------------------------------------------------------------------------

  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]; }); }
  function pct(v, d) { return finite(v) ? (100 * v).toFixed(d === undefined ? 0 : d) + "%" : "—"; }

  function drawBest() {
    var e = state.best;
    if (!e) { return; }
    var p = policyOf(e);
    var names = state.layers.length ? state.layers : Object.keys(p);
    var keep = names.map(function (n) { return p[n] ? p[n].keep_ratio : 1; });
    var wb = names.map(function (n) { return bitsLevel(p[n] ? p[n].w_bits : FLOAT_BITS); });
    var ab = names.map(function (n) { return bitsLevel(p[n] ? p[n].a_bits : FLOAT_BITS); });
    Plotly.react("chart-policy", [
      { type: "bar", name: "keep ratio", x: names, y: keep, marker: { color: C.bar },
        hovertemplate: "%{x}<br>keep %{y:.0%}<extra></extra>" },
      { type: "scatter", mode: "markers", name: "w bits", x: names, y: wb, yaxis: "y2",
        marker: { color: C.best, size: 9, symbol: "diamond" }, hovertemplate: "%{x}<br>w %{y} bits<extra></extra>" },
      { type: "scatter", mode: "markers", name: "a bits", x: names, y: ab, yaxis: "y2",
        marker: { color: C.a, size: 7, symbol: "circle" }, hovertemplate: "%{x}<br>a %{y} bits<extra></extra>" }
    ], layout({
      // the legend sits above the plot, right-aligned, clear of the first bars
      margin: { l: 44, r: 44, t: 34, b: 70 },
      legend: { orientation: "h", x: 1, xanchor: "right", y: 1.02, yanchor: "bottom", font: { size: 10.5 } },
      xaxis: { type: "category", tickangle: -40, tickfont: { size: 9.5 }, automargin: true },
      yaxis: { title: { text: "keep" }, range: [0, 1.05], tickformat: ".0%", gridcolor: "#eef1f5" },
      yaxis2: { title: { text: "bits" }, overlaying: "y", side: "right", range: [0, FP_LEVEL + 0.5],
        tickvals: [2, 4, 6, 8, FP_LEVEL], ticktext: ["2", "4", "6", "8", "fp"], showgrid: false }
    }), STATIC);
    var rows = names.map(function (n) {
      var lp = p[n] || {};
      var ch = page.channels && page.channels[n];
      var keepR = finite(lp.keep_ratio) ? lp.keep_ratio : 1;
      var kept = ch ? Math.max(1, Math.round(ch * keepR)) + " / " + ch : "";
      return "<tr><td><code>" + esc(n) + "</code></td><td class=num>" + pct(keepR) + "</td><td class=num>" + kept +
        "</td><td class=num>" + (lp.w_bits || FLOAT_BITS) + "</td><td class=num>" + (lp.a_bits || FLOAT_BITS) +
        "</td><td class=num>" + pct(lp.sparsity || 0) + "</td></tr>";
    });
    document.querySelector("#best-policy tbody").innerHTML = rows.join("");
    document.getElementById("best-policy-episode").textContent = "episode " + e.number;
    document.getElementById("best-reward").textContent = finite(e.reward) ? e.reward.toFixed(4) : "—";
    document.getElementById("best-episode").textContent = e.number;
    document.getElementById("best-ratio").textContent = finite(e.cost_ratio) ? e.cost_ratio.toFixed(3) : "—";
    document.getElementById("best-cost").textContent = finite(e.latency_ms) ? fmtMs(e.latency_ms) :
      (finite(e.cost_ratio) ? e.cost_ratio.toFixed(3) : "—");
    if (!page.run.has_summary) {
      document.getElementById("best-accuracy").textContent = pct(e.accuracy, 1);
    }
  }

  function fmtMs(v) { return v >= 100 ? v.toFixed(0) + " ms" : v >= 1 ? v.toFixed(2) + " ms" : (v * 1000).toFixed(0) + " µs"; }

  // --- building and growing the charts ---------------------------------------------------------------

  function columns(list) {
    // Arrays for every trace update, computed once per batch of new episodes.
    var out = { line: {}, keep: { x: [], z: [] }, bits: { x: [], z: [] }, pareto: { x: [], y: [], text: [] } };
    Object.keys(METRICS).forEach(function (id) {
      out.line[id] = [{ x: [], y: [] }, { x: [], y: [] }, { x: [], y: [] }];
    });
    list.forEach(function (e) {
      // a finished run's best is the episode it exported (``chosen``): later records do not replace it
      if (e.is_best && !(state.best && state.best.chosen)) { state.best = e; }
      Object.keys(METRICS).forEach(function (id) {
        var v = METRICS[id].get(e);
        var cols = out.line[id];
        if (finite(v)) {
          var t = e.meets_budget === false ? cols[1] : cols[0];
          t.x.push(e.number); t.y.push(v);
        }
        var b = state.best ? METRICS[id].get(state.best) : null;
        if (finite(b)) { cols[2].x.push(e.number); cols[2].y.push(b); }
      });
      out.keep.x.push(e.number); out.keep.z.push(keepRow(e));
      out.bits.x.push(e.number); out.bits.z.push(bitsRow(e));
      var c = costOf(e);
      if (finite(c) && finite(e.accuracy)) {
        out.pareto.x.push(c); out.pareto.y.push(e.accuracy); out.pareto.text.push(e.number);
        state.points.push([c, e.accuracy, e.number]);
      }
      if (finite(e.wall_time_s)) { state.walls.push(e.wall_time_s); if (state.walls.length > 30) { state.walls.shift(); } }
      state.last = e.number;
      state.drawn += 1;
    });
    return out;
  }

  function build(list) {
    if (!state.layers.length && list.length) { state.layers = Object.keys(policyOf(list[0])); }
    var prevBest = state.best;
    var cols = columns(list);
    var empty = !list.length;
    function lay(l) { return empty ? placeholder(l) : l; }
    Object.keys(METRICS).forEach(function (id) {
      var traces = lineTraces(id);
      cols.line[id].forEach(function (c, i) { traces[i].x = c.x; traces[i].y = c.y; });
      Plotly.react(id, traces, lay(lineLayout(id)), CONFIG);
    });
    var keep = heatTrace("keep"); keep.x = cols.keep.x; keep.z = cols.keep.z;
    var bits = heatTrace("bits"); bits.x = cols.bits.x; bits.z = cols.bits.z;
    if (empty) { keep.showscale = false; bits.showscale = false; }
    Plotly.react("heat-keep", [keep], lay(heatLayout()), STATIC);
    Plotly.react("heat-bits", [bits], lay(heatLayout()), STATIC);
    var par = paretoTraces();
    par[0].x = cols.pareto.x; par[0].y = cols.pareto.y; par[0].text = cols.pareto.text;
    Plotly.react("chart-pareto", par, lay(paretoLayout()), CONFIG);
    updateFront();
    if (!state.best) {
      Plotly.react("chart-policy", [], placeholder(layout(), empty ? WAITING : "no episode within the budget yet"), STATIC);
    }
    if (state.best !== prevBest || (state.best && !state.built)) { drawBest(); }
    state.built = true;
  }

  function append(list) {
    list = list.filter(function (e) { return e.number > state.last; })
      .sort(function (a, b) { return a.number - b.number; });
    if (!list.length) { return; }
    if (!state.built || !state.drawn) { build(list); return; } // first points: replace the placeholders
    if (!state.layers.length) {
      // No layer list from the server (the run has not started): take it from the first policy.
      state.layers = Object.keys(policyOf(list[0]));
      Plotly.react("heat-keep", [heatTrace("keep")], heatLayout(), STATIC);
      Plotly.react("heat-bits", [heatTrace("bits")], heatLayout(), STATIC);
    }
    var prevBest = state.best;
    var cols = columns(list);
    Object.keys(METRICS).forEach(function (id) {
      var c = cols.line[id];
      Plotly.extendTraces(id, { x: [c[0].x, c[1].x, c[2].x], y: [c[0].y, c[1].y, c[2].y] }, [0, 1, 2]);
    });
    Plotly.extendTraces("heat-keep", { x: [cols.keep.x], z: [cols.keep.z] }, [0]);
    Plotly.extendTraces("heat-bits", { x: [cols.bits.x], z: [cols.bits.z] }, [0]);
    Plotly.extendTraces("chart-pareto", { x: [cols.pareto.x], y: [cols.pareto.y], text: [cols.pareto.text] }, [0]);
    updateFront();
    growEpisodeAxes();
    if (state.best !== prevBest) { drawBest(); }
    progress();
  }

  // --- status, progress, log -------------------------------------------------------------------------

  function setStatus(run) {
    if (!run) { return; }
    state.run = run;
    state.runAt = Date.now();
    var pill = document.querySelector("#run-status .pill");
    if (pill) { pill.className = "pill " + run.status; pill.textContent = run.status; }
    var phase = document.getElementById("phase");
    phase.textContent = run.phase || "";
    phase.hidden = !run.phase;
    document.getElementById("ep-total").textContent = run.episodes_total;
    // a cancel asked for elsewhere (another tab, the API): the notice shows and the button goes at once
    var stopping = run.cancel_requested && ACTIVE.indexOf(run.status) >= 0;
    var notice = document.getElementById("cancel-notice");
    if (notice) { notice.hidden = !stopping; }
    var cancelForm = document.getElementById("cancel-form");
    if (cancelForm && stopping) { cancelForm.hidden = true; }
    var chosenNow = run.best && run.best.chosen && !(state.best && state.best.chosen);
    if (run.best && run.best.policy && (chosenNow || !state.best || (!state.best.chosen && run.best.number > state.best.number))) {
      state.best = run.best;
      if (state.built) { drawBest(); updateFront(); }
    }
    progress();
    if (state.wasActive && ACTIVE.indexOf(run.status) < 0) {
      // The results, the final figures and the downloads are rendered by the server: show them.
      state.wasActive = false;
      state.reloading = true;
      setTimeout(function () { window.location.reload(); }, 1500);
    }
  }

  function fmtDuration(s) {
    if (!finite(s)) { return "—"; }
    if (s < 60) { return s.toFixed(1) + "s"; }
    s = Math.round(s);
    if (s < 3600) { return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s"; }
    return Math.floor(s / 3600) + "h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  }

  function progress() {
    var run = state.run;
    var done = Math.max(run.episodes_done || 0, state.last);
    var total = run.episodes_total || 0;
    document.getElementById("ep-done").textContent = done;
    document.getElementById("progress-bar").style.width = total ? Math.min(100, 100 * done / total) + "%" : "0";
    var active = ACTIVE.indexOf(run.status) >= 0;
    var elapsed = finite(run.elapsed_s) ? run.elapsed_s + (active ? (Date.now() - state.runAt) / 1000 : 0) : null;
    document.getElementById("elapsed").textContent = fmtDuration(elapsed);
    var eta = "—";
    if (active && run.status === "finalizing") {
      eta = run.phase === "device check" ? "measuring the best policies on the device" : "fine-tuning and exporting";
    }
    else if (active && state.walls.length && total > done) {
      var mean = state.walls.reduce(function (a, b) { return a + b; }, 0) / state.walls.length;
      eta = "≈ " + fmtDuration(mean * (total - done));
    } else if (!active) { eta = run.status === "finished" ? "none" : "— (" + run.status + ")"; }
    document.getElementById("eta").textContent = eta;
  }

  function addLog(lines) {
    var box = document.getElementById("log");
    var atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    var frag = document.createDocumentFragment();
    lines.forEach(function (l) {
      if (l.seq <= state.logSeq) { return; }
      state.logSeq = l.seq;
      var span = document.createElement("span");
      span.className = "lvl-" + String(l.level || "info").toUpperCase();
      span.textContent = (l.at ? l.at.slice(11, 19) + "  " : "") + l.message + "\n";
      frag.appendChild(span);
    });
    box.appendChild(frag);
    while (box.childNodes.length > 500) { box.removeChild(box.firstChild); }
    if (atBottom) { box.scrollTop = box.scrollHeight; }
  }

  // --- transport -------------------------------------------------------------------------------------

  // Episodes are drawn in batches (at most every FLUSH_MS): each Plotly call redraws a chart, and a fast
  // search sends several episodes a second, which one by one would keep a slow laptop's page busy.
  var FLUSH_MS = 400;
  var pending = [];
  var flushTimer = null;

  function queue(episode) {
    pending.push(episode);
    if (!flushTimer) { flushTimer = setTimeout(flush, FLUSH_MS); }
  }

  function flush() {
    flushTimer = null;
    if (pending.length) { append(pending.splice(0, pending.length)); }
  }

  function setConn(text, cls) {
    var el = document.getElementById("conn");
    el.textContent = text;
    el.className = "conn " + (cls || "");
  }

  function historyNote(more) {
    var note = "";
    if (more) {
      note = "loading history: " + state.historyCount + " of " + state.historyTotal + " episodes…";
    } else if (state.historyDownsampled) {
      note = "overview: " + state.historyCount + " of " + state.historyTotal + " episodes";
    }
    document.getElementById("downsampled-note").textContent = note;
  }

  function onMessage(msg) {
    state.messages += 1;
    state.received.push([msg.type, (msg.type === "history" || msg.type === "history_more") ?
      msg.episodes.map(function (e) { return e.number; }) :
      msg.type === "episode" ? [msg.episode.number] : []]);
    if (state.received.length > 300) { state.received.shift(); }
    if (msg.type === "history") {
      flush();
      if (msg.run) { setStatus(msg.run); }
      append(msg.episodes);
      if (msg.logs) { addLog(msg.logs); }
      state.historyCount = msg.episodes.length;
      state.historyTotal = msg.total;
      state.historyDownsampled = msg.downsampled;
      historyNote(msg.more);
      progress();
    } else if (msg.type === "history_more") {
      // a long history arrives in parts (the server keeps each message under 1 MiB)
      append(msg.episodes);
      state.historyCount += msg.episodes.length;
      historyNote(msg.more);
      progress();
    } else if (msg.type === "episode") {
      queue(msg.episode);
    } else if (msg.type === "status") {
      if (ACTIVE.indexOf(msg.run.status) < 0) { flush(); }
      setStatus(msg.run);
    } else if (msg.type === "log") {
      addLog(msg.lines);
    }
  }

  function connect() {
    var proto = window.location.protocol === "https:" ? "wss:" : "ws:";
    var ws = new WebSocket(proto + "//" + window.location.host + page.ws);
    state.socket = ws;
    ws.onopen = function () {
      state.retries = 0;
      // a run that is over streams nothing more: say what it is rather than "live"
      var over = state.run && ACTIVE.indexOf(state.run.status) < 0;
      setConn(over ? "● connected (run " + state.run.status + ")" : "● live", "live");
      stopPolling();
    };
    ws.onmessage = function (ev) {
      try { onMessage(JSON.parse(ev.data)); } catch (err) { if (window.console) { console.error(err); } }
    };
    ws.onclose = function (ev) {
      if (ev.code === 4403) { setConn("no access to this run's stream", "down"); return; }
      state.retries += 1;
      var delay = Math.min(10000, 500 * Math.pow(2, state.retries));
      setConn("reconnecting…", "down");
      startPolling();
      setTimeout(connect, delay);
    };
  }

  function poll() {
    var url = page.episodes_api + "?since=" + state.last;
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        if (data.episodes.length) { append(data.episodes); }
        if (data.run) { setStatus(data.run); }
      })
      .catch(function () { /* the server is down too: keep trying */ });
  }

  function startPolling() { if (!state.polling) { state.polling = setInterval(poll, 3000); } }
  function stopPolling() { if (state.polling) { clearInterval(state.polling); state.polling = null; } }

  // Empty charts right away (so the page has its shape before the first message), then connect.
  build([]);
  if (page.run.best && page.run.best.policy) { state.best = page.run.best; drawBest(); }
  progress();
  setInterval(progress, 1000);
  connect();
})();
