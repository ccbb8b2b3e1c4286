// The dashboard: reads the stats API (same origin, same token) and draws it with uPlot.
// No build step and no network beyond this server. State for tests: window.s5aDashboard.
"use strict";

(function () {
  const TOKEN_KEY = "s5a-api-token";
  const $ = (id) => document.getElementById(id);
  const state = {
    charts: {},
    data: {},
    refreshes: 0,
    errors: [],
    sort: { domains: "connections", registered: "connections", sources: "connections", users: "connections" },
    timer: null,
    loading: null,
  };
  window.s5aDashboard = state;

  // -- the token: from #token=... once (then forgotten from the address bar), else storage
  function readToken() {
    const match = location.hash.match(/(?:^#|&)token=([^&]+)/);
    if (match) {
      localStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    return localStorage.getItem(TOKEN_KEY) || "";
  }

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.code = error.code;
    }
  }

  async function api(path, params) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== undefined && value !== null) query.set(key, value);
    }
    const headers = { Accept: "application/json" };
    const token = readToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(`${path}?${query}`, { headers });
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  // -- the window and the filter chosen in the header
  function utcInput(date) {
    return date.toISOString().slice(0, 16);
  }

  function chosenWindow() {
    const range = $("range").value;
    if (range === "custom") {
      const from = $("from").value, to = $("to").value;
      if (from && to) return { from: `${from}:00Z`, to: `${to}:00Z` };
    }
    const seconds = range === "custom" ? 86400 : Number(range);
    const to = new Date();
    return { from: new Date(to - seconds * 1000).toISOString(), to: to.toISOString() };
  }

  function chosenFilter() {
    const key = $("filter-key").value, value = $("filter-value").value.trim();
    return key ? { [key]: value } : {};
  }

  // -- formatting
  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  function bytes(n) {
    let i = 0;
    while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
    return `${i ? n.toFixed(1) : n} ${UNITS[i]}`;
  }
  const count = (n) => Number(n).toLocaleString("en");
  const ms = (n) => (n === null || n === undefined ? "–" : `${Number(n).toFixed(1)} ms`);
  const when = (iso) => iso.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC");

  // -- charts
  function chartWidth(element) {
    return Math.max(300, element.clientWidth || element.parentElement.clientWidth - 24);
  }

  function timeChart(name, series, data, axisValues) {
    const element = $(`chart-${name}`);
    const existing = state.charts[name];
    if (existing) {
      existing.setData(data);
      return existing;
    }
    const options = {
      width: chartWidth(element),
      height: 240,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      series: [{}, ...series],
      axes: [{}, { values: (u, values) => values.map(axisValues), size: 80 }],
      legend: { live: true },
    };
    const chart = new uPlot(options, data, element);
    state.charts[name] = chart;
    return chart;
  }

  function drawTraffic(traffic) {
    const ts = traffic.points.map((p) => Date.parse(p.ts) / 1000);
    $("traffic-interval").textContent = `per ${traffic.interval}`;
    timeChart("bytes", [
      { label: "bytes in (download)", stroke: "#2f6fdf", fill: "rgba(47,111,223,0.08)", value: (u, v) => (v == null ? "–" : bytes(v)) },
      { label: "bytes out (upload)", stroke: "#e0742b", value: (u, v) => (v == null ? "–" : bytes(v)) },
    ], [ts, traffic.points.map((p) => p.bytes_in), traffic.points.map((p) => p.bytes_out)], bytes);
    timeChart("connections", [
      { label: "connections", stroke: "#3a9d5d", fill: "rgba(58,157,93,0.08)" },
    ], [ts, traffic.points.map((p) => p.connections)], count);
  }

  function drawLatency(slices, summary) {
    const ts = slices.map((s) => s.ts);
    const pick = (key) => slices.map((s) => (s.stats[key] === null ? null : s.stats[key]));
    timeChart("latency", [
      { label: "p50", stroke: "#3a9d5d", value: (u, v) => ms(v) },
      { label: "p95", stroke: "#e0742b", value: (u, v) => ms(v) },
      { label: "p99", stroke: "#b3261e", value: (u, v) => ms(v) },
    ], [ts, pick("p50_ms"), pick("p95_ms"), pick("p99_ms")], (v) => `${v} ms`);
    $("latency-summary").textContent = summary.count
      ? `${count(summary.count)} measured · avg ${ms(summary.avg_ms)} · p50 ${ms(summary.p50_ms)} · p95 ${ms(summary.p95_ms)} · p99 ${ms(summary.p99_ms)} · max ${ms(summary.max_ms)}`
      : "no measurements";
  }

  function drawBars(name, items, label, measure) {
    const list = $(`list-${name}`);
    list.replaceChildren();
    if (!items.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "nothing in this range";
      list.append(li);
      return;
    }
    const top = Math.max(...items.map(measure), 1);
    for (const item of items) {
      const li = document.createElement("li");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${(100 * measure(item)) / top}%`;
      const key = document.createElement("span");
      key.className = "key";
      key.textContent = label(item);
      key.title = label(item);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = item.bytes_total !== undefined
        ? `${count(item.connections)} conn · ${bytes(item.bytes_total)}`
        : count(item.connections);
      li.append(fill, key, value);
      list.append(li);
    }
  }

  function drawNodes(nodes) {
    const body = $("nodes").tBodies[0];
    body.replaceChildren();
    for (const node of nodes.items) {
      const row = body.insertRow();
      const cells = [node.node_id, node.version, node.policy_version, count(node.active_connections),
                     when(node.started_at), when(node.last_seen)];
      cells.forEach((text, index) => {
        const cell = row.insertCell();
        cell.textContent = text;
        if (index === 3) cell.className = "num";
      });
    }
    if (!nodes.items.length) {
      const cell = body.insertRow().insertCell();
      cell.colSpan = 6;
      cell.textContent = "no proxy node has reported yet";
    }
  }

  // Latency over time: /stats/latency over consecutive slices of whole minutes.
  function latencySlices(span) {
    const from = Date.parse(span.from), to = Date.parse(span.to);
    const minute = 60000;
    const width = Math.max(minute, Math.ceil((to - from) / 24 / minute) * minute);
    const slices = [];
    for (let start = Math.floor(from / minute) * minute; start < to; start += width) {
      slices.push({ from: new Date(start).toISOString(), to: new Date(Math.min(start + width, to)).toISOString() });
    }
    return slices;
  }

  const byMeasure = (sort) => (item) => (sort === "bytes" ? item.bytes_total : item.connections);

  async function refresh() {
    const span = chosenWindow();
    const base = { ...span, ...chosenFilter() };
    const list = (sort) => ({ ...base, limit: 10, sort });
    const status = $("status");
    status.textContent = "loading…";
    status.className = "";
    try {
      const slices = latencySlices(span);
      const [traffic, domains, registered, sources, users, statuses, latency, nodes, ...sliced] = await Promise.all([
        api("/stats/traffic", base),
        api("/stats/top-domains", list(state.sort.domains)),
        api("/stats/top-domains", { ...list(state.sort.registered), group: "registered_domain" }),
        api("/stats/source-ips", list(state.sort.sources)),
        api("/stats/users", list(state.sort.users)),
        api("/stats/statuses", { ...base, limit: 20 }),
        api("/stats/latency", base),
        api("/nodes", { limit: 1000 }),
        ...slices.map((slice) => api("/stats/latency", { ...base, ...slice })),
      ]);
      state.data = { span, traffic, domains, registered, sources, users, statuses, latency, nodes };
      drawTraffic(traffic);
      drawLatency(slices.map((slice, i) => ({ ts: Date.parse(slice.from) / 1000, stats: sliced[i] })), latency);
      drawBars("domains", domains.items, (i) => i.domain, byMeasure(state.sort.domains));
      drawBars("registered", registered.items, (i) => i.domain, byMeasure(state.sort.registered));
      drawBars("sources", sources.items, (i) => i.source_ip, byMeasure(state.sort.sources));
      drawBars("users", users.items, (i) => i.user || "(no authentication)", byMeasure(state.sort.users));
      drawBars("statuses", statuses.items, (i) => i.status, (i) => i.connections);
      drawNodes(nodes);
      state.refreshes += 1;
      status.textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC · ${when(span.from)} → ${when(span.to)}`;
    } catch (error) {
      state.errors.push(error.message);
      status.className = "error";
      status.textContent = error.message;
      if (error.status === 401) $("token-dialog").showModal();
    }
  }

  function schedule() {
    clearInterval(state.timer);
    const seconds = Number($("refresh").value);
    if (seconds > 0) state.timer = setInterval(() => { state.loading = refresh(); }, seconds * 1000);
  }

  function start() {
    readToken();
    const now = new Date();
    $("to").value = utcInput(now);
    $("from").value = utcInput(new Date(now - 86400000));
    $("range").addEventListener("change", () => {
      $("custom-range").hidden = $("range").value !== "custom";
      if ($("range").value !== "custom") state.loading = refresh();
    });
    $("controls").addEventListener("submit", (event) => { event.preventDefault(); state.loading = refresh(); });
    $("refresh").addEventListener("change", schedule);
    for (const select of document.querySelectorAll("select.sort")) {
      select.addEventListener("change", () => { state.sort[select.dataset.list] = select.value; state.loading = refresh(); });
    }
    $("token-form").addEventListener("submit", () => {
      localStorage.setItem(TOKEN_KEY, $("token").value.trim());
      state.loading = refresh();
    });
    addEventListener("resize", () => {
      for (const [name, chart] of Object.entries(state.charts)) {
        chart.setSize({ width: chartWidth($(`chart-${name}`)), height: 240 });
      }
    });
    state.loading = refresh();
    schedule();
  }

  start();
})();
