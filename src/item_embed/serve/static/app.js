// item-embed search page: no framework, no build step. Talks to /health, /search, /similar/{id}.
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
const summary = $("summary");
const results = $("results");
const searchButton = $("search-button");

let chosenFile = null;
let maxUploadBytes = 10_000_000;
let busy = 0; // requests in flight; the newest answer wins
let generation = 0;

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

function setBusy(on) {
  busy += on ? 1 : -1;
  searchButton.disabled = busy > 0;
  searchButton.textContent = busy > 0 ? "Searching…" : "Search";
  results.classList.toggle("loading", busy > 0);
}

function formatBytes(n) {
  return n >= 1e6 ? `${(n / 1e6).toFixed(n % 1e6 ? 1 : 0)} MB` : `${Math.round(n / 1e3)} kB`;
}

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

$("clear-button").addEventListener("click", () => {
  clearFile();
  titleInput.value = "";
  clearError();
  summary.hidden = true;
  results.replaceChildren();
  results.dataset.state = "idle";
});

// ------------------------------------------------------------------ requests

async function request(url, options) {
  const mine = ++generation;
  clearError();
  setBusy(true);
  results.dataset.state = "loading";
  try {
    const response = await fetch(url, options);
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (mine !== generation) return; // a newer request was made meanwhile
    if (!response.ok) {
      const detail = body && body.detail ? body.detail : response.statusText;
      throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    }
    render(body);
  } catch (err) {
    if (mine !== generation) return;
    results.dataset.state = "error";
    showError(err instanceof TypeError ? `Cannot reach the server (${err.message}).` : err.message);
  } finally {
    setBusy(false);
  }
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  const title = titleInput.value.trim();
  if (!chosenFile && !title) {
    showError("Choose an image or type a title (or both).");
    return;
  }
  const data = new FormData();
  if (chosenFile) data.append("image", chosenFile, chosenFile.name || "query");
  if (title) data.append("title", title);
  data.append("k", kSelect.value);
  request("/search", { method: "POST", body: data });
});

function searchSimilar(id) {
  request(`/similar/${encodeURIComponent(id)}?k=${encodeURIComponent(kSelect.value)}`);
  window.scrollTo({ top: 0, behavior: "smooth" });
}

// ------------------------------------------------------------------ rendering

function thumb(url, alt) {
  const box = el("div", "thumb");
  if (url) {
    const img = el("img");
    img.src = url;
    img.alt = alt || "";
    img.decoding = "async";
    img.addEventListener("error", () => box.replaceChildren(el("span", "no-image", "image unavailable")));
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

function card(hit, labelColumn) {
  const node = el("article", "card");
  node.tabIndex = 0;
  node.setAttribute("role", "button");
  node.dataset.id = hit.id;
  node.title = "Find similar products";
  node.append(thumb(hit.image_url, hit.title));
  const body = el("div", "card-body");
  body.append(el("h3", "card-title", hit.title || "(no title)"));
  const meta = el("div", "card-meta");
  meta.append(el("code", "card-id", hit.id), el("span", "score", hit.score.toFixed(3)));
  body.append(meta);
  const bar = el("div", "score-bar");
  const fill = el("span");
  fill.style.width = `${Math.max(0, Math.min(1, hit.score)) * 100}%`;
  bar.append(fill);
  body.append(bar);
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
    text.append(el("span", "summary-label", "Query: "), el("span", "summary-title", q.modalities.join(" + ")));
    parts.push(text);
  }
  const stats = el("div", "summary-stats", `${data.hits.length} results · ${Math.round(data.took_ms)} ms`);
  if (q.predicted_category) stats.append(" · ", chip(q.predicted_category, data.label_column));
  parts.push(stats);
  summary.replaceChildren(...parts);
  summary.dataset.query = q.product ? `product:${q.product.id}` : q.modalities.join("+");
  summary.hidden = false;
}

function render(data) {
  renderSummary(data);
  if (!data.hits.length) {
    results.replaceChildren(el("p", "empty", "No products found."));
  } else {
    results.replaceChildren(...data.hits.map((h) => card(h, data.label_column)));
  }
  results.dataset.state = "done";
}

// ------------------------------------------------------------------ start

fetch("/health")
  .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`health: ${r.status}`))))
  .then((h) => {
    maxUploadBytes = h.max_upload_bytes;
    const clf = h.classifier ? ` · predicts ${h.classifier}` : "";
    $("health").textContent = `${h.index_size.toLocaleString()} products · ${h.dim}-d · model ${h.model_id.slice(0, 12)}${clf}`;
    $("health").title = `model ${h.model_id}`;
  })
  .catch((err) => {
    $("health").textContent = "server unreachable";
    showError(`Cannot reach the server (${err.message}).`);
  });
