// keel console: refresh the server-drawn page from /v1/stats every 2 s.
// Writes text only (textContent, attributes): nothing from the store is
// ever parsed as HTML.
"use strict";
(function () {
  function at(v, path) {
    return path.split(".").reduce(function (o, k) { return o == null ? null : o[k]; }, v);
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2014";
    if (v === true) return "yes";
    if (v === false) return "no";
    return String(v);
  }
  function lists(stats) {
    document.querySelectorAll("tbody[data-list]").forEach(function (tb) {
      var rows = at(stats, tb.dataset.list);
      var cols = tb.dataset.cols.split(",");
      var frag = document.createDocumentFragment();
      if (!Array.isArray(rows) || rows.length === 0) {
        var tr = document.createElement("tr");
        var td = document.createElement("td");
        td.colSpan = cols.length;
        td.className = "empty";
        td.textContent = tb.dataset.empty || "";
        tr.appendChild(td);
        frag.appendChild(tr);
      } else {
        rows.forEach(function (row) {
          var tr = document.createElement("tr");
          cols.forEach(function (k) {
            var td = document.createElement("td");
            td.className = k;
            td.textContent = fmt(row[k]);
            tr.appendChild(td);
          });
          frag.appendChild(tr);
        });
      }
      tb.replaceChildren(frag);
    });
  }
  function chart(stats) {
    var series = stats.chart.acked_per_minute;
    var max = Math.max(1, stats.chart.max);
    document.querySelectorAll("#chart rect[data-i]").forEach(function (r) {
      var n = series[Number(r.dataset.i)] || 0;
      var h = Math.floor((n * 100) / max);
      r.setAttribute("y", String(100 - h));
      r.setAttribute("height", String(h));
    });
  }
  function apply(stats) {
    document.querySelectorAll("[data-k]").forEach(function (el) {
      el.textContent = fmt(at(stats, el.dataset.k));
    });
    var status = document.getElementById("status");
    if (status) status.className = stats.health.ready ? "ok" : "bad";
    lists(stats);
    chart(stats);
    document.body.dataset.refreshed = String(stats.now_ms);
  }
  function poll() {
    fetch("/v1/stats", { cache: "no-store", credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (s) { if (s) apply(s); })
      .catch(function () { /* keel restarting: try again next tick */ })
      .finally(function () { setTimeout(poll, 2000); });
  }
  setTimeout(poll, 2000);
})();
