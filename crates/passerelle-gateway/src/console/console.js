// The operator console's script: no framework, no build step, nothing fetched but this
// gateway's admin API. Every data call carries the admin token; the page itself holds none.
//
// Figures come from `/metrics` (Prometheus text), parsed here: rates are the difference
// between two samples divided by the time between them (what Prometheus's rate() does),
// percentiles are read from the histogram buckets' increase over that interval.
"use strict";

(function () {
  const REFRESH_MS = 2000;
  const HISTORY = 60; // sparkline points: two minutes at one sample every 2 s
  const TOKEN_KEY = "passerelle-admin-token";

  const $ = (sel, root) => (root || document).querySelector(sel);
  let token = null;
  let timer = null;
  let previous = null; // { at, series } of the last /metrics sample
  const rateHistory = new Map(); // route -> [req/s]
  let limitsLoaded = false;
  let auditQuery = null; // URLSearchParams of the search shown
  let auditCursor = null;

  // ---- the admin API ----

  class Unauthorized extends Error {}

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + token, Accept: "application/json" };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const res = await fetch(path, init);
    if (res.status === 401) throw new Unauthorized("the admin token was refused");
    const type = res.headers.get("content-type") || "";
    let data = null;
    if (type.includes("json")) data = await res.json();
    else data = await res.text();
    if (!res.ok) {
      const detail = data && typeof data === "object" ? (data.detail || data.title) : data;
      const err = new Error((detail || res.statusText) + " (" + res.status + ")");
      err.status = res.status;
      throw err;
    }
    return data;
  }

  // ---- Prometheus text ----

  // Returns Map("name{labels}" -> { name, labels, value }).
  function parseMetrics(text) {
    const out = new Map();
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const brace = line.indexOf("{");
      let name, labels = {}, rest;
      if (brace >= 0 && brace < line.indexOf(" ")) {
        name = line.slice(0, brace);
        const end = line.lastIndexOf("}");
        const inner = line.slice(brace + 1, end);
        const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
        let m;
        while ((m = re.exec(inner)) !== null) {
          labels[m[1]] = m[2].replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
        }
        rest = line.slice(end + 1).trim();
      } else {
        const sp = line.indexOf(" ");
        name = line.slice(0, sp);
        rest = line.slice(sp + 1).trim();
      }
      const value = parseFloat(rest.split(" ")[0]);
      if (Number.isNaN(value) && !/NaN/.test(rest)) continue;
      const key = brace >= 0 && brace < line.indexOf(" ") ? line.slice(0, line.lastIndexOf("}") + 1) : name;
      out.set(key, { key, name, labels, value });
    }
    return out;
  }

  function select(series, name, pred) {
    const out = [];
    for (const s of series.values()) {
      if (s.name === name && (!pred || pred(s.labels))) out.push(s);
    }
    return out;
  }

  function sum(list) {
    return list.reduce((a, s) => a + (Number.isFinite(s.value) ? s.value : 0), 0);
  }

  // The increase of a counter series since the previous sample (0 after a reset).
  function increase(key, now) {
    const cur = now.get(key);
    if (!cur) return 0;
    if (!previous) return null;
    const before = previous.series.get(key);
    const d = cur.value - (before ? before.value : 0);
    return d >= 0 ? d : cur.value;
  }

  // The q-quantile from cumulative buckets [{le, count}] (linear within a bucket).
  function quantile(q, buckets) {
    buckets.sort((a, b) => a.le - b.le);
    const total = buckets.length ? buckets[buckets.length - 1].count : 0;
    if (!total) return null;
    const rank = q * total;
    let prevLe = 0, prevCount = 0;
    for (const b of buckets) {
      if (b.count >= rank) {
        if (!Number.isFinite(b.le)) return prevLe;
        const inBucket = b.count - prevCount;
        const frac = inBucket > 0 ? (rank - prevCount) / inBucket : 0;
        return prevLe + (b.le - prevLe) * frac;
      }
      prevLe = Number.isFinite(b.le) ? b.le : prevLe;
      prevCount = b.count;
    }
    return prevLe;
  }

  // ---- formatting ----

  const fmt = {
    rate(v) { return v === null || v === undefined ? "–" : v < 10 ? v.toFixed(2) : v.toFixed(0); },
    ratio(v) { return v === null || v === undefined ? "–" : (v * 100).toFixed(1) + " %"; },
    ms(seconds) {
      if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
      const ms = seconds * 1000;
      return ms < 10 ? ms.toFixed(2) + " ms" : ms.toFixed(0) + " ms";
    },
    bytes(n) {
      if (n === null || n === undefined) return "–";
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let i = 0;
      while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
      return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
    },
    time(unixSeconds) {
      if (!unixSeconds) return "–";
      return new Date(unixSeconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
    },
  };

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("data-")) e.setAttribute(k, v);
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  // A row keyed by a data attribute, reused across refreshes (keeps focus and selection).
  function keyedRow(tbody, attrs, cells) {
    const sel = "tr" + Object.entries(attrs).map(([k, v]) => "[" + k + '="' + CSS.escape(v) + '"]').join("");
    let tr = tbody.querySelector(sel);
    if (!tr) {
      tr = el("tr", attrs);
      for (const c of cells) tr.append(el(c.th ? "th" : "td", c.th ? { scope: "row" } : {}));
      tbody.append(tr);
    }
    tr.dataset.seen = "1";
    cells.forEach((c, i) => {
      const cell = tr.children[i];
      cell.className = c.class || "";
      if (c.node) cell.replaceChildren(c.node);
      else cell.textContent = c.text;
    });
    return tr;
  }

  function sweep(tbody) {
    for (const tr of [...tbody.querySelectorAll("tr")]) {
      if (tr.dataset.seen !== "1") tr.remove();
      else delete tr.dataset.seen;
    }
  }

  function setState(panelId, state, message) {
    const panel = document.getElementById(panelId);
    panel.dataset.state = state;
    const p = $(".state", panel);
    p.textContent = message || (state === "live" ? "Live" : state === "error" ? "Error" : "Loading…");
  }

  function spark(values, label) {
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", "0 0 120 22");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", label);
    const base = document.createElementNS(NS, "line");
    base.setAttribute("x1", "0"); base.setAttribute("x2", "120");
    base.setAttribute("y1", "21"); base.setAttribute("y2", "21");
    svg.append(base);
    if (values.length > 1) {
      const max = Math.max(...values, 0.001);
      const step = 120 / (HISTORY - 1);
      const x0 = 120 - step * (values.length - 1);
      const pts = values.map((v, i) => (x0 + i * step).toFixed(1) + "," + (20 - (v / max) * 18).toFixed(1));
      const line = document.createElementNS(NS, "polyline");
      line.setAttribute("points", pts.join(" "));
      svg.append(line);
    }
    return svg;
  }

  // ---- panels fed by /metrics ----

  function renderRoutes(series, dt) {
    const tbody = $("#panel-routes tbody");
    const requests = select(series, "passerelle_http_requests_total", (l) => l.service === "gateway");
    const routes = [...new Set(requests.map((s) => s.labels.route))].sort();
    for (const route of routes) {
      let total = 0, errors = 0, dTotal = 0, dErrors = 0, haveDelta = previous !== null;
      for (const s of requests) {
        if (s.labels.route !== route) continue;
        const key = keyOf(series, s);
        const inc = increase(key, series);
        const isErr = Number(s.labels.status) >= 500;
        total += s.value; if (isErr) errors += s.value;
        if (inc !== null) { dTotal += inc; if (isErr) dErrors += inc; }
      }
      const rate = haveDelta && dt > 0 ? dTotal / dt : null;
      const errRatio = haveDelta && dTotal > 0 ? dErrors / dTotal : total > 0 ? errors / total : null;
      // Latency: the buckets' increase over the interval; with no request in it, since start.
      const buckets = select(series, "passerelle_http_request_duration_seconds_bucket",
        (l) => l.service === "gateway" && l.route === route);
      let bs = buckets.map((b) => ({ le: parseFloat(b.labels.le), count: increase(keyOf(series, b), series) ?? 0 }));
      if (!bs.some((b) => b.count > 0)) bs = buckets.map((b) => ({ le: parseFloat(b.labels.le), count: b.value }));
      const h = rateHistory.get(route) || [];
      if (rate !== null) { h.push(rate); if (h.length > HISTORY) h.shift(); }
      rateHistory.set(route, h);
      keyedRow(tbody, { "data-route": route }, [
        { th: true, text: route },
        { class: "num", text: fmt.rate(rate) },
        { class: "num" + (errRatio > 0.01 ? " bad" : ""), text: fmt.ratio(errRatio) },
        { class: "num", text: fmt.ms(quantile(0.5, bs.map((b) => ({ ...b })))) },
        { class: "num", text: fmt.ms(quantile(0.95, bs.map((b) => ({ ...b })))) },
        { class: "num", text: fmt.ms(quantile(0.99, bs.map((b) => ({ ...b })))) },
        { node: spark(h, "Requests per second of " + route + ", last " + h.length + " samples") },
      ]);
    }
    sweep(tbody);
    setState("panel-routes", "live", routes.length ? "Live" : "Live: no request yet");
  }

  // The map key of a series object (its name and labels as written).
  function keyOf(_series, s) {
    return s.key;
  }

  function ratioOrCount(part, whole) {
    return whole > 0 ? part / whole : null;
  }

  function renderCache(series) {
    const lookups = select(series, "passerelle_cache_lookups_total");
    const by = {};
    let dBy = {}, dAll = 0, all = 0;
    for (const s of lookups) {
      const r = s.labels.result;
      by[r] = (by[r] || 0) + s.value;
      all += s.value;
      const inc = increase(keyOf(series, s), series);
      if (inc !== null) { dBy[r] = (dBy[r] || 0) + inc; dAll += inc; }
    }
    // The last interval's ratios when it saw lookups; since start otherwise.
    const use = dAll > 0 ? dBy : by, den = dAll > 0 ? dAll : all;
    $("#cache-hit-l1").textContent = fmt.ratio(ratioOrCount(use.hit_l1 || 0, den));
    $("#cache-hit-l2").textContent = fmt.ratio(ratioOrCount(use.hit_l2 || 0, den));
    $("#cache-miss").textContent = fmt.ratio(ratioOrCount(use.miss || 0, den));
    const origin = sum(select(series, "passerelle_cache_origin_calls_total"));
    $("#cache-origin-calls").textContent = String(Math.round(origin));
    const entries = select(series, "passerelle_cache_l1_entries");
    $("#cache-l1-entries").textContent = entries.length ? String(Math.round(sum(entries))) : "–";
    setState("panel-cache", "live", lookups.length ? "Live" : "Live: no cached route answered yet");
  }

  function renderLimitDecisions(series) {
    const tbody = $("#panel-rate-limits tbody");
    const decisions = select(series, "passerelle_rate_limit_decisions_total");
    const names = [...new Set(decisions.map((s) => s.labels.limit))].sort();
    for (const name of names) {
      const of = (pred) => sum(decisions.filter((s) => s.labels.limit === name && pred(s.labels)));
      keyedRow(tbody, { "data-limit": name }, [
        { th: true, text: name },
        { class: "num", text: String(of((l) => l.decision === "allowed")) },
        { class: "num", text: String(of((l) => l.decision === "rejected")) },
        { class: "num", text: String(of((l) => l.source === "fallback")) },
      ]);
    }
    sweep(tbody);
    const active = select(series, "passerelle_rate_limit_fallback_active");
    const f = $("#limit-fallback");
    if (!active.length) {
      f.textContent = "not in use (rate limiting off)";
      f.className = "";
    } else if (sum(active) > 0) {
      f.textContent = "ACTIVE: Redis is not asked, each limit follows its on_redis_failure policy";
      f.className = "bad";
    } else {
      f.textContent = "inactive (Redis decides)";
      f.className = "good";
    }
  }

  async function refreshMetrics() {
    const text = await api("GET", "/metrics");
    const series = parseMetrics(text);
    const at = performance.now();
    const dt = previous ? (at - previous.at) / 1000 : 0;
    renderRoutes(series, dt);
    renderCache(series);
    renderLimitDecisions(series);
    previous = { at, series };
  }

  // ---- upstreams ----

  async function refreshUpstreams() {
    const data = await api("GET", "/upstreams");
    const tbody = $("#panel-upstreams tbody");
    const pools = Object.keys(data.upstreams || {}).sort();
    for (const pool of pools) {
      for (const ep of data.upstreams[pool].endpoints || []) {
        keyedRow(tbody, { "data-upstream": pool, "data-endpoint": ep.address }, [
          { th: true, text: pool },
          { text: ep.address },
          { class: "health " + (ep.healthy ? "good" : "bad"), text: ep.healthy ? "healthy" : "unhealthy" },
          { class: "in-flight num", text: String(ep.in_flight) },
          { class: "latency num", text: ep.latency_ms === undefined ? "–" : fmt.ms(ep.latency_ms / 1000) },
          { class: "ejected " + (ep.ejected ? "bad" : ""), text: ep.ejected ? "ejected" : "no" },
        ]);
      }
    }
    sweep(tbody);
    setState("panel-upstreams", "live", pools.length ? "Live" : "Live: no upstream pool");
  }

  // ---- rate limits: configured limits, lookup and reset ----

  async function loadLimits() {
    const list = await api("GET", "/rate-limits");
    const sel = $("#limit-name");
    sel.replaceChildren(...(Array.isArray(list) ? list : []).map((l) =>
      el("option", { value: l.name, text: l.name + " (by " + (l.by || []).join(", ") + ")" })));
    limitsLoaded = true;
  }

  async function refreshLimits() {
    if (!limitsLoaded) {
      try {
        await loadLimits();
      } catch (e) {
        if (e instanceof Unauthorized) throw e;
        limitsLoaded = true;
        $("#limit-state").textContent = "No limit to look up: " + e.message;
      }
    }
    setState("panel-rate-limits", "live");
  }

  function limitPath() {
    const name = $("#limit-name").value;
    const identity = $("#limit-identity").value.trim();
    if (!name || !identity) return null;
    return "/rate-limits/" + encodeURIComponent(name) + "/" + encodeURIComponent(identity);
  }

  async function lookupLimit(ev) {
    ev.preventDefault();
    const out = $("#limit-state");
    const path = limitPath();
    if (!path) { out.textContent = "Choose a limit and an identity (e.g. ip=127.0.0.1)."; return; }
    try {
      out.textContent = JSON.stringify(await api("GET", path), null, 2);
    } catch (e) { report(e, out); }
  }

  async function resetLimit() {
    const out = $("#limit-state");
    const path = limitPath();
    if (!path) { out.textContent = "Choose a limit and an identity (e.g. ip=127.0.0.1)."; return; }
    try {
      const r = await api("DELETE", path);
      out.textContent = "Reset " + r.limit + " for " + r.identity + ": " + (r.existed ? "its state was deleted" : "it had no state");
    } catch (e) { report(e, out); }
  }

  // ---- cache purge ----

  async function purge(ev) {
    ev.preventDefault();
    const out = $("#purge-result");
    const tag = $("#purge-tag").value.trim().replace(/^\/+/, "");
    if (!tag) { out.textContent = "A resource path, e.g. /users/7."; return; }
    try {
      const path = "/cache/tags/" + tag.split("/").map(encodeURIComponent).join("/");
      const r = await api("DELETE", path);
      out.textContent = "Purged " + r.deleted + " entries tagged " + r.tag + " (every replica, both levels).";
    } catch (e) { report(e, out); }
  }

  // ---- Redis ----

  async function refreshRedis() {
    const data = await api("GET", "/redis");
    const tbody = $("#panel-redis tbody");
    for (const r of data.roles || []) {
      const mem = fmt.bytes(r.used_memory) + " / " + (r.maxmemory ? fmt.bytes(r.maxmemory) : "no limit");
      keyedRow(tbody, { "data-role": r.role }, [
        { th: true, text: r.role + (r.shared ? " (shared)" : "") },
        { class: "up " + (r.up ? "good" : "bad"), text: r.up ? "up" : "down" + (r.error ? ": " + r.error : "") },
        { class: "memory num", text: mem },
        { class: "evictions num", text: r.evicted_keys === undefined ? "–" : String(r.evicted_keys) },
        { class: "ping num", text: r.ping_ms === null || r.ping_ms === undefined ? "–" : r.ping_ms.toFixed(2) + " ms" },
      ]);
    }
    sweep(tbody);
    renderFindings(data.roles || []);
    setState("panel-redis", "live", data.configured ? "Live" : "Live: no Redis configured");
  }

  function renderFindings(roles) {
    const items = [];
    const seen = new Set();
    for (const r of roles) {
      const d = r.doctor;
      if (!d || !d.report) continue;
      const id = d.role + "@" + d.recorded_at;
      if (seen.has(id)) continue;
      seen.add(id);
      const when = "ran " + fmt.time(d.recorded_at) + " by " + d.by;
      const findings = d.report.findings || [];
      if (!findings.length) {
        items.push(el("li", {}, el("span", { class: "sev sev-info", text: "clean" }), " " + d.role + ": no finding ",
          el("span", { class: "when", text: "(" + when + ")" })));
      }
      for (const f of findings) {
        items.push(el("li", { "data-severity": f.severity },
          el("span", { class: "sev sev-" + f.severity, text: f.severity }),
          " " + d.role + ": " + f.title + " ",
          el("span", { class: "when", text: "(" + when + ")" })));
      }
      if (d.omitted_findings) items.push(el("li", { text: d.omitted_findings + " more: run passerelle doctor" }));
    }
    if (!items.length) items.push(el("li", { text: "No doctor report recorded (run passerelle doctor)." }));
    $("#doctor-findings").replaceChildren(...items);
  }

  // ---- audit ----

  function auditParams() {
    const q = new URLSearchParams();
    for (const input of $("#audit-search").querySelectorAll("input, select")) {
      const v = input.value.trim();
      if (v) q.set(input.name, v);
    }
    return q;
  }

  async function runAudit(params, cursor) {
    const q = new URLSearchParams(params);
    if (cursor) q.set("cursor", cursor);
    const data = await api("GET", "/audit/search?" + q.toString());
    const tbody = $("#audit-results tbody");
    tbody.replaceChildren(...(data.items || []).map((t) =>
      el("tr", { "data-id": t.id },
        el("td", { text: t.time }), el("th", { scope: "row", text: t.id }),
        el("td", { text: t.from_account }), el("td", { text: t.to_account }),
        el("td", { class: "num", text: t.amount + " " + t.currency }),
        el("td", { text: t.status }), el("td", { text: t.user }))));
    auditQuery = params;
    auditCursor = data.next_cursor || null;
    $("#audit-next").disabled = !auditCursor;
    const count = data.count !== undefined ? ", " + data.count + " in all" : "";
    $("#audit-summary").textContent = (data.items || []).length + " shown" + count +
      (data.truncated ? " (search truncated: narrow it)" : "") + "; plan: " + (data.plan ? data.plan.driver : "–");
    setState("panel-audit", "live");
  }

  async function auditSearch(ev) {
    ev.preventDefault();
    try { await runAudit(auditParams(), null); } catch (e) { report(e, $("#audit-summary")); }
  }

  async function auditNext() {
    if (!auditCursor) return;
    try { await runAudit(auditQuery, auditCursor); } catch (e) { report(e, $("#audit-summary")); }
  }

  async function auditVerify() {
    const out = $("#audit-verify-result");
    const p = auditParams();
    const q = new URLSearchParams();
    if (p.get("from")) q.set("from", p.get("from"));
    if (p.get("to")) q.set("to", p.get("to"));
    out.textContent = "Verifying…";
    try {
      const r = await api("POST", "/audit/verify" + (q.toString() ? "?" + q : ""));
      out.textContent = (r.ok ? "Chain verified: OK. " : "Chain verification FAILED. ") +
        r.partitions + " partitions, " + r.records + " records, " + (r.findings || []).length + " findings.";
      out.className = "result " + (r.ok ? "good" : "bad");
    } catch (e) { out.className = "result"; report(e, out); }
  }

  // ---- API keys ----

  async function refreshKeys() {
    const data = await api("GET", "/keys?limit=200");
    const tbody = $("#keys tbody");
    for (const k of data.keys || []) {
      const tr = keyedRow(tbody, { "data-key-id": k.id }, [
        { th: true, text: k.id },
        { text: k.owner },
        { text: k.name || "" },
        { text: (k.scopes || []).join(" ") },
        { text: fmt.time(k.created) },
        { class: "state " + (k.revoked ? "bad" : ""), text: k.revoked ? "revoked" : k.expires && k.expires * 1000 < Date.now() ? "expired" : "active" },
        { node: revokeButton(k) },
      ]);
      tr.classList.toggle("revoked", Boolean(k.revoked));
    }
    sweep(tbody);
    setState("panel-keys", "live", (data.keys || []).length ? "Live" : "Live: no key issued");
  }

  function revokeButton(k) {
    const b = el("button", { type: "button", class: "revoke", "aria-label": "Revoke key " + k.id, text: "Revoke" });
    if (k.revoked) b.disabled = true;
    return b;
  }

  async function revoke(ev) {
    const b = ev.target.closest("button.revoke");
    if (!b) return;
    const id = b.closest("tr").dataset.keyId;
    b.disabled = true;
    try {
      await api("DELETE", "/keys/" + encodeURIComponent(id));
      await refreshKeys();
    } catch (e) { b.disabled = false; report(e, $("#panel-keys .state")); }
  }

  async function createKey(ev) {
    ev.preventDefault();
    const f = ev.target;
    const body = { owner: f.owner.value.trim(), scopes: f.scopes.value.split(/\s+/).filter(Boolean) };
    for (const k of ["name", "tier", "expires_in"]) if (f[k].value.trim()) body[k] = f[k].value.trim();
    try {
      const r = await api("POST", "/keys", body);
      $("#key-secret").textContent = r.key;
      f.reset();
      await refreshKeys();
    } catch (e) { $("#key-secret").textContent = ""; report(e, $("#panel-keys .state")); }
  }

  // ---- errors, login, refresh ----

  function report(e, target) {
    if (e instanceof Unauthorized) { signOut("The admin token was refused (401)."); return; }
    target.textContent = "Error: " + e.message;
  }

  const panels = [
    ["panel-routes", refreshMetrics],
    ["panel-upstreams", refreshUpstreams],
    ["panel-rate-limits", refreshLimits],
    ["panel-redis", refreshRedis],
    ["panel-keys", refreshKeys],
  ];

  async function tick() {
    timer = null;
    if (!token) return;
    const results = await Promise.allSettled(panels.map(([, f]) => f()));
    let refused = false;
    results.forEach((r, i) => {
      if (r.status === "rejected") {
        if (r.reason instanceof Unauthorized) refused = true;
        else {
          setState(panels[i][0], "error", "Error: " + r.reason.message);
          // The metrics feed three panels.
          if (panels[i][0] === "panel-routes") {
            setState("panel-cache", "error", "Error: " + r.reason.message);
          }
        }
      }
    });
    if (refused) { signOut("The admin token was refused (401)."); return; }
    $("#refreshed").textContent = "Updated " + new Date().toLocaleTimeString();
    if (token) timer = setTimeout(tick, REFRESH_MS);
  }

  async function signIn(candidate) {
    token = candidate;
    let who;
    try {
      who = await api("GET", "/console/whoami");
    } catch (e) {
      token = null;
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(e instanceof Unauthorized ? "The admin token was refused (401)." : "Cannot reach the admin API: " + e.message);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, candidate);
    const port = (who.admin_listen || "").split(":").pop();
    $("#gateway-id").textContent = who.hostname + ":" + port + " · pid " + who.pid + " · v" + who.version;
    $("#gateway-id").title = "listens on " + (who.listen || "?") + ", admin API on " + who.admin_listen;
    $("#login").hidden = true;
    $("#login-error").hidden = true;
    $("#console").hidden = false;
    $("#logout").hidden = false;
    tick();
    runAudit(new URLSearchParams({ limit: $("#audit-limit").value || "20" }), null).catch((e) => {
      if (e instanceof Unauthorized) { signOut("The admin token was refused (401)."); return; }
      setState("panel-audit", "error", "Error: " + e.message);
    });
  }

  function showLogin(error) {
    $("#console").hidden = true;
    $("#logout").hidden = true;
    $("#login").hidden = false;
    const err = $("#login-error");
    if (error) { err.textContent = error; err.hidden = false; } else { err.hidden = true; }
    $("#gateway-id").textContent = "(not signed in)";
    $("#token").focus();
  }

  function signOut(error) {
    token = null;
    if (timer) clearTimeout(timer);
    timer = null;
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(error);
  }

  function start() {
    $("#login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = $("#token").value.trim();
      $("#token").value = "";
      if (t) signIn(t);
    });
    $("#logout").addEventListener("click", () => signOut(null));
    $("#purge").addEventListener("submit", purge);
    $("#limit-lookup").addEventListener("submit", lookupLimit);
    $("#limit-reset").addEventListener("click", resetLimit);
    $("#audit-search").addEventListener("submit", auditSearch);
    $("#audit-next").addEventListener("click", auditNext);
    $("#audit-verify").addEventListener("click", auditVerify);
    $("#key-create").addEventListener("submit", createKey);
    $("#keys").addEventListener("click", revoke);

    // A token in the fragment (#token=...): kept for this tab only, and out of the address
    // bar and the history at once.
    const m = /^#token=(.+)$/.exec(location.hash);
    if (m) {
      const t = decodeURIComponent(m[1]);
      history.replaceState(null, "", location.pathname + location.search);
      signIn(t);
      return;
    }
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) signIn(saved);
    else showLogin(null);
  }

  start();
})();
