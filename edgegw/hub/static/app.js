// edgegw live dashboard: one WebSocket to /ws/live (JSON subprotocol), no build step, no
// internet.  Protocol: docs/live-protocol.md; topic shapes: docs/live-topics.md.
"use strict";

const SUBPROTOCOL = "edgegw.live.v1.json";
const TOPICS = ["lot/+", "lot/+/wafer/+", "test/+/+", "sensor/+", "gateway/+", "alert/#",
  "hub/state"];
// How a delta applies to a view, as the hub's hello gives it (docs/live-topics.md).
let mergeRules = [];

// topic -> state, and the (epoch, offset) we hold it at: what we resume from.  Each topic
// keeps its own epoch: in a cluster sharded over several Redis instances each shard has
// one (docs/cluster.md), and hello's is the first shard's.
const views = new Map();
const offsets = new Map();
const epochs = new Map();
// Wafers the hub archived (docs/live-topics.md): no view, but the topic's offset is kept,
// since the hub keeps the channel a while and a wafer tested again comes back on it as the
// next delta, its map whole -- taken as its new snapshot, not as a gap.  Insertion order:
// the oldest go first past the cap (the hub forgets the channel about 10 s after).
const archived = new Set();
const MAX_ARCHIVED = 1024;
let epoch = null;
let ws = null;
let backoff = 500;
let nextId = 1;
let dirty = true;
let alertsDirty = true;  // the alert list is rebuilt only when alerts change (keeps buttons)
const stats = { frames: 0, items: 0, snapshots: 0, resyncs: 0, reconnects: 0 };

const $ = (id) => document.getElementById(id);
const conn = $("conn");

// ------------------------------------------------------------------ connection

function setConn(state, text) {
  conn.dataset.state = state;
  conn.textContent = text;
}

function connect() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws/live";
  setConn(stats.reconnects ? "reconnecting" : "connecting",
          stats.reconnects ? "reconnecting…" : "connecting…");
  let sock;
  try {
    sock = new WebSocket(url, [SUBPROTOCOL]);
  } catch (err) {
    scheduleReconnect();
    return;
  }
  ws = sock;
  let opened = false;
  sock.onopen = () => {
    opened = true;
    backoff = 500;
    // Resume every topic we hold; the hub sends exactly what we missed, or a snapshot
    // marked "resync" when it cannot (another hub run, history too short).
    // An archived wafer has nothing to resume: it comes as a snapshot if it came back.
    for (const topic of [...archived]) forget(topic);
    const resume = {};
    for (const [topic, off] of offsets) resume[topic] = [epochs.get(topic) || epoch, off];
    send({ type: "subscribe", id: nextId++, topics: TOPICS, resume });
  };
  sock.onmessage = (ev) => onMessage(JSON.parse(ev.data));
  sock.onclose = async (ev) => {
    if (ws !== sock) return;
    ws = null;
    if (ev.code === 4401) {  // the sign-in expired or was withdrawn: sign in again --
      // unless the hub still takes the session as another role or lot scope (its [auth]
      // reloaded: docs/live-protocol.md): then reconnect as that
      if (!ev.reason.startsWith("sign-in changed")) { signIn(); return; }
      if (!(await checkSession())) return;  // (it went to the sign-in page)
    }
    setConn("reconnecting", `disconnected (${ev.code}${ev.reason ? " " + ev.reason : ""})`);
    // A refused upgrade (401) looks like any failed connection here: ask the hub.
    if (!opened && !(await checkSession())) return;
    scheduleReconnect();
  };
  sock.onerror = () => {};  // onclose follows
}

function signIn() {
  location.assign("/login?next=" + encodeURIComponent(location.pathname));
}

// Who we are signed in as (the hub records acknowledgements in that name); false when the
// hub wants a sign-in first.
async function checkSession() {
  let r;
  try {
    r = await fetch("/api/session", { credentials: "same-origin" });
  } catch (err) {
    return true;  // the hub is unreachable: keep reconnecting
  }
  if (r.status === 401) {
    signIn();
    return false;
  }
  if (!r.ok) return true;
  const s = await r.json();
  if (s.user) {
    $("user").value = s.user;
    $("user").readOnly = true;
    $("user").title = `signed in as ${s.user} (${s.role})`;
    $("signout").hidden = false;
    document.body.dataset.user = s.user;
  }
  return true;
}

function scheduleReconnect() {
  stats.reconnects++;
  dirty = true;
  const delay = backoff * (0.75 + Math.random() * 0.5);  // jitter: not every tab at once
  backoff = Math.min(backoff * 2, 10000);
  setTimeout(connect, delay);
}

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

function onMessage(msg) {
  switch (msg.type) {
    case "hello":
      if (epoch !== null && msg.epoch !== epoch) {
        // Another hub run: what we hold in that epoch may name topics it no longer has.
        // Their snapshots (marked resync: epoch_changed) follow right after our subscribe.
        document.body.dataset.hubRestarted = "true";
        for (const [topic, e] of epochs) {
          if (e === epoch) forget(topic);
        }
        dirty = alertsDirty = true;
      }
      epoch = msg.epoch;
      mergeRules = msg.merge || [];
      setConn("live", "live");
      break;
    case "batch":
      stats.frames++;
      for (const item of msg.items) applyItem(item);
      dirty = true;
      break;
    case "error":
      console.warn("hub error", msg.code, msg.message);
      if (msg.code === "ack_failed") setConn("live", "ack failed: " + msg.message);
      break;
    default:
      break;  // subscribed, unsubscribed, acked, pong
  }
}

function applyItem(item) {
  stats.items++;
  const topic = item.topic;
  if (topic.startsWith("alert/")) alertsDirty = true;
  if (item.type === "snapshot") {
    stats.snapshots++;
    if (item.resync) stats.resyncs++;
    if (isWafer(topic) && !(item.data && item.data.wafer_id)) {
      // A wafer that left the hub's memory before this page got its snapshot: its
      // offset is kept all the same, for its retest (below).
      markArchived(topic);
    } else {
      archived.delete(topic);
      views.set(topic, prepare(topic, item.data || {}));
    }
  } else if (item.type === "delta") {
    const returning = archived.has(topic);
    if (offsets.get(topic) !== item.from || epochs.get(topic) !== item.epoch
        || !(views.has(topic) || returning)) {
      // Never apply over a gap: start over from fresh snapshots.
      forget(topic);
      if (ws) ws.close(4000, "gap");
      return;
    }
    // A wafer back after it was archived (tested again): the hub's first delta after its
    // "archived" one carries its whole map and every other key -- its new snapshot.
    let view = returning ? prepare(topic, waferIds(topic)) : views.get(topic);
    archived.delete(topic);
    for (const delta of item.data) view = applyDelta(topic, view, delta);
    if (isWafer(topic) && view.status === "archived") {
      // The wafer left the hub's memory (its lot has more wafers than the hub keeps live,
      // or the lot was evicted): the history API serves it; the page keeps the live ones,
      // and the wafer's offset, for its retest.
      markArchived(topic);
    } else if (kindOf(topic) === "sensor" && view.status === "evicted") {
      // A sensor channel pushed out at the hub's cap (docs/live-topics.md) goes.
      forget(topic);
      return;
    } else {
      views.set(topic, view);
    }
  }
  offsets.set(topic, item.offset);
  epochs.set(topic, item.epoch);
}

function markArchived(topic) {
  views.delete(topic);
  archived.delete(topic);  // (the newest last)
  archived.add(topic);
  while (archived.size > MAX_ARCHIVED) forget(archived.values().next().value);
}

function forget(topic) {
  archived.delete(topic);
  views.delete(topic);
  offsets.delete(topic);
  epochs.delete(topic);
}

// Local shape of each topic: the lists the hub's merge rules upsert into become Maps keyed
// by identity (a wafer's dies by X,Y, so a retest replaces its die; alerts by id).
function prepare(topic, data) {
  const view = { ...data };
  for (const rule of rulesFor(topic)) {
    if (rule.op !== "upsert") continue;
    const rows = data[rule.into] || [];
    const byIdentity = new Map();
    for (const row of rule.order === "newest_first" ? rows.slice().reverse() : rows) {
      byIdentity.set(identity(row, rule.by), row);
    }
    view[rule.into] = byIdentity;
  }
  return view;
}

function applyDelta(topic, view, delta) {
  const out = { ...view };
  const rules = rulesFor(topic);
  for (const [key, value] of Object.entries(delta)) {
    const rule = rules.find((r) => r.key === key);
    const list = rule ? view[rule.into] : undefined;
    if (rule && rule.op === "upsert" && list instanceof Map) {
      for (const row of Array.isArray(value) ? value : [value]) list.set(identity(row, rule.by), row);
      out[rule.into] = list;
    } else if (rule && rule.op === "append") {
      const longer = (list || []).concat(value);
      out[rule.into] = longer.length > rule.keep ? longer.slice(-rule.keep) : longer;
    } else if (rule && rule.op === "prepend") {
      out[rule.into] = [value].concat(list || []).slice(0, rule.keep);
    } else {
      out[key] = value;
    }
  }
  return out;
}

// MQTT-style topic filters: "+" one level, "#" the rest (also the parent level itself).
function topicMatches(filter, topic) {
  const f = filter.split("/");
  const t = topic.split("/");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === "#") return true;
    if (i >= t.length || (f[i] !== "+" && f[i] !== t[i])) return false;
  }
  return f.length === t.length;
}
const rulesFor = (topic) => mergeRules.filter((rule) => topicMatches(rule.topics, topic));
const identity = (row, by) => (Array.isArray(by) ? by.map((i) => row[i]).join(",") : row[by]);

const isWafer = (topic) => /^lot\/[^/]+\/wafer\/[^/]+$/.test(topic);
// A wafer topic's ids (percent-encoded in the topic name: docs/live-protocol.md).
function waferIds(topic) {
  const parts = topic.split("/");
  return { lot_id: decodeURIComponent(parts[1]), wafer_id: decodeURIComponent(parts[3]) };
}
const kindOf = (topic) => topic.split("/")[0];
const isLot = (topic) => /^lot\/[^/]+$/.test(topic);

function latestLot() {
  let best = null;
  for (const [topic, v] of views) {
    if (isLot(topic) && v.lot_id != null && v.status !== "evicted"
        && (!best || (v.updated ?? 0) > (best.updated ?? 0))) best = v;
  }
  return best ? best.lot_id : null;
}

// ------------------------------------------------------------------ rendering

const PALETTE = ["#3fb950", "#f85149", "#d29922", "#a371f7", "#58a6ff", "#ff7b72", "#79c0ff",
  "#e3b341", "#db61a2", "#56d4dd", "#8b949e", "#ffa657"];
const NO_BIN_COLOR = "#58a6ff";  // a die without a bin (parametric-only data)
function binColor(hardBin) {
  if (hardBin == null) return NO_BIN_COLOR;
  if (hardBin === 1) return PALETTE[0];
  return PALETTE[1 + (((hardBin - 2) % (PALETTE.length - 1)) + PALETTE.length - 1) % (PALETTE.length - 1)];
}

const canvas = $("wafer-map");
const ctx = canvas.getContext("2d");
let mapGeom = null;

function selectedWafer() {
  const chosen = $("wafer-select").value;
  if (chosen && views.has(chosen)) return chosen;
  let best = null;
  let bestT = -Infinity;
  for (const [topic, v] of views) {
    if (!isWafer(topic)) continue;
    const t = v.updated || 0;
    if (t >= bestT) { best = topic; bestT = t; }
  }
  return best;
}

function renderWaferSelect() {
  const sel = $("wafer-select");
  const wafers = [...views.keys()].filter(isWafer).sort();
  const have = [...sel.options].slice(1).map((o) => o.value);
  if (have.join("|") === wafers.join("|")) return;
  const chosen = sel.value;
  sel.length = 1;
  for (const w of wafers) {
    const v = views.get(w);
    sel.add(new Option(`${v.lot_id ?? w.split("/")[1]} / ${v.wafer_id ?? w.split("/")[3]}`, w));
  }
  sel.value = wafers.includes(chosen) ? chosen : "";
}

// A lot (wafer) tested again under its id (docs/live-topics.md, starts / reopened_at):
// which pass is under test and when it began, by the tester's clock.
function passes(v) {
  if (!v || !(v.starts > 1)) return "";
  const when = v.reopened_at != null ? new Date(v.reopened_at * 1000).toLocaleString() : "?";
  return ` · <span class="pass" data-starts="${v.starts}" title="tested again under its id: ` +
    `${v.starts} passes, the figures are over all of them">pass ${v.starts} · reopened ${escapeHtml(when)}</span>`;
}

// The lot's header: the wafer's lot, or with no wafer (final test) the latest lot.
function renderLotTitle(lotId) {
  const el = $("lot-title");
  const lot = lotId != null ? views.get(`lot/${lotId}`) : null;
  if (!lot) { setHtml(el, lotId != null ? `lot ${escapeHtml(lotId)}` : ""); el.dataset.lot = ""; return; }
  el.dataset.lot = lot.lot_id;
  const noWafers = !(lot.wafers || []).some((w) => w) && lot.die_count > 0;
  setHtml(el, `lot <b>${escapeHtml(lot.lot_id)}</b>` +
    (lot.part_type ? ` · ${escapeHtml(lot.part_type)}` : "") + ` · ${escapeHtml(lot.status || "")}` +
    (noWafers ? " · final test (no wafers)" : "") + passes(lot));
}

// Headers are rebuilt every draw but change seldom: touch the DOM only when they do.
const shownHtml = new WeakMap();
function setHtml(el, html) {
  if (shownHtml.get(el) !== html) { el.innerHTML = html; shownHtml.set(el, html); }
}

function renderWafer(topic) {
  const view = topic ? views.get(topic) : null;
  const w = canvas.width;
  const h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  canvas.dataset.topic = topic || "";
  if (!view) {
    canvas.dataset.dieCount = "0";
    mapGeom = null;
    return;
  }
  const dies = [...view.dies.values()];
  let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
  for (const d of dies) {
    if (d[0] < minX) minX = d[0];
    if (d[0] > maxX) maxX = d[0];
    if (d[1] < minY) minY = d[1];
    if (d[1] > maxY) maxY = d[1];
  }
  const cols = dies.length ? maxX - minX + 1 : 1;
  const rows = dies.length ? maxY - minY + 1 : 1;
  const cell = Math.max(1, Math.floor(Math.min((w - 8) / cols, (h - 8) / rows)));
  const ox = Math.floor((w - cell * cols) / 2);
  const oy = Math.floor((h - cell * rows) / 2);
  // Wafer outline.
  ctx.strokeStyle = "#2c323c";
  ctx.beginPath();
  ctx.arc(w / 2, h / 2, Math.min(w, h) / 2 - 2, 0, 2 * Math.PI);
  ctx.stroke();
  const gap = cell > 4 ? 1 : 0;
  let drawn = 0;
  const binsSeen = new Map();
  const byTest = colorByTest();
  const values = byTest ? dieValuesFor(topic, byTest) : null;
  const scale = values ? valueScale(values) : null;
  canvas.dataset.mode = byTest ? `test:${byTest}` : "bin";
  canvas.dataset.valued = values ? String(values.dies.size) : "0";
  for (const d of dies) {
    if (scale) {
      const v = values.dies.get(d[0] + "," + d[1]);
      ctx.fillStyle = v === undefined ? "#2c323c" : scale.color(v);
    } else {
      ctx.fillStyle = binColor(d[2]);
    }
    ctx.fillRect(ox + (d[0] - minX) * cell, oy + (d[1] - minY) * cell, cell - gap, cell - gap);
    binsSeen.set(d[2], (binsSeen.get(d[2]) || 0) + 1);
    drawn++;
  }
  mapGeom = { minX, minY, cell, ox, oy, topic };
  // What the page has drawn, for people and for the browser test.
  canvas.dataset.dieCount = String(drawn);
  setHtml($("wafer-title"), `wafer ${escapeHtml(view.wafer_id)} · ${escapeHtml(view.status || "")}` +
    passes(view));
  const na = notApplicable(view);
  const y = na.has("yield") ? NA : view.yield == null ? "–" : (100 * view.yield).toFixed(1) + " %";
  const good = na.has("yield") ? NA : view.good ?? 0;
  $("wafer-figures").innerHTML =
    `<span>dies <b>${drawn}</b></span><span>good <b class="good">${good}</b></span>` +
    `<span>yield <b class="yield">${y}</b></span><span>retests <b>${view.retests ?? 0}</b></span>`;
  if (scale) {
    const t = views.get(testTopic(view.lot_id, byTest));
    $("legend").innerHTML = `<span class="muted">${escapeHtml(t ? t.test_num + " " + (t.test_txt || "") : byTest)}` +
      `</span> ${fmtNum(scale.lo)} <i class="gradient"></i> ${fmtNum(scale.hi)} ${escapeHtml(values.units || "")}` +
      ` <span class="muted">(${values.dies.size} dies${scale.limits ? ", limits" : ", min–max"})</span>`;
  } else {
    $("legend").innerHTML = [...binsSeen.keys()].sort((a, b) => (a ?? 1e9) - (b ?? 1e9))
      .map((b) => `<span style="--c:${binColor(b)}">${b == null ? "no bin" : "bin " + b}</span>`)
      .join("");
  }
}

// ------------------------------------------------------------------ history API reads
// What the live topics do not carry is read from the history API (docs/api.md): every
// wafer of the lot (those that left memory too), a test's value per die, the alert rules.

const DEFAULT_YIELD_THRESHOLD = 0.85;  // docs/dashboard.md: when the hub has no wafer_yield rule
let yieldThreshold = null;  // {value, rule} from /api/alerts/rules
const lotWafers = new Map();  // lot -> {at, wafers: [{wafer_id, yield, die_count, ...}]}
const dieValues = new Map();  // "wafer topic|test" -> {at, dies: Map("x,y" -> value), ...}
const inflight = new Set();

async function getJson(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return r.json();
}

// Fetch at most every `every` ms per key, one request at a time; redraw when it lands.
function refresh(key, every, cache, path, shape) {
  const have = cache.get(key);
  if ((have && Date.now() - have.at < every) || inflight.has(key)) return;
  inflight.add(key);
  getJson(path).then((data) => { cache.set(key, { at: Date.now(), ...shape(data) }); dirty = true; })
    .catch(() => { cache.set(key, { at: Date.now(), ...(have || shape(null)) }); })
    .finally(() => inflight.delete(key));
}

function loadRules() {
  getJson("/api/alerts/rules").then((data) => {
    const rule = (data.rules || []).find((r) => r.kind === "wafer_yield" && r.threshold != null);
    yieldThreshold = rule ? { value: rule.threshold, rule: rule.name } : null;
    dirty = true;
  }).catch(() => {});
}

function dieValuesFor(topic, testNum) {
  // The ids, encoded afresh: a topic level escapes only "/", "+", "#" and "%", so an id's
  // "?" or "&" pasted from it would end the URL's path.
  const ids = waferIds(topic);
  const key = topic + "|" + testNum;
  const path = `/api/lots/${encodeURIComponent(ids.lot_id)}/wafers/`
    + `${encodeURIComponent(ids.wafer_id)}/tests/${testNum}`;
  refresh(key, 2000, dieValues, path, (d) => ({
    dies: new Map((d ? d.dies : []).map(([x, y, v]) => [x + "," + y, v])),
    lo: d ? d.lo_limit : null, hi: d ? d.hi_limit : null, units: d ? d.units : "",
  }));
  const got = dieValues.get(key);
  return got && got.dies.size ? got : null;
}

// Diverging colours from the low limit (blue) to the high limit (red), grey in the middle;
// without both limits, the wafer's own min..max.
const RAMP = [[59, 76, 192], [141, 176, 254], [221, 221, 221], [244, 154, 123], [180, 4, 38]];
function valueScale(values) {
  let lo = values.lo;
  let hi = values.hi;
  const limits = lo != null && hi != null && hi > lo;
  if (!limits) {
    const all = [...values.dies.values()];
    lo = Math.min(...all);
    hi = Math.max(...all);
    if (!(hi > lo)) hi = lo + 1;
  }
  const color = (v) => {
    const t = Math.max(0, Math.min(1, (v - lo) / (hi - lo))) * (RAMP.length - 1);
    const i = Math.min(RAMP.length - 2, Math.floor(t));
    const f = t - i;
    const c = RAMP[i].map((a, k) => Math.round(a + (RAMP[i + 1][k] - a) * f));
    return (limits && (v < lo || v > hi)) ? "#ff00ff" : `rgb(${c[0]},${c[1]},${c[2]})`;
  };
  return { lo, hi, limits, color };
}

// ------------------------------------------------------------------ charts (SVG)

const SVG_W = 400;
const fmtNum = (x) => (x == null || !isFinite(x) ? "–" : Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-2 && x !== 0)
  ? Number(x).toExponential(2) : Number(x).toPrecision(4).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, ""));

function svg(h, body, marks) {
  return `<svg viewBox="0 0 ${SVG_W} ${h}" preserveAspectRatio="xMidYMid meet" data-marks="${marks}">${body}</svg>`;
}

// A line chart of points [label, y] with optional horizontal rules [{y, color, label, dash}].
function lineChart({ points, rules = [], yMin, yMax, h = 150, fmtY = fmtNum, bad = () => false }) {
  const padL = 44, padR = 8, padT = 8, padB = 18;
  const ys = points.map((p) => p[1]).concat(rules.map((r) => r.y)).filter((v) => v != null && isFinite(v));
  let lo = yMin ?? Math.min(...ys);
  let hi = yMax ?? Math.max(...ys);
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  const pad = yMin == null ? (hi - lo) * 0.08 : 0;
  lo -= pad; hi += pad;
  const X = (i) => padL + (points.length < 2 ? (SVG_W - padL - padR) / 2 : i * (SVG_W - padL - padR) / (points.length - 1));
  const Y = (v) => padT + (1 - (v - lo) / (hi - lo)) * (h - padT - padB);
  let body = "";
  for (const t of [lo, (lo + hi) / 2, hi]) {
    body += `<line x1="${padL}" x2="${SVG_W - padR}" y1="${Y(t)}" y2="${Y(t)}" stroke="#2c323c"/>` +
      `<text x="${padL - 4}" y="${Y(t) + 3}" text-anchor="end">${fmtY(t)}</text>`;
  }
  for (const r of rules) {
    if (r.y == null || !isFinite(r.y)) continue;
    body += `<line class="rule" x1="${padL}" x2="${SVG_W - padR}" y1="${Y(r.y)}" y2="${Y(r.y)}" stroke="${r.color}"` +
      ` stroke-dasharray="${r.dash || "4 3"}"/><text x="${SVG_W - padR - 2}" y="${Y(r.y) - 3}" text-anchor="end"` +
      ` style="fill:${r.color}">${escapeHtml(r.label)}</text>`;
  }
  const path = points.map((p, i) => `${i ? "L" : "M"}${X(i).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
  body += `<path d="${path}" fill="none" stroke="#58a6ff" stroke-width="1.5"/>`;
  points.forEach((p, i) => {
    body += `<circle cx="${X(i).toFixed(1)}" cy="${Y(p[1]).toFixed(1)}" r="2.6" fill="${bad(p[1]) ? "#f85149" : "#58a6ff"}">` +
      `<title>${escapeHtml(p[0])}: ${fmtY(p[1])}</title></circle>`;
  });
  const first = points.length ? escapeHtml(points[0][0]) : "";
  const last = points.length > 1 ? escapeHtml(points[points.length - 1][0]) : "";
  body += `<text x="${padL}" y="${h - 4}">${first}</text><text x="${SVG_W - padR}" y="${h - 4}" text-anchor="end">${last}</text>`;
  return svg(h, body, points.length);
}

function renderTrend(lotId) {
  const el = $("yield-trend");
  $("trend-scope").textContent = lotId ? `lot ${lotId}` : "";
  if (!lotId) { el.innerHTML = '<div class="empty">no lot yet</div>'; return; }
  refresh(lotId, 5000, lotWafers, `/api/lots/${encodeURIComponent(lotId)}/wafers`,
          (d) => ({ wafers: d ? d.wafers : [] }));
  // The history API's list (every wafer, archived ones too), the live views fresher.
  const byId = new Map();
  for (const w of (lotWafers.get(lotId) || { wafers: [] }).wafers) byId.set(w.wafer_id, w);
  for (const [topic, v] of views) if (isWafer(topic) && v.lot_id === lotId) byId.set(v.wafer_id, v);
  // (a part without a wafer id is no wafer: an older hub or archive may still list "")
  const rows = [...byId.values()].filter((w) => w.wafer_id && w.yield != null && w.die_count > 0)
    .sort((a, b) => (a.started ?? 0) - (b.started ?? 0) || String(a.wafer_id).localeCompare(String(b.wafer_id)));
  if (!rows.length) {
    // A final-test lot (packaged parts, no WIR/WRR) has parts but no wafers: say so.
    const lot = views.get(`lot/${lotId}`);
    const noWafers = lot && !(lot.wafers || []).some((w) => w) && lot.die_count > 0;
    el.innerHTML = noWafers
      ? `<div class="empty" data-final-test="1">no wafers: parts tested without a wafer id (final test) · lot yield ${lot.yield != null ? (100 * lot.yield).toFixed(1) + " %" : "–"}</div>`
      : '<div class="empty">no wafer yet</div>';
    return;
  }
  const threshold = yieldThreshold ? yieldThreshold.value : DEFAULT_YIELD_THRESHOLD;
  const label = `alert ${(100 * threshold).toFixed(0)} %` + (yieldThreshold ? ` (${yieldThreshold.rule})` : " (default)");
  el.innerHTML = lineChart({
    points: rows.map((w) => [String(w.wafer_id), 100 * w.yield]),
    rules: [{ y: 100 * threshold, color: "#d29922", label }],
    yMax: 100, yMin: Math.max(0, Math.min(100 * threshold, ...rows.map((w) => 100 * w.yield)) - 5),
    fmtY: (v) => v.toFixed(0) + "%", bad: (v) => v < 100 * threshold,
  });
  el.firstChild.dataset.threshold = String(threshold);
}

const testTopic = (lotId, num) => `test/${lotId}/${num}`;
let selectedTest = null;  // test number clicked in the Tests table

function chosenTest(lotId) {
  if (!lotId) return null;
  const tests = lotTests(lotId).filter((t) => t.kind !== "functional");
  const keep = tests.find((t) => t.test_num === selectedTest);
  return keep || tests[0] || null;
}

// A test known by name (its number is the CRC-32 of the name, docs/plugins.md "Named
// tests") is shown by its name alone, and such tests sort by name after the numbered ones.
function testLabel(v) { return v.named ? v.test_txt : `${v.test_num} ${v.test_txt || ""}`; }

function lotTests(lotId) {
  const rows = [];
  for (const [topic, v] of views) if (kindOf(topic) === "test" && v.lot_id === lotId) rows.push(v);
  return rows.sort((a, b) => (a.named && b.named ? testLabel(a).localeCompare(testLabel(b))
    : a.named !== b.named ? (a.named ? 1 : -1) : a.test_num - b.test_num));
}

function renderTestCharts(lotId) {
  const t = chosenTest(lotId);
  const hEl = $("histogram");
  const cEl = $("control");
  if (!t || !t.histogram) {
    $("dist-scope").textContent = "click a test";
    hEl.innerHTML = cEl.innerHTML = '<div class="empty">no parametric test yet</div>';
    return;
  }
  const name = `${t.test_num} ${t.test_txt || ""}`;
  $("dist-scope").textContent = `${name} · n ${t.count}${t.units ? " · " + t.units : ""}`;
  hEl.innerHTML = histogram(t);
  hEl.firstChild.dataset.test = String(t.test_num);
  // Mean per wafer; per site while the lot has a single wafer.
  const perWafer = (t.wafers || []).filter((w) => w[1] > 0);
  const perSite = Object.entries(t.sites || {}).map(([s, r]) => [`site ${s}`, ...r]);
  const series = perWafer.length >= 2 ? perWafer : perSite;
  $("control-scope").textContent = `${name} · mean per ${series === perWafer ? "wafer" : "site"}`;
  if (!series.length) { cEl.innerHTML = '<div class="empty">no values yet</div>'; return; }
  // Centre line: the lot's mean; control limits: ±3 standard errors of a group's mean.
  const n = series.reduce((s, r) => s + r[1], 0) / series.length;
  const se = t.sigma ? t.sigma / Math.sqrt(Math.max(1, n)) : 0;
  const ucl = t.mean + 3 * se;
  const lcl = t.mean - 3 * se;
  cEl.innerHTML = lineChart({
    points: series.map((r) => [String(r[0]), r[2]]),
    rules: [{ y: t.mean, color: "#8a93a3", label: "mean", dash: "1 0" },
            { y: ucl, color: "#f85149", label: "UCL" }, { y: lcl, color: "#f85149", label: "LCL" }],
    bad: (v) => v > ucl || v < lcl,
  });
  cEl.firstChild.dataset.test = String(t.test_num);
}

function histogram(t) {
  const hg = t.histogram;
  const h = 150, padL = 8, padR = 8, padT = 8, padB = 18;
  const counts = hg.counts;
  // Show the bins that hold values and the limits, not the empty ends of the range.
  const used = counts.map((c, i) => (c ? i : -1)).filter((i) => i >= 0);
  const edge = (i) => hg.lo + i * hg.width;
  let from = used.length ? used[0] : 0;
  let to = used.length ? used[used.length - 1] + 1 : counts.length;
  for (const lim of [t.lo_limit, t.hi_limit]) {
    if (lim == null) continue;
    const i = Math.floor((lim - hg.lo) / hg.width);
    if (i >= 0 && i <= counts.length) { from = Math.min(from, Math.max(0, i - 1)); to = Math.max(to, Math.min(counts.length, i + 2)); }
  }
  const x0 = edge(from), x1 = edge(to);
  const X = (v) => padL + (v - x0) / (x1 - x0) * (SVG_W - padL - padR);
  const max = Math.max(1, ...counts);
  let body = "";
  let bars = 0;
  for (let i = from; i < to; i++) {
    if (!counts[i]) continue;
    const bh = counts[i] / max * (h - padT - padB);
    const out = (t.lo_limit != null && edge(i + 1) <= t.lo_limit) || (t.hi_limit != null && edge(i) >= t.hi_limit);
    body += `<rect x="${X(edge(i)).toFixed(1)}" y="${(h - padB - bh).toFixed(1)}" width="${Math.max(1, X(edge(i + 1)) - X(edge(i)) - 1).toFixed(1)}"` +
      ` height="${bh.toFixed(1)}" fill="${out ? "#f85149" : "#58a6ff"}"><title>${fmtNum(edge(i))} – ${fmtNum(edge(i + 1))}: ${counts[i]}</title></rect>`;
    bars++;
  }
  for (const [lim, label] of [[t.lo_limit, "LO"], [t.hi_limit, "HI"]]) {
    if (lim == null || lim < x0 || lim > x1) continue;
    body += `<line class="limit" x1="${X(lim)}" x2="${X(lim)}" y1="${padT}" y2="${h - padB}" stroke="#d29922" stroke-dasharray="4 3"/>` +
      `<text x="${X(lim) + (label === "LO" ? 3 : -3)}" y="${padT + 9}" text-anchor="${label === "LO" ? "start" : "end"}" style="fill:#d29922">${label} ${fmtNum(lim)}</text>`;
  }
  if (t.mean != null) body += `<line x1="${X(t.mean)}" x2="${X(t.mean)}" y1="${padT}" y2="${h - padB}" stroke="#8a93a3"/>`;
  body += `<text x="${padL}" y="${h - 4}">${fmtNum(x0)}</text><text x="${SVG_W - padR}" y="${h - 4}" text-anchor="end">${fmtNum(x1)}</text>`;
  const outside = (hg.below || 0) + (hg.above || 0);
  if (outside) body += `<text x="${SVG_W / 2}" y="${h - 4}" text-anchor="middle">${outside} far outside</text>`;
  return svg(h, body, bars);
}

function colorByTest() {
  const v = $("color-by").value;
  return v ? Number(v) : null;
}

function renderColorBy(lotId) {
  const sel = $("color-by");
  const tests = lotId ? lotTests(lotId).filter((t) => t.kind === "parametric") : [];
  const want = tests.map((t) => String(t.test_num));
  const have = [...sel.options].slice(1).map((o) => o.value);
  if (have.join("|") === want.join("|")) return;
  const chosen = sel.value;
  sel.length = 1;
  for (const t of tests) sel.add(new Option(`${t.test_num} ${t.test_txt || ""}`, String(t.test_num)));
  sel.value = want.includes(chosen) ? chosen : "";
}

function dieAt(ev) {
  if (!mapGeom) return null;
  const rect = canvas.getBoundingClientRect();
  const px = (ev.clientX - rect.left) * (canvas.width / rect.width);
  const py = (ev.clientY - rect.top) * (canvas.height / rect.height);
  const x = Math.floor((px - mapGeom.ox) / mapGeom.cell) + mapGeom.minX;
  const y = Math.floor((py - mapGeom.oy) / mapGeom.cell) + mapGeom.minY;
  const view = views.get(mapGeom.topic);
  return view ? view.dies.get(x + "," + y) || null : null;
}

canvas.addEventListener("mousemove", (ev) => {
  const tip = $("die-tip");
  const d = dieAt(ev);
  if (!d) { tip.hidden = true; return; }
  // A die off head 1 carries its head (docs/live-topics.md); named as the wafer's site
  // bars name it: "HEAD/SITE" once the wafer has sites of two heads.
  const [x, y, hb, sb, passed, site, head = 1] = d;
  const view = views.get(mapGeom.topic);
  const heads = Object.keys((view && view.sites) || {}).some((k) => k.includes("/"));
  tip.textContent = `x ${x}  y ${y}\nhard bin ${hb}  soft bin ${sb ?? "–"}\n` +
    `site ${heads ? head + "/" + site : site}  ${passed === true ? "pass" : passed === false ? "FAIL" : "?"}`;
  const rect = canvas.getBoundingClientRect();
  tip.style.left = (ev.clientX - rect.left + 12) + "px";
  tip.style.top = (ev.clientY - rect.top + 12) + "px";
  tip.hidden = false;
});
canvas.addEventListener("mouseleave", () => { $("die-tip").hidden = true; });
$("wafer-select").addEventListener("change", () => { dirty = true; });
$("color-by").addEventListener("change", () => { dirty = true; });
$("tests").tBodies[0].addEventListener("click", (ev) => {
  const tr = ev.target.closest("tr[data-test]");
  if (!tr) return;
  selectedTest = Number(tr.dataset.test);
  dirty = true;
});

function bars(el, rows, fmt) {
  const max = Math.max(1, ...rows.map((r) => r[1]));
  el.innerHTML = rows.map(([label, value, color]) =>
    `<div class="row"><span>${label}</span><div class="bar" style="width:${(100 * value / max).toFixed(1)}%;` +
    `${color ? "background:" + color : ""}"></div><span class="num">${fmt(value)}</span></div>`).join("")
    || '<span class="muted">none</span>';
}

// Parametric-only data (no pass/fail, no bins): the hub says which figures do not apply
// (docs/live-topics.md, not_applicable) and the page shows "n/a", never 0 %.
const NA = "n/a";
function notApplicable(view) { return new Set((view && view.not_applicable) || []); }

function renderPareto(view, scope) {
  $("pareto-scope").textContent = scope;
  if (!view) { bars($("pareto"), [], String); return; }
  if (notApplicable(view).has("bins")) {
    $("pareto").innerHTML = '<span class="muted na">bins not applicable (parametric data)</span>';
    return;
  }
  const hard = Object.entries(view.hard_bins || {}).map(([b, n]) => [Number(b), n]);
  const total = hard.reduce((s, [, n]) => s + n, 0) || 1;
  hard.sort((a, b) => b[1] - a[1]);
  bars($("pareto"), hard.map(([b, n]) => [`bin ${b}`, n, binColor(b)]),
       (n) => `${n} (${(100 * n / total).toFixed(1)}%)`);
}

function renderSites(view) {
  if (notApplicable(view).has("yield")) {
    $("sites").innerHTML = '<span class="muted na">yield not applicable (no pass/fail)</span>';
    return;
  }
  const sites = Object.entries((view && view.sites) || {})
    .map(([s, v]) => [`site ${s}`, v.yield == null ? 0 : 100 * v.yield]);
  bars($("sites"), sites, (y) => y.toFixed(1) + " %");
}

function renderAlerts() {
  const all = [];
  for (const [topic, v] of views) if (topic.startsWith("alert/") && v.alerts) all.push(...v.alerts.values());
  all.sort((a, b) => (b.raised_at || 0) - (a.raised_at || 0));
  const ul = $("alerts");
  if (!all.length) { ul.innerHTML = '<li class="muted">none</li>'; return; }
  ul.innerHTML = "";
  for (const a of all.slice(0, 100)) {
    const li = document.createElement("li");
    li.dataset.priority = a.priority;
    li.dataset.acknowledged = String(!!a.acknowledged);
    li.dataset.alertId = a.id;
    const when = new Date((a.raised_at || 0) * 1000).toLocaleTimeString();
    li.innerHTML = `<b>${a.priority}</b> ${escapeHtml(a.message || a.rule)}` +
      `<div class="meta">${escapeHtml(a.rule)} · ${when}` +
      (a.occurrences > 1 ? ` · ×${a.occurrences}` : "") + (a.escalated ? " · escalated" : "") +
      (a.acknowledged ? ` · acknowledged by ${escapeHtml(a.acked_by || "?")}` : "") + "</div>";
    if (!a.acknowledged) {
      const btn = document.createElement("button");
      btn.textContent = "Acknowledge";
      btn.addEventListener("click", () => {
        btn.disabled = true;
        send({ type: "ack", id: nextId++, alert: a.id, by: $("user").value || "dashboard" });
      });
      li.appendChild(btn);
    }
    ul.appendChild(li);
  }
}

function renderGateways() {
  const rows = [];
  for (const [topic, v] of views) {
    if (kindOf(topic) !== "gateway") continue;
    const seen = v.last_seen ? new Date(v.last_seen * 1000).toLocaleTimeString() : "–";
    rows.push(`<tr data-gateway="${escapeHtml(v.gateway_id || topic)}"><td>${escapeHtml(v.gateway_id || topic)}</td>` +
      `<td class="${v.online ? "online" : "offline"}">${v.online ? "online" : "offline"}</td>` +
      `<td>${seen}</td><td>${(v.records_per_s || 0).toFixed(0)}</td><td>${v.records ?? 0}</td></tr>`);
  }
  $("gateways").tBodies[0].innerHTML = rows.join("");
}

function renderSensors() {
  const box = $("sensors");
  const topics = [...views.keys()].filter((t) => kindOf(t) === "sensor").sort();
  if (!topics.length) return;
  for (const topic of topics) {
    const v = views.get(topic);
    let div = box.querySelector(`[data-topic="${CSS.escape(topic)}"]`);
    if (!div) {
      if (box.querySelector(".muted")) box.innerHTML = "";
      div = document.createElement("div");
      div.className = "sensor";
      div.dataset.topic = topic;
      div.innerHTML = '<div class="label"></div><canvas width="300" height="48"></canvas>';
      box.appendChild(div);
    }
    const last = v.latest ? v.latest.last : null;
    // The value keeps its room; a long channel name is cut (its full name on hover).
    const name = v.channel || topic.slice(7);
    const label = div.querySelector(".label");
    label.title = name;
    label.innerHTML = `<span class="name">${escapeHtml(name)}</span>` +
      `<b>${last == null ? "–" : Number(last).toPrecision(4)} ${escapeHtml(v.unit || "")}</b>`;
    sparkline(div.querySelector("canvas"), v.history || []);
  }
}

function sparkline(cv, hist) {
  const c = cv.getContext("2d");
  c.clearRect(0, 0, cv.width, cv.height);
  if (hist.length < 2) return;
  const vals = hist.map((p) => p[1]);
  const lo = Math.min(...hist.map((p) => p[2] ?? p[1]));
  const hi = Math.max(...hist.map((p) => p[3] ?? p[1]));
  const span = hi - lo || 1;
  const sx = cv.width / (hist.length - 1);
  const yOf = (v) => cv.height - 3 - ((v - lo) / span) * (cv.height - 6);
  c.fillStyle = "#58a6ff22";  // min..max band
  c.beginPath();
  hist.forEach((p, i) => c.lineTo(i * sx, yOf(p[3] ?? p[1])));
  for (let i = hist.length - 1; i >= 0; i--) c.lineTo(i * sx, yOf(hist[i][2] ?? hist[i][1]));
  c.fill();
  c.strokeStyle = "#58a6ff";
  c.beginPath();
  vals.forEach((v, i) => (i ? c.lineTo(i * sx, yOf(v)) : c.moveTo(0, yOf(v))));
  c.stroke();
}

// A test number the tester used for more than one test (docs/live-topics.md, test_txts):
// the hub mixes their figures in one test, so the row says so.
function shared(v) {
  const names = v.test_txts || [];
  return names.length > 1
    ? ` <span class="shared" title="test number shared by ${names.length} tests, figures mixed: ${escapeHtml(names.join(", "))}">⚠ ${names.length} names</span>`
    : "";
}

// Results of the test the flow did not execute (docs/live-topics.md, not_executed): not
// in n nor the figures, but an operator wants to see the test was skipped.
function notExecuted(v) {
  return v.not_executed
    ? `<span class="not-exec" title="${v.not_executed} results not executed (not in the figures)">+${v.not_executed} not run</span>`
    : "";
}

function renderTests(lotId) {
  $("tests-scope").textContent = lotId ? `lot ${lotId}` : "";
  const rows = lotId ? lotTests(lotId) : [];
  const f = (x, d = 3) => (x == null ? "–" : Number(x).toPrecision(d));
  const chosen = chosenTest(lotId);
  $("tests").tBodies[0].innerHTML = rows.slice(0, 200).map((v) =>
    `<tr data-test="${v.test_num}" aria-selected="${chosen && chosen.test_num === v.test_num}">` +
    `<td>${escapeHtml(testLabel(v))}${shared(v)}</td>` +
    `<td>${v.count}${notExecuted(v)}</td><td>${f(v.mean, 4)}</td>` +
    `<td>${f(v.sigma)}</td><td class="${v.cpk != null && v.cpk < 1.33 ? "low-cpk" : ""}">${f(v.cpk)}</td></tr>`).join("");
}

// Records the hub could not apply to the live view (docs/live-topics.md, hub/state): the
// figures on this page are missing them, so say so until the hub restarts.
function renderWarning() {
  const el = $("live-warning");
  const v = views.get("hub/state");
  const n = v ? v.not_applied || 0 : 0;
  document.body.dataset.notApplied = String(n);
  if (!n) { el.hidden = true; return; }
  const reasons = Object.entries(v.reasons || {}).sort((a, b) => b[1].count - a[1].count);
  const last = reasons.length ? reasons[0][1].last : "";
  el.textContent = `⚠ ${n.toLocaleString()} record${n === 1 ? "" : "s"} not shown: ` +
    reasons.map(([r, e]) => `${r.replace(/_/g, " ")} ${e.count.toLocaleString()}`).join(", ");
  el.title = "last: " + last + "\n(hub log and /api/stats: live_state)";
  el.hidden = false;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function draw() {
  if (dirty) {
    dirty = false;
    renderWaferSelect();
    const wafer = selectedWafer();
    renderColorBy(wafer ? views.get(wafer).lot_id : null);
    renderWafer(wafer);
    const wv = wafer ? views.get(wafer) : null;
    renderPareto(wv, wv ? `wafer ${wv.wafer_id}` : "");
    renderSites(wv);
    if (alertsDirty) {
      alertsDirty = false;
      renderAlerts();
    }
    renderGateways();
    renderWarning();
    renderSensors();
    // No wafer to follow (a final-test lot has none): the lot updated last, so its tests
    // and its "no wafers" trend still show.
    const lotId = wv ? wv.lot_id : latestLot();
    renderLotTitle(lotId);
    renderTests(lotId);
    renderTestCharts(lotId);
    renderTrend(lotId);
    document.body.dataset.frames = String(stats.frames);
    document.body.dataset.resyncs = String(stats.resyncs);
    document.body.dataset.snapshots = String(stats.snapshots);
    document.body.dataset.reconnects = String(stats.reconnects);
  }
}

function frame() {
  draw();
  requestAnimationFrame(frame);
}

// Hidden tabs (and headless browsers) may not run animation frames: draw on a timer too.
setInterval(draw, 250);
$("user").value = localStorage.getItem("edgegw.user") || "";
$("user").addEventListener("change", () => localStorage.setItem("edgegw.user", $("user").value));
$("signout").addEventListener("click", async () => {
  await fetch("/logout", { method: "POST", credentials: "same-origin",
    headers: { "content-type": "application/json" }, body: "{}" });
  signIn();
});
// The rules again each minute: a hub reloads them on SIGHUP (docs/operations.md, "Reload").
checkSession().then((ok) => { if (ok) { connect(); loadRules(); setInterval(loadRules, 60000); } });
requestAnimationFrame(frame);
