/* Small behaviours shared by pages: tabs, polling a JSON status until it changes, confirm on delete. */
(function () {
  "use strict";

  // Tabs: buttons with data-tab show the panel with the same data-panel, hide the others.
  document.querySelectorAll(".tabs").forEach(function (bar) {
    var buttons = bar.querySelectorAll("button[data-tab]");
    var scope = bar.parentElement;
    buttons.forEach(function (b) {
      b.addEventListener("click", function () {
        buttons.forEach(function (o) { o.classList.toggle("active", o === b); });
        scope.querySelectorAll(".tab-panel").forEach(function (p) {
          p.hidden = p.getAttribute("data-panel") !== b.getAttribute("data-tab");
        });
      });
    });
  });

  // Poll: an element with data-poll-url reloads the page when the JSON field named by data-poll-field
  // (dotted path) stops equalling data-poll-value. Used while a worker inspects, trains or measures.
  document.querySelectorAll("[data-poll-url]").forEach(function (el) {
    var url = el.getAttribute("data-poll-url");
    var field = el.getAttribute("data-poll-field") || "status";
    var value = el.getAttribute("data-poll-value");
    var every = parseInt(el.getAttribute("data-poll-ms") || "2000", 10);
    function pick(obj, path) {
      return path.split(".").reduce(function (o, k) { return o == null ? undefined : o[k]; }, obj);
    }
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          if (data && String(pick(data, field)) !== value) { window.location.reload(); return; }
          if (data && data.progress && el.querySelector("[data-progress]")) {
            var p = data.progress;
            el.querySelector("[data-progress]").textContent = Object.keys(p).filter(function (k) {
              return typeof p[k] !== "object" && k.charAt(0) !== "_";  // _keys: the worker's own bookkeeping
            }).map(function (k) {
              var v = p[k];
              return k + " " + (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(4) : v);
            }).join(" · ");
          }
          setTimeout(tick, every);
        })
        .catch(function () { setTimeout(tick, every * 2); });
    }
    setTimeout(tick, every);
  });

  document.querySelectorAll("form[data-confirm]").forEach(function (f) {
    f.addEventListener("submit", function (e) {
      if (!window.confirm(f.getAttribute("data-confirm"))) { e.preventDefault(); }
    });
  });
})();
