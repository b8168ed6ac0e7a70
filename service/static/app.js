// The search page: a report sentence or an image in, a grid of similar cases out.
// Plain DOM code, no build step. Untrusted text (reports, paths) is only ever set as textContent.
"use strict";

const $ = (selector) => document.querySelector(selector);
const viewStack = [];  // earlier views, for the Back button
let current = null;  // {title, meta, results, queryThumb}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function say(text, isError = false) {
  const message = $("#message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

function busy(on) {
  $("#search-button").disabled = on;
  document.body.setAttribute("aria-busy", on ? "true" : "false");
}

function requestedK() {
  const k = parseInt($("#k").value, 10);
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), 100) : 12;
}

function describe(response, extra = "") {
  const ms = response.took_ms.toFixed(1);
  return `${response.results.length} results in ${ms} ms · index ${response.index_version}${extra}`;
}

function card(result) {
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = result.id;
  const thumb = node.querySelector(".thumb");
  thumb.src = result.thumbnail_url;
  thumb.alt = result.metadata.relpath;
  node.querySelector(".score").textContent = result.score.toFixed(3);
  const open = node.querySelector(".open");
  open.href = result.image_url;
  open.addEventListener("click", (event) => event.stopPropagation());
  const where = [result.metadata.modality, result.metadata.relpath].filter(Boolean).join(" · ");
  node.querySelector(".where").textContent = where;
  const report = node.querySelector(".report");
  report.textContent = result.report || "";
  report.title = result.report || "";
  const choose = () => showSimilar(result);
  node.addEventListener("click", choose);
  node.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      choose();
    }
  });
  return node;
}

function render(view) {
  current = view;
  $("#results").hidden = false;
  const title = $("#results-title");
  title.textContent = "";
  if (view.queryThumb) {
    const img = document.createElement("img");
    img.className = "query-thumb";
    img.src = view.queryThumb;
    img.alt = "";
    title.appendChild(img);
  }
  title.appendChild(document.createTextNode(view.title));
  $("#results-meta").textContent = view.meta;
  $("#back-button").hidden = viewStack.length === 0;
  const grid = $("#grid");
  grid.replaceChildren(...view.results.map(card));
  if (view.results.length === 0) say("No matching images.");
}

function show(view) {
  if (current) viewStack.push(current);
  render(view);
}

async function searchText(event) {
  event.preventDefault();
  const text = $("#query").value;
  if (!text.trim()) {
    say("Type a report sentence first.", true);
    return;
  }
  busy(true);
  say("Searching…");
  try {
    const response = await api("v1/search/text", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({text, k: requestedK()}),
    });
    const note = response.truncated
      ? ` · only the first ${response.max_tokens} tokens of the text were used`
      : "";
    say("");
    show({title: `Images for “${text.trim()}”`, meta: describe(response, note),
          results: response.results});
  } catch (err) {
    say(err.message, true);
  } finally {
    busy(false);
  }
}

async function searchImage(file) {
  if (!file) return;
  busy(true);
  say(`Searching with ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("k", String(requestedK()));
  try {
    const response = await api("v1/search/image", {method: "POST", body: form});
    say("");
    show({title: `Cases similar to ${file.name}`, meta: describe(response),
          results: response.results});
  } catch (err) {
    say(err.message, true);
  } finally {
    busy(false);
    $("#file-input").value = "";
  }
}

async function showSimilar(result) {
  busy(true);
  say("Finding similar cases…");
  try {
    const response = await api(`${result.similar_url}?k=${requestedK()}`);
    say("");
    show({title: `Cases similar to ${result.metadata.relpath}`, meta: describe(response),
          results: response.results, queryThumb: result.thumbnail_url});
  } catch (err) {
    say(err.message, true);
  } finally {
    busy(false);
  }
}

function back() {
  if (viewStack.length) render(viewStack.pop());
}

function setUpDropZone() {
  const zone = $("#drop-zone");
  const input = $("#file-input");
  zone.addEventListener("click", (event) => {
    if (event.target !== input) input.click();
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => searchImage(input.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    searchImage(event.dataTransfer.files[0]);
  });
}

async function showIndexStatus() {
  try {
    const ready = await api("readyz");
    $("#index-status").textContent =
      `index ${ready.index_version} · ${ready.images} images · model ${ready.model_fingerprint}`;
  } catch (err) {
    $("#index-status").textContent = `not ready: ${err.message}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#text-form").addEventListener("submit", searchText);
  $("#back-button").addEventListener("click", back);
  setUpDropZone();
  showIndexStatus();
});
