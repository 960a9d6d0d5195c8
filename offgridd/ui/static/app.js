// offgridd's UI: plain DOM, no build step, no other host. Model text is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const EVENTS_SILENT_MS = 7000; // status snapshots come every 2 s: this much silence means the link is dead
const MAX_TOKENS = 512;

const saved = {
  get(key, fallback) {
    try {
      const raw = localStorage.getItem("offgrid." + key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem("offgrid." + key, JSON.stringify(value));
    } catch (e) {
      showBanner("Could not save in this browser: " + e.message);
    }
  },
};

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fmtBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function fmtWhen(epochS) {
  return typeof epochS === "number" && isFinite(epochS) ? new Date(epochS * 1000).toLocaleString() : "";
}

function fmtDuration(s) {
  if (typeof s !== "number" || !isFinite(s)) return "";
  s = Math.round(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min ${s % 60} s`;
  return `${s} s`;
}

// Fields added by other subsystems arrive in shapes we cannot know in advance: show whatever is there, as text.
function fmtValue(v) {
  if (v === null || v === undefined) return "";
  if (Array.isArray(v)) return v.map(fmtValue).filter(Boolean).join(", ");
  if (typeof v === "object") {
    for (const k of ["reason", "name", "id", "label"]) if (typeof v[k] === "string" && v[k]) return v[k];
    return Object.entries(v).filter(([, x]) => x !== null && typeof x !== "object")
      .map(([k, x]) => `${k} ${x}`).join(" · ");
  }
  if (typeof v === "number") return String(Math.round(v * 10) / 10);
  return String(v);
}

/* ---------- banner and link state ---------- */

function showBanner(text) {
  $("banner-text").textContent = text;
  $("banner").hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

let linkDown = false;

function setLink(up, why) {
  const link = $("link");
  link.textContent = up ? "live" : "reconnecting…";
  link.className = "link " + (up ? "up" : "down");
  if (up && linkDown) hideBanner();
  if (!up) showBanner(`Connection to the appliance lost (${why}). Reconnecting…`);
  if (up && linkDown) refreshAll();
  linkDown = !up;
}

/* ---------- keys and API calls ---------- */

class ApiError extends Error {
  constructor(status, message, code, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function authHeaders(admin) {
  const key = (admin && saved.get("adminKey", "")) || saved.get("apiKey", "");
  return key ? { Authorization: "Bearer " + key } : {};
}

let keyPrompt = null; // one dialog at a time, shared by every request that needs it

function askKey(kind, why) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  $("key-title").textContent = kind === "admin" ? "Admin key needed" : "API key needed";
  $("key-why").textContent = why;
  $("key-input").value = "";
  keyPrompt = new Promise((resolve) => {
    const done = (value) => {
      $("key-form").onsubmit = $("key-cancel").onclick = dialog.oncancel = null;
      if (dialog.open) dialog.close();
      keyPrompt = null;
      resolve(value);
    };
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      const value = $("key-input").value.trim();
      if (value) saved.set(kind === "admin" ? "adminKey" : "apiKey", value);
      done(Boolean(value));
    };
    $("key-cancel").onclick = () => done(false);
    dialog.oncancel = (e) => { e.preventDefault(); done(false); };
  });
  dialog.showModal();
  $("key-input").focus();
  return keyPrompt;
}

async function errorFrom(resp) {
  let message = `${resp.status} ${resp.statusText}`, code = null;
  try {
    const body = await resp.json();
    if (body && body.error) ({ message, code } = body.error);
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(resp.status, message, code, Number(resp.headers.get("Retry-After")) || null);
}

// fetch() with the saved keys; a 401 or an admin 403 asks the person for the key and tries again.
async function call(path, { method = "GET", body, admin = false, signal, raw = false, headers: extra = {} } = {}) {
  for (;;) {
    const headers = { ...authHeaders(admin), ...extra };
    const form = body instanceof FormData; // multipart: the browser writes its Content-Type with the boundary
    if (body !== undefined && !form) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method, headers, signal, cache: "no-store",
      body: body === undefined || form ? body : JSON.stringify(body),
    });
    if (resp.ok) return raw ? resp : resp.json();
    const err = await errorFrom(resp);
    if (resp.status === 401 && await askKey("api", "This appliance needs its API key: " + err.message)) continue;
    if (resp.status === 403 && err.code === "admin_key_required"
        && await askKey("admin", "Only the owner can do this. " + err.message)) continue;
    throw err;
  }
}

function explain(err) {
  if (err instanceof ApiError) {
    const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
    if (err.status === 503) return `The appliance cannot answer now: ${err.message}.${wait}`;
    return `${err.message} (HTTP ${err.status})`;
  }
  return `The appliance did not answer: ${err.message}`;
}

/* ---------- server-sent events, read from fetch so the API key can be sent ---------- */

async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length && onEvent(kind, data.join("\n")) === false) {
        reader.cancel().catch(() => {});
        return;
      }
    }
  }
}

async function listen() {
  let delay = 1000;
  for (;;) {
    const ctrl = new AbortController();
    let heard = Date.now(), watchdog = null;
    try {
      const resp = await call("/api/v1/events", { signal: ctrl.signal, raw: true });
      heard = Date.now();
      watchdog = setInterval(() => { if (Date.now() - heard > EVENTS_SILENT_MS) ctrl.abort(); }, 1000);
      await readEvents(resp.body, (kind, data) => {
        heard = Date.now();
        setLink(true);
        delay = 1000;
        handleEvent(kind, JSON.parse(data));
      });
      setLink(false, "the event stream ended");
    } catch (e) {
      setLink(false, ctrl.signal.aborted ? "no news for a while" : e.message);
    } finally {
      clearInterval(watchdog);
    }
    await sleep(delay);
    delay = Math.min(delay * 2, 10000);
  }
}

function handleEvent(kind, data) {
  if (kind === "status") renderStatus(data);
  else if (kind === "job") upsertJob(data);
  else if (kind === "models") loadModels();
  else if (kind === "peers") onPeersEvent(data);
  else if (kind === "documents") loadDocuments(); // added or deleted here, by another page or from a USB stick
  else if (kind === "usb") renderUsb(data);
  else if (kind === "degraded" && lastStatus) renderStatus({ ...lastStatus, degraded: data.degraded });
}

function renderUsb(u) {
  const line = $("usb-line");
  if (u.state === "importing") line.textContent = `Reading the USB stick at ${u.path}…`;
  else {
    const imported = (u.imported || []).length ? `imported ${u.imported.join(", ")}` : "nothing imported";
    line.textContent = [`USB stick ${u.root || ""}: ${imported}`, u.failed && `${u.failed} failed`,
      u.refused && fmtValue(u.refused)].filter(Boolean).join(" · ");
  }
  line.hidden = false;
}

/* ---------- status ---------- */

let lastStatus = null;

function pick(obj, ...paths) {
  for (const path of paths) {
    let v = obj;
    for (const k of path.split(".")) v = v && typeof v === "object" ? v[k] : undefined;
    if (v !== undefined && v !== null && v !== "" && !(Array.isArray(v) && !v.length)) return v;
  }
  return undefined;
}

function fmtTemperature(t) {
  if (typeof t === "number") return `${Math.round(t)} °C`;
  const c = pick(t, "celsius", "c", "current", "max");
  return typeof c === "number" ? `${Math.round(c)} °C` : fmtValue(t);
}

function renderStatus(s) {
  lastStatus = s;
  $("status-line").textContent = s.line || s.status || "";
  const rows = [];
  const add = (label, value, cls) => { if (value !== undefined && value !== "") rows.push([label, value, cls]); };
  add("State", [s.status, s.reason].filter(Boolean).join(": "), s.status === "ready" ? "ok" : "warn");
  const model = s.model || {};
  add("Model", model.name ? [model.name, model.state, model.n_ctx && `context ${model.n_ctx}`]
    .filter(Boolean).join(" · ") : undefined);
  const hw = pick(s, "services.hardware") || {};
  const profile = pick(s, "profile") || hw.profile;
  if (profile && typeof profile === "object") {
    add("Board profile", [profile.name || profile.id, profile.reason].filter(Boolean).join(" — "));
  } else if (profile) add("Board profile", fmtValue(profile));
  const degraded = s.degraded !== undefined ? s.degraded : hw.degraded;
  if (Array.isArray(degraded)) {
    add("Degraded", degraded.length ? degraded.map((d) => (d && typeof d === "object" && d.step && d.reason
      ? `${d.step}: ${d.reason}` : fmtValue(d))).join(" · ") : "no", degraded.length ? "warn" : "");
  }
  const mem = s.memory || {};
  if (typeof mem.used_percent === "number") {
    add("Memory", `${Math.round(mem.used_percent)}% of ${fmtBytes(mem.total_bytes)} used · daemon and models `
      + fmtBytes(mem.daemon_rss_bytes));
  }
  const temp = pick(s, "temperature", "temperature_c", "resources.temperature_c",
    "services.hardware.resources.temperature_c");
  add("Temperature", temp === undefined ? undefined : fmtTemperature(temp));
  const throttled = pick(s, "services.hardware.resources.throttled");
  add("Throttled", throttled === undefined ? undefined : fmtValue(throttled), "warn");
  if (s.tokens_per_second) add("Last speed", `${s.tokens_per_second} tokens/s`);
  if (s.requests) add("Requests", `${s.requests.served} served · ${s.requests.active} active · `
    + `${s.requests.waiting} waiting`);
  if (s.queue && typeof s.queue === "object") {
    add("Queue", [`${s.queue.running} running of ${s.queue.slots}`, `${s.queue.waiting} waiting of ${s.queue.depth}`,
      s.queue.paused && `paused: ${fmtValue(s.queue.paused)}`].filter(Boolean).join(" · "));
  }
  const peerCount = pick(s, "services.peers.peers");
  if (typeof peerCount === "number") add("Peers", `${peerCount} other box${peerCount === 1 ? "" : "es"} heard`);
  const services = Object.keys(s.services || {});
  if (services.length) add("Services", services.join(" · "));
  add("Uptime", fmtDuration(s.uptime_s));
  add("Version", s.version);
  const list = $("status-list");
  list.replaceChildren(...rows.flatMap(([label, value, cls]) =>
    [el("dt", { text: label }), el("dd", { text: String(value), class: cls || "" })]));
}

/* ---------- models and imports ---------- */

let models = [];
const jobs = new Map();

async function loadModels() {
  try {
    const body = await call("/api/v1/models");
    models = body.models || [];
    renderModels();
    renderModelChoice();
  } catch (e) {
    showBanner("Could not list the models. " + explain(e));
  }
}

function renderModels() {
  $("model-list").replaceChildren(...models.map((m) => {
    const facts = [fmtBytes(m.size), m.quantization, m.architecture,
      m.context_length && `context ${m.context_length}`].filter(Boolean).join(" · ");
    const badges = [m.default && "default", m.loaded && m.loaded !== "no" && `loaded: ${m.loaded}`]
      .filter(Boolean).join(" · ");
    return el("li", { class: "card", "data-model": m.name },
      el("div", { class: "card-head" }, el("strong", { text: m.name }),
        badges ? el("span", { class: "badge", text: badges }) : null),
      el("p", { text: facts }),
      el("p", { class: "muted", text: `from ${m.source || "unknown"}${m.license ? " · " + m.license : ""}` }),
      el("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${m.name}`,
        onclick: () => deleteModel(m.name) }));
  }));
}

function confirmAction(title, text) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    const done = (yes) => {
      $("confirm-form").onsubmit = $("confirm-cancel").onclick = dialog.oncancel = null;
      if (dialog.open) dialog.close();
      resolve(yes);
    };
    $("confirm-form").onsubmit = (e) => { e.preventDefault(); done(true); };
    $("confirm-cancel").onclick = () => done(false);
    dialog.oncancel = (e) => { e.preventDefault(); done(false); };
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

async function deleteModel(name) {
  if (!await confirmAction(`Delete ${name}?`, "Its file is removed from this box's store. This cannot be undone.")) {
    return;
  }
  try {
    await call(`/api/v1/models/${encodeURIComponent(name)}`, { method: "DELETE", admin: true });
    hideBanner();
  } catch (e) {
    showBanner(`Could not delete ${name}. ` + explain(e));
  }
  loadModels();
}

async function loadJobs() {
  try {
    const body = await call("/api/v1/jobs");
    for (const job of (body.jobs || []).reverse()) jobs.set(job.id, job);
    renderJobs();
  } catch (e) {
    showBanner("Could not list the imports. " + explain(e));
  }
}

function upsertJob(job) {
  jobs.delete(job.id); // re-insert so the newest sorts first
  jobs.set(job.id, job);
  renderJobs();
}

function renderJobs() {
  const latest = [...jobs.values()].reverse().slice(0, 20);
  $("no-jobs").hidden = latest.length > 0;
  $("job-list").replaceChildren(...latest.map((j) => {
    const parts = [j.state];
    if (j.bytes_total) parts.push(`${fmtBytes(j.bytes_done)} of ${fmtBytes(j.bytes_total)}`);
    if (j.state === "running" && j.rate_bytes_per_s) parts.push(`${fmtBytes(j.rate_bytes_per_s)}/s`);
    if (j.state === "running" && j.eta_s) parts.push(`${fmtDuration(j.eta_s)} left`);
    const bar = el("progress", { max: String(j.bytes_total || 1), "aria-label": `${j.model || j.kind} progress` });
    bar.value = j.state === "done" ? (j.bytes_total || 1) : (j.bytes_done || 0);
    return el("li", { class: `card job ${j.state}`, "data-job": j.id },
      el("div", { class: "card-head" }, el("strong", { text: j.model || "model" }),
        el("span", { class: "badge", text: j.kind })),
      el("p", { class: "muted", text: `from ${j.source}` }),
      j.state === "running" || j.state === "done" ? bar : null,
      el("p", { text: parts.join(" · ") }),
      j.reason ? el("p", { class: j.state === "failed" ? "bad" : "muted", text: j.reason }) : null);
  }));
}

/* ---------- peers: shown only where the daemon has them ---------- */

const peers = { timer: null, pulls: new Map() }; // pulls: "peer/collection" -> what its last pull said

async function loadPeers() {
  try {
    const resp = await fetch("/api/v1/peers", { headers: authHeaders(false), cache: "no-store" });
    if (resp.status === 404) return setPeersShown(false);
    if (!resp.ok) throw await errorFrom(resp);
    const body = await resp.json();
    const list = Array.isArray(body) ? body : body.peers || body.nodes || [];
    if (body.enabled === false && !list.length) return setPeersShown(false);
    const self = body.node && typeof body.node === "object" ? body.node : null;
    $("this-box").textContent = self ? `This box: ${self.name || self.node}${self.fleet ? " · fleet " + self.fleet : ""}`
      + (body.enabled === false ? " · peers are off in its settings" : "") : "";
    renderPeers(list);
  } catch (e) {
    showBanner("Could not list the peers. " + explain(e));
  }
}

function onPeersEvent(data) {
  const list = Array.isArray(data) ? data : data && (data.peers || data.nodes);
  if (Array.isArray(list)) return renderPeers(list);
  clearTimeout(peers.timer); // an event about one peer: fetch the whole list, at most once a second
  peers.timer = setTimeout(loadPeers, 1000);
}

function setPeersShown(shown) {
  document.querySelector('[data-tab="peers"]').hidden = !shown;
  if (!shown && !$("peers").hidden) showTab("chat");
}

function renderPeers(list) {
  setPeersShown(true);
  $("no-peers").hidden = list.length > 0;
  $("peer-list").replaceChildren(...list.map((p) => {
    const name = p.name || p.node_name || p.node_id || p.id || "peer";
    const where = [p.address || p.host || p.ip, p.port || p.http_port].filter(Boolean).join(":") || p.url;
    const inventory = p.models || p.inventory || [];
    const modelNames = Array.isArray(inventory) ? inventory.map((m) => (typeof m === "string" ? m : m.name || m.id))
      : Object.keys(inventory);
    const seen = pick(p, "last_seen_s", "age_s");
    return el("li", { class: "card", "data-peer": name },
      el("div", { class: "card-head" }, el("strong", { text: name }),
        p.state || p.status ? el("span", { class: "badge", text: fmtValue(p.state || p.status) }) : null),
      where ? el("p", { class: "muted", text: where }) : null,
      el("p", { text: modelNames.length ? "models: " + modelNames.join(", ") : "no models" }),
      ...(docs.on ? (p.collections || []).map((c) => peerCollection(name, c)) : []),
      p.load !== undefined ? el("p", { text: "load: " + fmtValue(p.load)
        + (p.queue !== undefined ? ` · queue ${fmtValue(p.queue)}` : "") }) : null,
      seen !== undefined ? el("p", { class: "muted", text: `heard ${fmtDuration(seen)} ago` }) : null,
      p.version ? el("p", { class: "muted", text: "version " + p.version }) : null);
  }));
}

// A peer's collection of documents, with a button that copies it to this box (verified there; an admin action).
function peerCollection(peer, c) {
  const key = `${peer}/${c.name}`;
  const status = el("span", { class: "muted", role: "status", text: peers.pulls.get(key) || "" });
  const button = el("button", {
    type: "button", class: "quiet", text: "Pull", title: `Copy the collection ${c.name} from ${peer} to this box`,
    "aria-label": `Pull the collection ${c.name} from ${peer}`,
  });
  button.addEventListener("click", async () => {
    button.disabled = true;
    status.textContent = "pulling…";
    let said;
    try {
      const r = await call("/api/v1/documents/pull", { method: "POST", admin: true,
        body: { peer, collection: c.name } });
      const count = (state) => r.documents.filter((d) => d.state === state).length;
      const failed = r.documents.filter((d) => d.state === "failed");
      said = `${count("done")} added, ${count("skipped")} already here`
        + (failed.length ? ` · ${failed.length} failed: ${failed[0].filename}: ${failed[0].reason}` : "");
      loadDocuments();
    } catch (e) {
      said = "not pulled: " + explain(e);
    }
    peers.pulls.set(key, said);
    status.textContent = said;
    button.disabled = false;
  });
  return el("p", { class: "peer-collection" }, `documents: ${c.name} (${c.documents})`, " ", button, " ", status);
}

/* ---------- documents: collections a chat can be answered from, with sources (/api/v1/documents) ---------- */

const docs = {
  on: true, // false where the box has documents off (503 documents_disabled) or no documents routes
  loaded: false,
  collections: [], // [{name, documents, bytes, chunks}]
  documents: [],
  chosen: saved.get("collection", ""), // the collection chats are answered from; "" for none
  queue: Promise.resolve(), // uploads go one after another: each keeps the model busy embedding its pages
};

async function loadDocuments() {
  try {
    const body = await call("/api/v1/documents");
    docs.collections = body.collections || [];
    docs.documents = body.documents || [];
    docs.loaded = true;
    setDocumentsShown(true);
    renderDocuments();
    renderCollectionChoice();
  } catch (e) {
    if (e instanceof ApiError && (e.status === 404 || e.code === "documents_disabled")) setDocumentsShown(false);
    else showBanner("Could not list the documents. " + explain(e));
  }
}

function setDocumentsShown(on) {
  docs.on = on;
  document.querySelector('[data-tab="documents"]').hidden = !on;
  $("collection-choice").hidden = !on;
  $("documents-off").hidden = on;
  $("documents-on").hidden = !on;
  if (!on && !$("documents").hidden) showTab("chat");
}

function renderDocuments() {
  const names = docs.collections.map((c) => c.name);
  $("no-documents").hidden = docs.documents.length > 0;
  $("collection-names").replaceChildren(...names.map((n) => el("option", { value: n })));
  const search = $("doc-search-collection"), was = search.value;
  search.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  search.value = names.includes(was) ? was : names.includes(docs.chosen) ? docs.chosen : names[0] || "";
  $("doc-search-area").hidden = !names.length;
  $("collection-list").replaceChildren(...docs.collections.map((c) => el("section",
    { class: "collection", "data-collection": c.name, "aria-label": `Collection ${c.name}` },
    el("h3", { text: c.name }),
    el("p", { class: "muted", text: [plural(c.documents, "document"), fmtBytes(c.bytes), plural(c.chunks, "chunk")]
      .join(" · ") }),
    el("ul", { class: "cards" }, ...docs.documents.filter((d) => d.collection === c.name).map(documentCard)))));
}

function documentCard(d) {
  return el("li", { class: "card", "data-document": String(d.id) },
    el("div", { class: "card-head" }, el("strong", { text: d.filename }), el("span", { class: "badge", text: d.kind })),
    el("p", { text: [plural(d.pages, "page"), plural(d.chunks, "chunk"), fmtBytes(d.size)].join(" · ") }),
    el("p", { class: "muted", text: "added " + fmtWhen(d.added) }),
    el("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${d.filename}`,
      onclick: () => deleteDocument(d) }));
}

function renderCollectionChoice() {
  const names = docs.collections.map((c) => c.name);
  if (docs.loaded && docs.chosen && !names.includes(docs.chosen)) { // its last document went, here or elsewhere
    docs.chosen = "";
    saved.set("collection", "");
  }
  const shown = docs.loaded ? docs.collections : docs.chosen ? [{ name: docs.chosen }] : [];
  $("collection").replaceChildren(el("option", { value: "", text: "None" }), ...shown.map((c) =>
    el("option", { value: c.name, text: c.documents ? `${c.name} (${c.documents})` : c.name })));
  $("collection").value = docs.chosen;
}

async function deleteDocument(d) {
  if (!await confirmAction(`Delete ${d.filename}?`, `It leaves the collection “${d.collection}”: answers no longer `
    + "cite it. This cannot be undone.")) return;
  try {
    await call(`/api/v1/documents/${encodeURIComponent(d.id)}`, { method: "DELETE", admin: true });
    hideBanner();
  } catch (e) {
    showBanner(`Could not delete ${d.filename}. ` + explain(e));
  }
  loadDocuments();
}

function queueUploads() {
  const input = $("upload-files");
  const collection = $("upload-collection").value.trim() || "default";
  for (const file of input.files) {
    const state = el("span", { class: "state", text: "waiting…" });
    const item = el("li", { class: "card upload waiting", "data-upload": file.name },
      el("div", { class: "card-head" }, el("strong", { text: file.name }), el("span", { class: "badge",
        text: collection })), el("p", {}, state));
    $("upload-list").append(item);
    docs.queue = docs.queue.then(() => upload(file, collection, item, state));
  }
  input.value = "";
  const finished = [...$("upload-list").querySelectorAll(".upload.added, .upload.refused")];
  for (const old of finished.slice(0, -20)) old.remove(); // the latest twenty say enough
}

async function upload(file, collection, item, state) {
  const started = Date.now(), known = new Set(jobs.keys()); // its job is one that appears after this
  const bar = el("progress", { "aria-label": `${file.name}: being read` }); // no value until the box says how far
  const tick = () => {
    // the box's job for this upload advances as its pages are embedded, which is nearly all the time it takes
    const job = [...jobs.values()].reverse().find((j) => j.kind === "document-upload" && j.model === file.name
      && j.state === "running" && !known.has(j.id));
    if (job && job.bytes_total && job.bytes_done) {
      bar.max = job.bytes_total;
      bar.value = job.bytes_done;
      const share = Math.round((100 * job.bytes_done) / job.bytes_total);
      state.textContent = `embedding… ${share}%` + (job.eta_s ? ` · ${fmtDuration(job.eta_s)} left` : "");
    } else {
      state.textContent = `uploading… ${fmtDuration((Date.now() - started) / 1000)}`;
    }
  };
  const timer = setInterval(tick, 500);
  item.className = "card upload busy";
  item.append(bar);
  tick();
  const form = new FormData();
  form.append("collection", collection);
  form.append("file", file, file.name);
  try {
    const d = await call("/api/v1/documents", { method: "POST", body: form, admin: true });
    item.className = "card upload added";
    state.textContent = `added: ${plural(d.pages, "page")}, ${plural(d.chunks, "chunk")}`;
  } catch (e) {
    item.className = "card upload refused";
    state.textContent = e instanceof ApiError ? `refused: ${e.message}` : explain(e);
  } finally {
    clearInterval(timer);
    bar.remove();
  }
  await loadDocuments();
}

async function searchDocuments() {
  const q = $("doc-search").value.trim(), collection = $("doc-search-collection").value;
  const list = $("doc-results");
  if (!q) { list.replaceChildren(); return; }
  const { passages } = await call(`/api/v1/documents/search?q=${encodeURIComponent(q)}`
    + `&collection=${encodeURIComponent(collection)}`);
  list.replaceChildren(...(passages.length ? passages.map((p) => el("li", { class: "card passage" },
    el("strong", { text: `${p.filename}, page ${p.page}` }), el("p", { class: "prose", text: p.text })))
    : [el("li", { class: "muted", text: `Nothing in “${collection}” matches.` })]));
}

// The passages an answer was given, numbered as the model cites them ([1] is the first); each excerpt opens below.
function sourcesNode(sources) {
  return el("div", { class: "sources" }, el("p", { class: "sources-title", text: "Sources" }),
    el("ol", { "aria-label": "Sources" }, ...sources.map((s, i) => {
      const where = [String((s && s.file) || "document"), s && s.page ? `page ${s.page}` : ""].filter(Boolean);
      const excerpt = s && typeof s.excerpt === "string" ? s.excerpt : "";
      return el("li", { "data-source": String(i + 1) }, el("details", {},
        el("summary", { text: `[${i + 1}] ${where.join(", ")}`, title: excerpt }),
        el("p", { class: "excerpt", text: excerpt })));
    })));
}

function groundingNode(msg) {
  if (Array.isArray(msg.sources) && msg.sources.length) return sourcesNode(msg.sources);
  if (msg.grounded) {
    return el("p", { class: "sources muted", text: `Nothing in the documents of “${msg.grounded}” matched this `
      + "question: the answer is the model's alone." });
  }
  return null;
}

/* ---------- chat: conversations live on the box (/api/v1/conversations), so every device sees them ---------- */

let conversations = []; // [{id, title, model, ...}], newest first, as the box lists them
let current = saved.get("current", null); // the conversation shown; null: a new one, kept at its first answer
let messages = []; // the shown conversation's messages, plus this page's errors and speeds
let chosenModel = "";
let generation = null; // {ctrl, message} while an answer streams

// Conversations this browser kept before history lived on the box go there once; the box skips ones it has.
async function importBrowserHistory() {
  const old = saved.get("conversations", null);
  if (!Array.isArray(old) || !old.length) return;
  const report = await call("/api/v1/conversations/import", { method: "POST", body: { saved: old } });
  const moved = { ...report.already, ...report.imported };
  if (current && moved[current]) current = moved[current];
  localStorage.removeItem("offgrid.conversations");
  saved.set("current", current);
}

async function loadConversations() {
  conversations = (await call("/api/v1/conversations?limit=50")).conversations;
}

let opened = 0; // counts openings: a slow answer about an earlier one is not shown over a later one

async function openConversation(id) {
  const mine = ++opened;
  let shown = [], model = chosenModel;
  if (id) {
    try {
      const t = await call(`/api/v1/conversations/${encodeURIComponent(id)}`);
      shown = t.messages.map((m) => ({ role: m.role, content: m.content,
        stats: m.completion_tokens ? `${m.completion_tokens} tokens` : "",
        sources: Array.isArray(m.sources) ? m.sources : null }));
      model = t.model || model;
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) throw e;
      id = null; // deleted elsewhere
    }
  }
  if (mine !== opened || generation) return; // the person opened another, or is sending, meanwhile
  current = id;
  messages = shown;
  chosenModel = model;
  saved.set("current", current);
  renderChat();
}

async function startHistory() {
  const untouched = opened;
  try {
    await importBrowserHistory();
  } catch (e) {
    showBanner("This browser's old conversations could not be moved to the box: " + explain(e));
  }
  try {
    await loadConversations();
    if (opened === untouched && !generation) await openConversation(current); // unless the person went on already
    else renderChat();
  } catch (e) {
    showBanner(explain(e));
    renderChat();
  }
}

async function searchHistory(text) {
  const list = $("search-results");
  if (!text.trim()) { list.hidden = true; return; }
  const { hits } = await call(`/api/v1/conversations/search?q=${encodeURIComponent(text)}`);
  list.replaceChildren(...(hits.length ? hits.map((h) => el("li", {},
    el("button", { type: "button", class: "quiet", onclick: () => { list.hidden = true; openConversation(h.conversation_id); } },
      el("strong", { text: h.title }),
      el("span", {}, ...h.snippet.map((part) => part.match ? el("mark", { text: part.text })
        : document.createTextNode(part.text)))))) : [el("li", { class: "muted", text: "Nothing found." })]));
  list.hidden = false;
}

// A readable subset of markdown: fenced code blocks and inline code. Everything else stays plain text.
function renderText(target, text) {
  const parts = [];
  const fence = /```([^\n`]*)\n?([\s\S]*?)(```|$)/g;
  let at = 0, m;
  while ((m = fence.exec(text)) !== null) {
    if (m.index > at) parts.push(inline(text.slice(at, m.index)));
    const code = el("code", { text: m[2].replace(/\n$/, "") });
    parts.push(el("pre", { class: "code", "data-lang": m[1].trim() }, code));
    at = fence.lastIndex;
  }
  if (at < text.length) parts.push(inline(text.slice(at)));
  target.replaceChildren(...parts);
}

function inline(text) {
  const p = el("p", { class: "prose" });
  text.split(/(`[^`\n]+`)/).forEach((piece, i) => {
    p.append(i % 2 ? el("code", { text: piece.slice(1, -1) }) : document.createTextNode(piece));
  });
  return p;
}

function messageNode(msg) {
  const body = el("div", { class: "body" });
  renderText(body, msg.content || "");
  const label = { user: "You", assistant: "Model", error: "Error" }[msg.role] || msg.role;
  const speak = msg.role === "assistant" && msg.content
    ? el("button", { type: "button", class: "quiet speak", text: "Speak", title: "Read this answer aloud",
      onclick: (e) => speakText(msg.content, e.currentTarget) }) : null;
  return el("article", { class: `msg ${msg.role}` }, el("header", { text: label }, speak), body,
    msg.role === "assistant" ? groundingNode(msg) : null, msg.stats ? el("footer", { text: msg.stats }) : null);
}

function renderChat() {
  const options = conversations.map((x) => el("option", { value: x.id, text: x.title }));
  if (!current) options.unshift(el("option", { value: "", text: "New conversation" }));
  $("conversation").replaceChildren(...options);
  $("conversation").value = current || "";
  $("messages").replaceChildren(...messages.map(messageNode));
  if (!messages.length) {
    $("messages").append(el("p", { class: "muted hint", text: "The built-in model is small and a base model: its "
      + "answers are short and odd. Import an instruct model for a better assistant." }));
  }
  $("messages").scrollTop = $("messages").scrollHeight;
  renderModelChoice();
}

function renderModelChoice() {
  const select = $("model");
  const fallback = (models.find((m) => m.default) || models[0] || {}).name;
  const chatModels = models.filter((m) => (m.kind || "llm") === "llm"); // speech models are not for chat
  select.replaceChildren(...chatModels.map((m) => el("option", { value: m.name, text: m.name })));
  select.value = chatModels.some((m) => m.name === chosenModel) ? chosenModel : fallback || "";
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("messages").setAttribute("aria-busy", String(busy));
  if (!busy) $("prompt").focus();
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || generation) return;
  chosenModel = $("model").value;
  messages.push({ role: "user", content: text });
  const history = messages.filter((m) => m.role === "user" || m.role === "assistant")
    .map(({ role, content }) => ({ role, content }));
  const answer = { role: "assistant", content: "" };
  const collection = docs.on ? docs.chosen : "";
  messages.push(answer);
  $("prompt").value = "";
  renderChat();
  const node = $("messages").lastElementChild;
  const body = node.querySelector(".body");
  generation = { ctrl: new AbortController() };
  setBusy(true);
  const asked = performance.now();
  let first = 0, last = 0, pieces = 0, usage = null, failed = null, painting = false;
  const paint = () => {
    if (painting) return;
    painting = true;
    requestAnimationFrame(() => {
      painting = false;
      renderText(body, answer.content);
      $("messages").scrollTop = $("messages").scrollHeight;
    });
  };
  try {
    const resp = await call("/v1/chat/completions", {
      method: "POST", raw: true, signal: generation.ctrl.signal,
      headers: { "X-Offgrid-Conversation": current || "new" }, // the box keeps the exchange once it is done
      body: { model: chosenModel || undefined, messages: history, stream: true, max_tokens: MAX_TOKENS,
        stream_options: { include_usage: true }, offgrid: collection ? { collection } : undefined },
    });
    current = resp.headers.get("X-Offgrid-Conversation") || current;
    saved.set("current", current);
    await readEvents(resp.body, (_, data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) { failed = chunk.error.message; return false; }
      if (chunk.usage) usage = chunk.usage;
      if (chunk.offgrid && Array.isArray(chunk.offgrid.sources)) { // the first chunk of a grounded answer
        answer.grounded = chunk.offgrid.collection || collection;
        answer.sources = chunk.offgrid.sources;
        const shown = groundingNode(answer);
        if (shown) body.after(shown);
      }
      const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
      if (piece) {
        last = performance.now();
        if (!first) first = last;
        pieces++;
        answer.content += piece;
        paint();
      }
      return true;
    });
  } catch (e) {
    if (e.name !== "AbortError") failed = explain(e);
  }
  const tokens = usage ? usage.completion_tokens : pieces;
  // decode speed between the first and last token, as the daemon measures it; whole-request speed if they came at once
  const rate = tokens > 1 && last > first ? (tokens - 1) / ((last - first) / 1000)
    : tokens && last > asked ? tokens / ((last - asked) / 1000) : 0;
  answer.stats = [`${tokens} tokens`, rate && `${rate.toFixed(1)} tokens/s`,
    generation.ctrl.signal.aborted && "stopped"].filter(Boolean).join(" · ");
  if (failed) {
    messages.push({ role: "error", content: failed });
    showBanner(failed);
  }
  if (!answer.content && !generation.ctrl.signal.aborted) messages.splice(messages.indexOf(answer), 1);
  $("speed").textContent = rate ? `Last answer: ${rate.toFixed(1)} tokens/s` : "";
  generation = null;
  try {
    await loadConversations(); // its title and place in the list, as the box keeps them
  } catch { /* the list is refreshed with the next answer */ }
  renderChat();
  setBusy(false);
}

function stop() {
  if (generation) generation.ctrl.abort();
}

/* ---------- tabs and wiring ---------- */

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab[data-tab]")) {
    const on = tab.dataset.tab === name;
    tab.setAttribute("aria-selected", String(on));
    $(tab.dataset.tab).hidden = !on;
  }
  saved.set("tab", name);
}

function refreshAll() {
  loadModels();
  loadDocuments();
  loadJobs();
  loadPeers();
}

function wire() {
  for (const tab of document.querySelectorAll(".tab[data-tab]")) {
    tab.addEventListener("click", () => {
      showTab(tab.dataset.tab);
      if (tab.dataset.tab === "documents") loadDocuments(); // another device may have changed them
    });
  }
  $("keys").addEventListener("click", async () => {
    if (await askKey("api", "The API key this browser sends; admin actions ask for the admin key.")) refreshAll();
  });
  $("key-forget").addEventListener("click", () => {
    localStorage.removeItem("offgrid.apiKey");
    localStorage.removeItem("offgrid.adminKey");
    $("key-cancel").click();
  });
  $("banner-close").addEventListener("click", hideBanner);
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    if (e.key === "Escape") stop();
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    if (generation) return;
    openConversation(null);
    $("prompt").focus();
  });
  $("forget-chat").addEventListener("click", async () => {
    if (generation || !current) return;
    try {
      await call(`/api/v1/conversations/${encodeURIComponent(current)}`, { method: "DELETE" });
      await loadConversations();
    } catch (e) {
      showBanner(explain(e));
    }
    openConversation(conversations.length ? conversations[0].id : null);
  });
  $("conversation").addEventListener("change", (e) => {
    if (generation) { e.target.value = current || ""; return; }
    openConversation(e.target.value || null).catch((err) => showBanner(explain(err)));
  });
  $("model").addEventListener("change", (e) => { chosenModel = e.target.value; });
  $("collection").addEventListener("change", (e) => {
    docs.chosen = e.target.value;
    saved.set("collection", docs.chosen);
  });
  $("upload-form").addEventListener("submit", (e) => { e.preventDefault(); queueUploads(); });
  $("doc-search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    searchDocuments().catch((err) => showBanner("Could not search the documents. " + explain(err)));
  });
  $("history-search").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); searchHistory(e.target.value).catch((err) => showBanner(explain(err))); }
    if (e.key === "Escape") { e.target.value = ""; $("search-results").hidden = true; }
  });
  $("mic").addEventListener("click", toggleMic);
}

/* ---------- voice: speak an answer (streamed PCM through Web Audio), talk instead of typing ---------- */

let speaking = null; // {ctrl, ctx, button} while an answer is read aloud

// Plays 24 kHz 16-bit PCM as it arrives, so the first sentence sounds while the rest is still being made. Web Audio
// needs no media URL, so the page's Content-Security-Policy stays as strict as it is.
async function speakText(text, button) {
  if (speaking) {
    const was = speaking.button;
    speaking.ctrl.abort();
    if (was === button) return;
  }
  const ctx = new AudioContext({ sampleRate: 24000 });
  const ctrl = new AbortController();
  const mine = speaking = { ctrl, ctx, button };
  button.textContent = "Stop";
  try {
    const resp = await call("/v1/audio/speech", { method: "POST", signal: ctrl.signal, raw: true,
      body: { model: "tts-1", voice: "alloy", input: text.slice(0, 4096), response_format: "pcm" } });
    const reader = resp.body.getReader();
    let at = ctx.currentTime + 0.05, rest = new Uint8Array(0);
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const bytes = new Uint8Array(rest.length + value.length);
      bytes.set(rest);
      bytes.set(value, rest.length);
      const n = bytes.length >> 1;
      rest = bytes.slice(n * 2);
      if (!n) continue;
      const view = new DataView(bytes.buffer, 0, n * 2);
      const buffer = ctx.createBuffer(1, n, 24000);
      const channel = buffer.getChannelData(0);
      for (let i = 0; i < n; i++) channel[i] = view.getInt16(i * 2, true) / 32768;
      const source = ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(ctx.destination);
      at = Math.max(at, ctx.currentTime);
      source.start(at);
      at += buffer.duration;
    }
    await new Promise((resolve) => {
      const left = Math.max(0, at - ctx.currentTime) * 1000 + 100;
      const timer = setTimeout(resolve, left);
      ctrl.signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
    });
  } catch (err) {
    if (err.name !== "AbortError") showBanner(explain(err));
  } finally {
    ctx.close();
    button.textContent = "Speak";
    if (speaking === mine) speaking = null;
  }
}

let recording = null; // the MediaRecorder while the microphone is on

function setMic(on, label) {
  $("mic").setAttribute("aria-pressed", String(on));
  $("mic").textContent = label || (on ? "Done" : "Talk");
}

async function transcribe(form) {
  for (;;) {
    const resp = await fetch("/v1/audio/transcriptions", { method: "POST", headers: authHeaders(false), body: form,
      cache: "no-store" });
    if (resp.ok) return (await resp.json()).text || "";
    const err = await errorFrom(resp);
    if (resp.status === 401 && await askKey("api", "This appliance needs its API key: " + err.message)) continue;
    throw err;
  }
}

async function toggleMic() {
  if (recording) { recording.stop(); return; }
  // browsers give pages the microphone only in a secure context: https, or the box itself as localhost
  if (!window.isSecureContext || !navigator.mediaDevices || !window.MediaRecorder) {
    showBanner("This browser lets a page use the microphone only over https or on localhost, and this page is "
      + `plain http from ${location.host}. Type instead, or open the UI on the box itself.`);
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    showBanner(`The microphone is not available: ${err.message}. Allow it for this page, or type instead.`);
    return;
  }
  const rec = new MediaRecorder(stream);
  const parts = [];
  rec.ondataavailable = (e) => { if (e.data.size) parts.push(e.data); };
  rec.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    recording = null;
    const type = rec.mimeType || "audio/webm";
    const ext = type.includes("mp4") ? "m4a" : type.includes("ogg") ? "ogg" : "webm";
    const form = new FormData();
    form.append("model", "whisper-1");
    form.append("file", new Blob(parts, { type }), `speech.${ext}`);
    setMic(false, "…");
    $("mic").disabled = true;
    try {
      const text = (await transcribe(form)).trim();
      if (text) {
        $("prompt").value = text;
        send();
      }
    } catch (err) {
      showBanner(explain(err));
    } finally {
      $("mic").disabled = false;
      setMic(false);
    }
  };
  rec.start(250);
  recording = rec;
  setMic(true);
}

wire();
renderCollectionChoice();
const tab = saved.get("tab", "chat");
showTab(tab === "peers" ? "chat" : tab);
renderChat();
refreshAll();
startHistory();
listen();
