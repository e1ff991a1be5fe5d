// item-embed search page: no framework, no build step. Talks to /health, /facets, /search, /similar/{id}.
//
// The query lives in the URL (?title=…&f.COLUMN=value&similar=ID&k=…&shown=…): every new query is a
// history entry, so the back button and shared links work. A photo cannot go in a URL: a photo
// query's entry says photo=1, and the photo itself is kept only for this tab's back/forward.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search-form");
const fileInput = $("image-input");
const titleInput = $("title-input");
const kSelect = $("k-select");
const drop = $("drop");
const preview = $("preview");
const dropText = $("drop-text");
const errorBox = $("error");
const linkNote = $("link-note");
const summary = $("summary");
const results = $("results");
const searchButton = $("search-button");
const moreButton = $("more-button");
const filtersBox = $("filters");
const authForm = $("auth");
const keyInput = $("api-key-input");

const KEY_STORE = "item-embed-api-key";
const PHOTO_LINK_NOTE = "Photo queries are not kept in links: choose the photo again to repeat it.";

let chosenFile = null;
let maxUploadBytes = 10_000_000;
let busy = 0; // requests in flight; the newest answer wins
let generation = 0;
let facets = new Map(); // column name -> {name, kind, values: [{value, count}]}
let current = null; // the query on screen: {state, file, shown, hasMore, total}
const photos = new Map(); // history entry key -> the photo File of that query (this tab only)
let photoKeys = 0;
let retryAfterKey = null; // what to do again once an API key is entered
let started = false; // start() got past /health and /facets (a 401 there cuts it short)

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = "";
}

function showLinkNote(message) {
  linkNote.textContent = message || "";
  linkNote.hidden = !message;
}

function setBusy(on) {
  busy += on ? 1 : -1;
  searchButton.disabled = busy > 0;
  moreButton.disabled = busy > 0;
  searchButton.textContent = busy > 0 ? "Searching…" : "Search";
  results.classList.toggle("loading", busy > 0);
}

function formatBytes(n) {
  return n >= 1e6 ? `${(n / 1e6).toFixed(n % 1e6 ? 1 : 0)} MB` : `${Math.round(n / 1e3)} kB`;
}

// ------------------------------------------------------------------ API key (when the server asks)

class AuthNeeded extends Error {}

function apiKey() {
  try {
    return sessionStorage.getItem(KEY_STORE) || "";
  } catch (_) {
    return "";
  }
}

async function apiFetch(url, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("X-API-Key", key);
  const response = await fetch(url, { ...options, headers });
  if (response.status === 401) {
    authForm.hidden = false;
    keyInput.focus();
    throw new AuthNeeded(key ? "401: the API key was refused: enter another one." : "401: this server needs an API key: enter it above.");
  }
  return response;
}

authForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = keyInput.value.trim();
  if (!key) return;
  try {
    sessionStorage.setItem(KEY_STORE, key);
  } catch (_) {
    /* storage refused: the key is lost on reload */
  }
  keyInput.value = "";
  authForm.hidden = true;
  clearError();
  const again = retryAfterKey;
  retryAfterKey = null;
  // A start cut short by the 401 (health line, filter menus, the link's query) is finished first.
  const first = started || again === start ? Promise.resolve() : start();
  first.then(() => again && again());
});

// ------------------------------------------------------------------ image choice

function chooseFile(file) {
  clearError();
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image.`);
    return;
  }
  if (file.size > maxUploadBytes) {
    showError(`${file.name} is ${formatBytes(file.size)}: images are limited to ${formatBytes(maxUploadBytes)}.`);
    return;
  }
  chosenFile = file;
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  dropText.hidden = true;
  drop.classList.add("has-image");
  showLinkNote("");
}

function clearFile() {
  chosenFile = null;
  fileInput.value = "";
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  preview.hidden = true;
  dropText.hidden = false;
  drop.classList.remove("has-image");
}

fileInput.addEventListener("change", () => chooseFile(fileInput.files[0]));
["dragenter", "dragover"].forEach((type) =>
  drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("dragging");
  }),
);
["dragleave", "dragend"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("dragging")));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("dragging");
  if (e.dataTransfer && e.dataTransfer.files.length) chooseFile(e.dataTransfer.files[0]);
});

function clearResults() {
  current = null;
  summary.hidden = true;
  results.replaceChildren();
  results.dataset.state = "idle";
  moreButton.hidden = true;
}

$("clear-button").addEventListener("click", () => {
  clearFile();
  titleInput.value = "";
  filtersBox.querySelectorAll("select").forEach((s) => (s.value = ""));
  clearError();
  showLinkNote("");
  clearResults();
  history.pushState(emptyState(), "", location.pathname);
});

// ------------------------------------------------------------------ filters (from GET /facets)

function literal(column, value) {
  const kind = (facets.get(column) || {}).kind;
  if (kind === "int" && /^-?\d+$/.test(value)) return value;
  if (kind === "bool" && (value === "true" || value === "false")) return value;
  return JSON.stringify(String(value)); // a JSON string is a valid Python/filter string literal
}

function filterExpression(filters) {
  return Object.keys(filters)
    .sort()
    .filter((c) => filters[c] !== "")
    .map((c) => `${c} == ${literal(c, filters[c])}`)
    .join(" and ");
}

function buildFilters(columns) {
  facets = new Map();
  const selects = [];
  for (const c of columns) {
    if (!c.filterable || c.kind === "float" || c.values.length < 2) continue;
    facets.set(c.name, c);
    const label = el("label", "field filter");
    label.append(el("span", "", c.name));
    const select = el("select");
    select.dataset.column = c.name;
    select.append(new Option(`any ${c.name}`, ""));
    for (const v of c.values) select.append(new Option(`${v.value} (${v.count})`, String(v.value)));
    select.addEventListener("change", () => {
      if (current) runQuery(queryFromForm(current.state.similar), "push");
    });
    label.append(select);
    selects.push(label);
  }
  filtersBox.replaceChildren(...selects);
  filtersBox.hidden = selects.length === 0;
}

function selectedFilters() {
  const out = {};
  filtersBox.querySelectorAll("select").forEach((s) => {
    if (s.value !== "") out[s.dataset.column] = s.value;
  });
  return out;
}

// ------------------------------------------------------------------ query state <-> URL

function emptyState() {
  return { title: "", filters: {}, similar: null, k: kSelect.value, shown: 0, photo: false };
}

function queryFromForm(similar) {
  return {
    title: similar ? "" : titleInput.value.trim(),
    filters: selectedFilters(),
    similar: similar || null,
    k: kSelect.value,
    shown: 0,
    photo: !similar && !!chosenFile,
  };
}

function urlOf(state) {
  const p = new URLSearchParams();
  if (state.similar) p.set("similar", state.similar);
  if (state.title) p.set("title", state.title);
  for (const c of Object.keys(state.filters).sort()) p.set(`f.${c}`, state.filters[c]);
  p.set("k", state.k);
  if (state.shown > Number(state.k)) p.set("shown", String(state.shown));
  if (state.photo) p.set("photo", "1");
  return `${location.pathname}?${p.toString()}`;
}

function stateFromUrl() {
  const p = new URLSearchParams(location.search);
  const state = emptyState();
  state.title = (p.get("title") || "").trim();
  state.similar = p.get("similar") || null;
  const k = p.get("k");
  if (k && [...kSelect.options].some((o) => o.value === k)) state.k = k;
  state.shown = Math.max(0, parseInt(p.get("shown") || "0", 10) || 0);
  state.photo = p.get("photo") === "1";
  for (const [name, value] of p.entries()) {
    if (name.startsWith("f.") && name.length > 2) state.filters[name.slice(2)] = value;
  }
  return state;
}

function applyToForm(state) {
  titleInput.value = state.title || "";
  kSelect.value = state.k;
  filtersBox.querySelectorAll("select").forEach((s) => {
    const v = state.filters[s.dataset.column];
    if (v !== undefined && ![...s.options].some((o) => o.value === v)) s.append(new Option(v, v));
    s.value = v === undefined ? "" : v;
  });
}

function remember(state, file, how) {
  if (how === "none") return;
  const entry = { ...state };
  if (file) {
    entry.photoKey = ++photoKeys;
    photos.set(entry.photoKey, file);
  }
  if (how === "push") history.pushState(entry, "", urlOf(state));
  else history.replaceState(entry, "", urlOf(state));
}

// Show the query a history entry or a link holds (back/forward, reload, a shared link).
function restore(state) {
  applyToForm(state);
  clearError();
  clearFile();
  let file = null;
  if (state.photo) {
    file = state.photoKey !== undefined ? photos.get(state.photoKey) : null;
    if (file) chooseFile(file);
    else showLinkNote(PHOTO_LINK_NOTE + (state.title ? " Showing the title alone." : ""));
  } else {
    showLinkNote("");
  }
  const state2 = { ...state, photo: !!file };
  if (!state2.similar && !state2.title && !file) {
    clearResults();
    return;
  }
  runQuery(state2, "none", file, state.shown);
}

window.addEventListener("popstate", (e) => restore(e.state || stateFromUrl()));

// ------------------------------------------------------------------ requests

function pageRequest(state, file, offset) {
  const filter = filterExpression(state.filters);
  if (state.similar) {
    const p = new URLSearchParams({ k: state.k, offset: String(offset) });
    if (filter) p.set("filter", filter);
    return [`/similar/${encodeURIComponent(state.similar)}?${p}`, {}];
  }
  const data = new FormData();
  if (file) data.append("image", file, file.name || "query");
  if (state.title) data.append("title", state.title);
  data.append("k", state.k);
  data.append("offset", String(offset));
  if (filter) data.append("filter", filter);
  return ["/search", { method: "POST", body: data }];
}

async function fetchPage(state, file, offset) {
  const [url, options] = pageRequest(state, file, offset);
  const response = await apiFetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return body;
}

// A new query: its first page (then more pages up to `upTo` results, when restoring a link).
async function runQuery(state, how, file = state.photo ? chosenFile : null, upTo = 0) {
  const mine = ++generation;
  clearError();
  setBusy(true);
  results.dataset.state = "loading";
  try {
    const data = await fetchPage(state, file, 0);
    if (mine !== generation) return; // a newer request was made meanwhile
    current = { state: { ...state, shown: data.hits.length }, file, hasMore: data.has_more, total: data.total };
    render(data, false);
    while (upTo > current.state.shown && current.hasMore && current.state.shown <= 1000) {
      const more = await fetchPage(current.state, file, current.state.shown);
      if (mine !== generation) return;
      appendPage(more);
    }
    remember(current.state, file, how);
    results.dataset.state = "done";
  } catch (err) {
    if (mine !== generation) return;
    if (err instanceof AuthNeeded) retryAfterKey = () => runQuery(state, how, file, upTo);
    results.dataset.state = "error";
    showError(err instanceof TypeError ? `Cannot reach the server (${err.message}).` : err.message);
  } finally {
    setBusy(false);
  }
}

async function loadMore() {
  if (!current || !current.hasMore) return;
  const mine = ++generation;
  clearError();
  setBusy(true);
  results.dataset.state = "loading";
  try {
    const data = await fetchPage(current.state, current.file, current.state.shown);
    if (mine !== generation) return;
    appendPage(data);
    remember(current.state, current.file, "replace");
    results.dataset.state = "done";
  } catch (err) {
    if (mine !== generation) return;
    if (err instanceof AuthNeeded) retryAfterKey = loadMore;
    results.dataset.state = "error";
    showError(err instanceof TypeError ? `Cannot reach the server (${err.message}).` : err.message);
  } finally {
    setBusy(false);
  }
}

moreButton.addEventListener("click", loadMore);

form.addEventListener("submit", (e) => {
  e.preventDefault();
  const state = queryFromForm(null);
  if (!chosenFile && !state.title) {
    showError("Choose an image or type a title (or both).");
    return;
  }
  showLinkNote("");
  runQuery(state, "push", chosenFile);
});

function searchSimilar(id) {
  clearFile(); // the old query photo is not this query's: the results are products like `id`
  showLinkNote("");
  runQuery(queryFromForm(id), "push", null);
  window.scrollTo({ top: 0, behavior: "smooth" });
}

// ------------------------------------------------------------------ rendering

function thumb(url, alt) {
  const box = el("div", "thumb");
  if (url) {
    const img = el("img");
    img.alt = alt || "";
    img.decoding = "async";
    img.addEventListener("error", () => box.replaceChildren(el("span", "no-image", "image unavailable")));
    if (apiKey()) {
      // <img> cannot send the key: fetch the image with it instead.
      apiFetch(url)
        .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
        .then((b) => (img.src = URL.createObjectURL(b)))
        .catch(() => box.replaceChildren(el("span", "no-image", "image unavailable")));
    } else {
      img.src = url;
    }
    box.append(img);
  } else {
    box.append(el("span", "no-image", "no image"));
  }
  return box;
}

function chip(prediction, labelColumn) {
  const text = `${prediction.label} · ${Math.round(prediction.probability * 100)}%`;
  const c = el("span", "chip", text);
  c.title = `predicted ${labelColumn || "label"}`;
  return c;
}

function percent(share) {
  const p = share * 100;
  return p >= 99 && p < 100 ? `${p.toFixed(1)}%` : `${Math.round(p)}%`;
}

function attributes(metadata) {
  const box = el("div", "card-attrs");
  // Filterable (low-cardinality) columns first, in the order of the filter menus; then the rest.
  const names = Object.keys(metadata || {});
  const order = [...facets.keys()].filter((n) => names.includes(n)).concat(names.filter((n) => !facets.has(n)));
  for (const name of order) {
    const value = metadata[name];
    if (value === null || value === undefined || typeof value === "object") continue;
    let text = String(value);
    if (!text || text.length > 80) continue; // free text (descriptions) is not an attribute to show
    if (text.length > 40) text = `${text.slice(0, 39)}…`;
    const a = el("span", facets.has(name) ? "attr facet" : "attr");
    a.dataset.column = name;
    a.dataset.value = String(value);
    a.title = `${name}: ${value}`;
    a.append(el("span", "attr-key", name), el("span", "attr-value", text));
    box.append(a);
  }
  return box;
}

function card(hit, labelColumn) {
  const node = el("article", "card");
  node.tabIndex = 0;
  node.setAttribute("role", "button");
  node.dataset.id = hit.id;
  node.dataset.rank = hit.rank;
  node.title = "Find similar products";
  node.append(thumb(hit.image_url, hit.title));
  const body = el("div", "card-body");
  body.append(el("h3", "card-title", hit.title || "(no title)"));
  const meta = el("div", "card-meta");
  const left = el("span", "card-rank", `#${hit.rank} `);
  left.append(el("code", "card-id", hit.id));
  const right = el("span", "scores");
  const cos = el("span", "cosine", "cos ");
  cos.append(el("span", "score", hit.score.toFixed(3)));
  cos.title = "raw cosine similarity to the query";
  right.append(cos);
  meta.append(left, right);
  const share = hit.relevance === null || hit.relevance === undefined ? null : hit.relevance;
  const bar = el("div", "score-bar");
  const fill = el("span");
  fill.style.width = `${(share === null ? Math.max(0, Math.min(1, hit.score)) : share) * 100}%`;
  bar.append(fill);
  const rel = el("div", "relevance");
  rel.append(bar);
  if (share !== null) {
    const text = el("span", "relevance-text", percent(share));
    text.dataset.value = String(share);
    rel.title = `closer to the query than ${percent(share)} of the catalog`;
    rel.append(text);
  }
  body.append(rel, meta);
  body.append(attributes(hit.metadata));
  if (hit.predicted_category) body.append(chip(hit.predicted_category, labelColumn));
  node.append(body);
  node.addEventListener("click", () => searchSimilar(hit.id));
  node.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      searchSimilar(hit.id);
    }
  });
  return node;
}

const MODE_NAMES = { joint: "photo + title", title: "title", photo: "photo only", product: "similar product" };

function renderSummary(data) {
  const q = data.query;
  const parts = [];
  if (q.product) {
    const p = q.product;
    const head = el("div", "summary-product");
    head.append(thumb(p.image_url, p.title));
    const text = el("div");
    text.append(el("div", "summary-label", "Similar to"), el("div", "summary-title", p.title || p.id), el("code", "", p.id));
    head.append(text);
    parts.push(head);
  } else {
    const text = el("div");
    text.append(el("span", "summary-label", "Query: "), el("span", "summary-title", MODE_NAMES[data.mode] || q.modalities.join(" + ")));
    if (current && current.state.title) text.append(el("span", "summary-text", ` “${current.state.title}”`));
    parts.push(text);
  }
  const stats = el("div", "summary-stats");
  stats.append(el("span", "summary-count", ""));
  stats.append(` · ${Math.round(data.took_ms)} ms`);
  if (data.filter) stats.append(" · ", el("code", "summary-filter", data.filter));
  if (q.predicted_category) stats.append(" · ", chip(q.predicted_category, data.label_column));
  parts.push(stats);
  if (data.note) parts.push(el("p", "mode-note", data.note));
  summary.replaceChildren(...parts);
  summary.dataset.query = q.product ? `product:${q.product.id}` : q.modalities.join("+");
  summary.dataset.mode = data.mode || "";
  summary.dataset.filter = data.filter || "";
  summary.hidden = false;
}

function updateCount() {
  const count = summary.querySelector(".summary-count");
  if (!count || !current) return;
  const shown = current.state.shown;
  count.textContent = current.total === null || current.total === undefined
    ? `${shown} results` : `${shown} of ${current.total.toLocaleString()} results`;
  moreButton.hidden = !current.hasMore;
}

function render(data) {
  renderSummary(data);
  if (!data.hits.length) {
    results.replaceChildren(el("p", "empty", data.filter ? "No products pass this filter." : "No products found."));
  } else {
    results.replaceChildren(...data.hits.map((h) => card(h, data.label_column)));
  }
  updateCount();
}

function appendPage(data) {
  const seen = new Set([...results.querySelectorAll(".card")].map((c) => c.dataset.id));
  const fresh = data.hits.filter((h) => !seen.has(h.id));
  results.append(...fresh.map((h) => card(h, data.label_column)));
  current.state.shown += data.hits.length;
  current.hasMore = data.has_more && data.hits.length > 0;
  current.total = data.total;
  updateCount();
}

// ------------------------------------------------------------------ start

async function start() {
  try {
    const r = await apiFetch("/health");
    if (!r.ok) throw new Error(`health: ${r.status}`);
    const h = await r.json();
    maxUploadBytes = h.max_upload_bytes;
    const clf = h.classifier ? ` · predicts ${h.classifier}` : "";
    $("health").textContent = `${h.index_size.toLocaleString()} products · ${h.dim}-d · model ${h.model_id.slice(0, 12)}${clf}`;
    $("health").title = `model ${h.model_id}`;
    const f = await apiFetch("/facets");
    if (f.ok) buildFilters((await f.json()).columns);
    started = true;
  } catch (err) {
    if (err instanceof AuthNeeded) {
      retryAfterKey = start;
      $("health").textContent = "API key needed";
      showError(err.message);
      return;
    }
    $("health").textContent = "server unreachable";
    showError(`Cannot reach the server (${err.message}).`);
    return;
  }
  const state = stateFromUrl();
  history.replaceState(state, "", location.href);
  restore(state);
  document.body.dataset.ready = "1";
}

start();
