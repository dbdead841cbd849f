// Draws the console's three charts from /api/v1/series (the console's
// cookie authenticates; GET needs no CSRF token). No framework, no inline
// script: the page's CSP allows only this file.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  function draw(svg, points, key) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const w = 300, h = 80, pad = 2;
    const values = points.map((p) => Number(p[key]) || 0);
    // One sample so far (the first 10 s): a flat line, not an empty box.
    if (values.length === 1) values.push(values[0]);
    const max = Math.max(1, ...values);
    const n = Math.max(2, values.length);
    const coords = values.map((v, i) => {
      const x = pad + (i * (w - 2 * pad)) / (n - 1);
      const y = h - pad - (v / max) * (h - 2 * pad);
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("points", coords.join(" "));
    line.setAttribute("class", "line");
    svg.appendChild(line);
    const label = document.createElementNS(NS, "text");
    label.setAttribute("x", "4");
    label.setAttribute("y", "12");
    label.setAttribute("class", "label");
    const last = values.length ? values[values.length - 1] : 0;
    label.textContent = "now " + format(last, key) + " · max " + format(max, key);
    svg.appendChild(label);
  }
  function format(v, key) {
    if (key === "bits_per_s") {
      const u = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"];
      let i = 0;
      while (v >= 1000 && i < u.length - 1) { v /= 1000; i++; }
      return v.toFixed(1) + " " + u[i];
    }
    return key === "sessions" ? String(Math.round(v)) : v.toFixed(1);
  }
  async function refresh() {
    try {
      const r = await fetch("/api/v1/series", { credentials: "same-origin" });
      if (!r.ok) return;
      const data = await r.json();
      const pts = data.points || [];
      const charts = [["chart-sessions", "sessions"], ["chart-logons", "logons_per_min"], ["chart-throughput", "bits_per_s"]];
      for (const [id, key] of charts) {
        const svg = document.getElementById(id);
        if (svg) draw(svg, pts, key);
      }
    } catch (e) {
      // The next refresh tries again.
    }
  }
  if (document.getElementById("chart-sessions")) {
    refresh();
    setInterval(refresh, 10000);
  }
})();
