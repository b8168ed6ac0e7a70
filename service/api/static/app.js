// The search page: a report sentence, an image or a region in, one card per study out; filters,
// keywords and a score threshold steer it, Like/Not refine it, "Why?" shows where a match comes
// from. The page state lives in the URL, so a search can be shared and reloaded. (Labels are
// words and simple symbols, not emoji: many Linux browsers have no emoji font.)
// Plain DOM code, no build step. Untrusted text (reports, paths) is only ever set as textContent.
"use strict";

const $ = (selector) => document.querySelector(selector);
const viewStack = [];  // earlier views, for the Back button
let current = null;  // {title, meta, results, queryThumb, query}
// query: {kind: "text", text} | {kind: "similar", imageId, box} | {kind: "upload", file, box}
const feedback = {liked: new Set(), disliked: new Set()};

// Every API request goes through here. A 401 asks for an API key, keeps it in sessionStorage (gone
// with the tab; never localStorage, never the URL) and sends it again as X-API-Key.
async function api(path, options = {}) {
  for (;;) {
    const sent = apiKey();
    const response = await fetch(path, withKey(options));
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    if (response.status === 401) {
      if (apiKey() === sent) {  // not already replaced while this request was out
        sessionStorage.removeItem(KEY_ITEM);
        await askForKey(sent ? message : "");
      }
      continue;
    }
    if (!response.ok) throw new Error(message);
    return body;
  }
}

// -- access: the API key, the sign-in dialog, images fetched with the key ------------------------------

const KEY_ITEM = "convirt-api-key";
let keyPrompt = null;  // one dialog however many requests are refused at once

function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

function withKey(options = {}) {
  const key = apiKey();
  return key ? {...options, headers: {...(options.headers || {}), "X-API-Key": key}} : options;
}

function askForKey(reason) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve, reject) => {
    const dialog = $("#key-dialog");
    let given = false;
    $("#key-reason").textContent = reason;
    $("#key-input").value = "";
    $("#key-form").onsubmit = (event) => {
      event.preventDefault();
      const key = $("#key-input").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_ITEM, key);
      given = true;
      dialog.close();
    };
    $("#key-cancel").onclick = () => dialog.close();
    dialog.onclose = () => {
      keyPrompt = null;
      showAccess();
      if (given) resolve();
      else reject(new Error("Sign in with an API key to search (ask your administrator for one)."));
    };
    dialog.showModal();
    $("#key-input").focus();
  });
  return keyPrompt;
}

// An <img> or a link cannot send a header: with a key, the image is fetched with it and shown from
// a blob: URL, so the key never travels in a URL (logs, history and Referer would keep it there).
// Without one (open, or behind the sign-in proxy, whose cookie every request carries) src is the URL.
function showImage(img, url) {
  const key = apiKey();
  if (!key || /^(blob|data):/.test(url)) {
    img.src = url;
    return;
  }
  fetch(url, withKey())
    .then((response) => (response.ok ? response.blob() : Promise.reject(response.status)))
    .then((blob) => {
      const local = URL.createObjectURL(blob);
      img.addEventListener("load", () => URL.revokeObjectURL(local), {once: true});
      img.src = local;
    })
    .catch(() => {
      img.alt = "image unavailable";
    });
}

function openImage(event, url) {
  if (!apiKey()) return;  // a plain link works
  event.preventDefault();
  const tab = window.open("", "_blank");
  fetch(url, withKey())
    .then((response) => (response.ok ? response.blob() : Promise.reject(new Error(`HTTP ${response.status}`))))
    .then((blob) => {
      if (tab) tab.location.href = URL.createObjectURL(blob);
    })
    .catch((err) => {
      if (tab) tab.close();
      say(`image unavailable: ${err.message}`, true);
    });
}

async function showAccess() {
  let who = null;
  try {
    const response = await fetch("v1/whoami", withKey());
    who = response.ok ? await response.json() : null;
  } catch (err) {
    who = null;
  }
  let text = "";
  if (who && who.note) text = who.note;
  else if (who && who.user) text = `signed in as ${who.user} (${who.role || "no role"})`;
  else if (who) text = "not signed in";
  $("#access-status").textContent = text;
  $("#sign-out").hidden = !apiKey();
}

function signOut() {
  sessionStorage.removeItem(KEY_ITEM);
  location.replace(location.pathname);  // nothing of the last search stays on screen
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

function words(text) {
  return text.split(",").map((word) => word.trim()).filter(Boolean);
}

// -- the controls: filters, keywords, grouping, threshold ------------------------------------------

function controls() {
  const chosen = {k: requestedK(), group_by: $("#group-by").value, filters: {}};
  const min = $("#min-score").value.trim();
  if (min !== "" && Number.isFinite(Number(min))) chosen.min_score = Number(min);
  const must = words($("#must").value);
  const mustNot = words($("#must-not").value);
  if (must.length) chosen.must = must;
  if (mustNot.length) chosen.must_not = mustNot;
  for (const select of document.querySelectorAll("#filters select")) {
    if (select.value !== "") chosen.filters[select.dataset.field] = select.value;
  }
  for (const input of document.querySelectorAll("#filters input[data-bound]")) {
    const value = input.value.trim();
    if (value === "") continue;
    const field = input.dataset.field;
    const range = chosen.filters[field] || (chosen.filters[field] = {});
    range[input.dataset.bound] = input.dataset.numeric === "true" ? Number(value) : value;
  }
  return chosen;
}

function setControls(params) {
  if (params.has("k")) $("#k").value = params.get("k");
  if (params.has("group")) $("#group-by").value = params.get("group");
  $("#min-score").value = params.get("min") || "";
  $("#must").value = params.get("must") || "";
  $("#must-not").value = params.get("not") || "";
  $("#mode").value = params.get("mode") || "hybrid";
  let filters = {};
  try {
    filters = JSON.parse(params.get("f") || "{}");
  } catch (err) {
    filters = {};
  }
  for (const select of document.querySelectorAll("#filters select")) {
    const value = filters[select.dataset.field];
    select.value = typeof value === "string" ? value : "";
  }
  for (const input of document.querySelectorAll("#filters input[data-bound]")) {
    const range = filters[input.dataset.field];
    const value = range && typeof range === "object" ? range[input.dataset.bound] : undefined;
    input.value = value === undefined ? "" : String(value);
  }
}

// Search options as query-string or form fields (similar and upload searches).
function appendControls(target, chosen) {
  target.append("k", String(chosen.k));
  target.append("group_by", chosen.group_by);
  if (chosen.min_score !== undefined) target.append("min_score", String(chosen.min_score));
  if (Object.keys(chosen.filters).length) target.append("filters", JSON.stringify(chosen.filters));
  for (const word of chosen.must || []) target.append("must", word);
  for (const word of chosen.must_not || []) target.append("must_not", word);
}

async function loadFacets() {
  const box = $("#filters");
  box.replaceChildren();
  try {
    const response = await api("v1/facets");
    for (const facet of response.facets) {
      const control = facetControl(facet);
      if (control) box.appendChild(control);
    }
  } catch (err) {
    box.textContent = `filters unavailable: ${err.message}`;
  }
}

const MAX_CHOICES = 40;  // fields with more distinct values (diagnoses, ids) make poor menus

function facetControl(facet) {
  const label = document.createElement("label");
  label.textContent = facet.field.replaceAll("_", " ");
  if (facet.kind === "range") {
    const numeric = typeof facet.low === "number";
    const inputs = document.createElement("span");
    inputs.className = "range-inputs";
    for (const [bound, hint] of [["gte", facet.low], ["lte", facet.high]]) {
      const input = document.createElement("input");
      input.type = numeric ? "number" : "text";
      input.dataset.field = facet.field;
      input.dataset.bound = bound;
      input.dataset.numeric = String(numeric);
      input.placeholder = `${bound === "gte" ? "from" : "to"} ${hint}`;
      input.setAttribute("aria-label", `${facet.field} ${bound === "gte" ? "from" : "to"}`);
      inputs.appendChild(input);
    }
    label.appendChild(inputs);
    return label;
  }
  if (facet.distinct > MAX_CHOICES || facet.distinct < 2) return null;
  const select = document.createElement("select");
  select.dataset.field = facet.field;
  select.add(new Option(`any (${facet.count})`, ""));
  for (const {value, count} of facet.values) select.add(new Option(`${value} (${count})`, value));
  label.appendChild(select);
  return label;
}

// -- the URL: what is shown, so that a link reloads it ---------------------------------------------

function writeUrl(query) {
  const params = new URLSearchParams();
  if (query.kind === "text") {
    params.set("q", query.text);
    if ($("#mode").value !== "hybrid") params.set("mode", $("#mode").value);
  }
  else if (query.kind === "similar") params.set("similar", query.imageId);
  else return;  // an upload cannot be put in a link
  if (query.box) params.set("box", query.box.join(","));
  const chosen = controls();
  params.set("k", String(chosen.k));
  params.set("group", chosen.group_by);
  if (chosen.min_score !== undefined) params.set("min", String(chosen.min_score));
  if (chosen.must) params.set("must", chosen.must.join(", "));
  if (chosen.must_not) params.set("not", chosen.must_not.join(", "));
  if (Object.keys(chosen.filters).length) params.set("f", JSON.stringify(chosen.filters));
  history.replaceState(null, "", `${location.pathname}?${params}`);
}

async function runFromUrl() {
  const params = new URLSearchParams(location.search);
  setControls(params);
  const box = params.has("box") ? params.get("box").split(",").map(Number) : null;
  if (params.has("q")) {
    $("#query").value = params.get("q");
    await runQuery({kind: "text", text: params.get("q")});
  } else if (params.has("similar")) {
    const imageId = params.get("similar");
    await runQuery({kind: "similar", imageId, box}, `v1/images/${imageId}/thumbnail`);
  }
}

// -- searches --------------------------------------------------------------------------------------

function describe(response, extra = "") {
  const ms = response.took_ms.toFixed(1);
  const n = response.results.length;
  const unit = $("#group-by").value === "none" ? "images" : "cards";
  return `${n} ${unit} in ${ms} ms · index ${response.index_version}${extra}`;
}

function titleOf(query) {
  const region = query.box ? " (region)" : "";
  if (query.kind === "text") return `Images for “${query.text.trim()}”`;
  if (query.kind === "upload") return `Cases similar to ${query.file.name}${region}`;
  return `Cases similar to image ${query.imageId}${region}`;
}

function request(query) {
  const chosen = controls();
  if (query.kind === "text") {
    return api("v1/search/text", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({text: query.text, mode: $("#mode").value, ...chosen}),
    });
  }
  if (query.kind === "similar") {
    const params = new URLSearchParams();
    appendControls(params, chosen);
    if (query.box) params.set("box", query.box.join(","));
    return api(`v1/images/${query.imageId}/similar?${params}`);
  }
  const form = new FormData();
  form.append("file", query.file, query.file.name);
  appendControls(form, chosen);
  if (query.box) form.append("box", query.box.join(","));
  return api("v1/search/image", {method: "POST", body: form});
}

async function runQuery(query, queryThumb = null, replace = false) {
  if (query.kind === "text" && !query.text.trim()) {
    say("Type a report sentence first.", true);
    return;
  }
  busy(true);
  say("Searching…");
  try {
    const response = await request(query);
    const note = response.truncated
      ? ` · only the first ${response.max_tokens} tokens of the text were used`
      : "";
    say("");
    feedback.liked.clear();
    feedback.disliked.clear();
    const view = {title: titleOf(query), meta: describe(response, note),
                  results: response.results, queryThumb, query};
    if (replace) render(view);
    else show(view);
    writeUrl(query);
  } catch (err) {
    say(err.message, true);
  } finally {
    busy(false);
  }
}

async function refine() {
  const query = current.query;
  const body = {...controls(), liked: [...feedback.liked], disliked: [...feedback.disliked]};
  if (query.kind === "text") body.text = query.text;
  else if (query.kind === "similar" && !query.box) body.image_id = query.imageId;
  busy(true);
  say("Refining…");
  try {
    const response = await api("v1/search/refine", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body),
    });
    say("");
    const counts = `${feedback.liked.size} liked, ${feedback.disliked.size} not`;
    feedback.liked.clear();
    feedback.disliked.clear();
    show({...current, title: `${titleOf(query)}, refined (${counts})`,
          meta: describe(response), results: response.results});
  } catch (err) {
    say(err.message, true);
  } finally {
    busy(false);
  }
}

function searchUpload(file) {
  if (file) runQuery({kind: "upload", file, box: null});
  $("#file-input").value = "";
}

// -- results ---------------------------------------------------------------------------------------

function card(result) {
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = result.id;
  const thumb = node.querySelector(".thumb");
  showImage(thumb, result.thumbnail_url);
  thumb.alt = result.metadata.relpath;
  node.querySelector(".score").textContent = result.score.toFixed(3);
  const open = node.querySelector(".open");
  open.href = result.image_url;
  open.addEventListener("click", (event) => openImage(event, result.image_url));
  const viewer = node.querySelector(".viewer");
  if (result.viewer_url && /^https?:\/\//.test(result.viewer_url)) {
    viewer.href = result.viewer_url;
    viewer.hidden = false;
  }
  const fields = result.metadata.fields || {};
  const where = [result.metadata.modality, fields.dataset, result.metadata.relpath];
  node.querySelector(".where").textContent = where.filter(Boolean).join(" · ");
  attribute(node.querySelector(".attribution"), fields);
  showEvidence(node, result);
  const report = node.querySelector(".report");
  report.textContent = result.report || "";
  report.title = result.report || "";
  if (result.group && result.group.size > 1) {
    const more = node.querySelector(".more");
    more.hidden = false;
    more.textContent = `+${result.group.size - 1} more`;
    more.title = `${result.group.field} ${result.group.key}: ${result.group.size} matching images`;
  }
  wireActions(node, result);
  return node;
}

// Why a card ranked for a text query: the report sentence that agreed with it, the query's words
// its report asserts, and the image's own similarity.
function showEvidence(node, result) {
  const evidence = result.evidence;
  if (!evidence) return;
  const line = node.querySelector(".evidence");
  const parts = [];
  if (evidence.sentence) {
    const said = document.createElement("q");
    said.textContent = evidence.sentence;
    line.append("Report: ", said, ` ${evidence.sentence_score.toFixed(2)}`);
  } else if (!evidence.has_report) {
    parts.push("no report: ranked by the image");
  }
  if (evidence.terms.length) parts.push(`says: ${evidence.terms.join(", ")}`);
  parts.push(`image ${evidence.image.toFixed(2)}`);
  line.append(`${evidence.sentence ? " · " : ""}${parts.join(" · ")}`);
  line.hidden = false;
  node.querySelector(".score").title =
    "score: the image, its report's nearest sentence and the query's words, weighed together";
}

// What the reports of similar cases said: for an image query, a side panel of report sentences.
async function suggestFor(query) {
  const panel = $("#suggest-panel");
  panel.hidden = true;
  if (query.kind === "text" || query.box) return;
  const form = new FormData();
  if (query.kind === "upload") form.append("file", query.file, query.file.name);
  else form.append("image_id", query.imageId);
  let response;
  try {
    response = await api("v1/reports/suggest", {method: "POST", body: form});
  } catch (err) {
    return;  // an index without report sentences: no panel
  }
  if (current.query !== query || !response.sentences.length) return;
  panel.querySelector(".disclaimer").textContent = response.disclaimer;
  panel.querySelector(".draft").textContent =
    response.draft.length ? `Findings they assert: ${response.draft.join(", ")}` : "";
  panel.querySelector(".sentences").replaceChildren(...response.sentences.map((sentence) => {
    const item = document.createElement("li");
    item.textContent = sentence.text;
    const from = document.createElement("span");
    from.className = "muted small";
    const cases = sentence.cases.length;
    from.textContent = ` ${sentence.score.toFixed(2)}${cases ? ` · ${cases} similar case${cases > 1 ? "s" : ""}` : ""}`;
    item.appendChild(from);
    return item;
  }));
  panel.hidden = false;
}

// Images published under a licence (roco's PubMed Central figures: CC BY and kin) name it, and
// their source article, where they are shown.
const PMC_ARTICLE = /^PMC\d+$/;

function attribute(line, fields) {
  const licence = fields.licence || fields.license;
  if (!licence) return;
  line.querySelector(".licence").textContent = `Licence: ${licence}`;
  const article = fields.pmc_article;
  if (article && PMC_ARTICLE.test(article)) {
    const source = line.querySelector(".source");
    source.href = `https://www.ncbi.nlm.nih.gov/pmc/articles/${article}/`;
    source.textContent = `source: ${article}`;
    source.hidden = false;
  }
  line.hidden = false;
}

function wireActions(node, result) {
  const on = (selector, action) => node.querySelector(selector).addEventListener("click", action);
  on(".similar", () => runQuery({kind: "similar", imageId: result.id, box: null},
                                result.thumbnail_url));
  const caption = node.querySelector(".caption");
  caption.hidden = !result.report;
  on(".caption", () => {
    $("#query").value = result.report;
    runQuery({kind: "text", text: result.report});
  });
  on(".region", () => drawRegion(result.thumbnail_url, (box) =>
    runQuery({kind: "similar", imageId: result.id, box}, result.thumbnail_url)));
  const why = node.querySelector(".why");
  why.hidden = current && current.query.kind === "upload";
  on(".why", () => toggleHeatMap(node, result));
  on(".like", () => mark(node, result.id, "liked"));
  on(".dislike", () => mark(node, result.id, "disliked"));
}

function mark(node, id, which) {
  const other = which === "liked" ? "disliked" : "liked";
  const on = !feedback[which].has(id);
  feedback[other].delete(id);
  if (on) feedback[which].add(id);
  else feedback[which].delete(id);
  node.classList.toggle("liked", feedback.liked.has(id));
  node.classList.toggle("disliked", feedback.disliked.has(id));
  node.querySelector(".like").setAttribute("aria-pressed", String(feedback.liked.has(id)));
  node.querySelector(".dislike").setAttribute("aria-pressed", String(feedback.disliked.has(id)));
  showRefineButton();
}

function showRefineButton() {
  const button = $("#refine-button");
  const liked = feedback.liked.size;
  const disliked = feedback.disliked.size;
  const canRefine = liked > 0 || (disliked > 0 && current.query.kind !== "upload");
  button.hidden = !canRefine;
  button.textContent = `Refine (${liked} liked, ${disliked} not)`;
}

function render(view) {
  current = view;
  $("#results").hidden = false;
  const title = $("#results-title");
  title.textContent = "";
  if (view.queryThumb) {
    const img = document.createElement("img");
    img.className = "query-thumb";
    showImage(img, view.queryThumb);
    img.alt = "";
    title.appendChild(img);
  }
  title.appendChild(document.createTextNode(view.title));
  $("#results-meta").textContent = view.meta;
  $("#back-button").hidden = viewStack.length === 0;
  $("#grid").replaceChildren(...view.results.map(card));
  showRefineButton();
  const file = view.query.kind === "upload" ? view.query.file : null;
  $("#query-region").hidden = !(file && /^image\/(png|jpeg)$/.test(file.type));
  if (view.results.length === 0) say("No matching images: loosen the filters or the threshold.");
  suggestFor(view.query);
}

function show(view) {
  if (current) viewStack.push(current);
  render(view);
}

function back() {
  if (viewStack.length) {
    feedback.liked.clear();
    feedback.disliked.clear();
    render(viewStack.pop());
    writeUrl(current.query);
  }
}

// -- why it matched: the explanation heat-map ------------------------------------------------------

async function toggleHeatMap(node, result) {
  const canvas = node.querySelector(".heat");
  if (!canvas.hidden) {
    canvas.hidden = true;
    return;
  }
  const query = current.query;
  const params = new URLSearchParams({image_id: result.id});
  if (query.kind === "text") params.set("text", query.text.slice(0, 2000));
  else params.set("query_id", query.imageId);
  say("Working out why it matched…");
  try {
    const response = await api(`v1/explain?${params}`);
    drawHeatMap(canvas, node.querySelector(".thumb"), response);
    canvas.hidden = false;
    node.dataset.explained = "true";
    say("Red: the parts of the image the match rests on (hiding them lowers the score most).");
  } catch (err) {
    say(err.message, true);
  }
}

function drawHeatMap(canvas, img, explanation) {
  const width = canvas.clientWidth || img.clientWidth;
  const height = canvas.clientHeight || img.clientHeight;
  canvas.width = width;
  canvas.height = height;
  // the thumbnail is drawn with object-fit: contain; find the rectangle it fills
  const scale = Math.min(width / img.naturalWidth, height / img.naturalHeight);
  const shownW = img.naturalWidth * scale;
  const shownH = img.naturalHeight * scale;
  const x0 = (width - shownW) / 2 + explanation.crop.left * shownW;
  const y0 = (height - shownH) / 2 + explanation.crop.top * shownH;
  const rows = explanation.grid.length;
  const cols = explanation.grid[0].length;
  const cellW = (explanation.crop.width * shownW) / cols;
  const cellH = (explanation.crop.height * shownH) / rows;
  const peak = Math.max(...explanation.grid.flat(), 1e-9);
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, width, height);
  explanation.grid.forEach((row, r) => row.forEach((value, c) => {
    const strength = Math.max(0, value) / peak;
    context.fillStyle = `rgba(255, 40, 0, ${(0.65 * strength).toFixed(3)})`;
    context.fillRect(x0 + c * cellW, y0 + r * cellH, cellW, cellH);
  }));
}

// -- region of interest: draw a box, search by it --------------------------------------------------

function drawRegion(src, onSearch) {
  const dialog = $("#region-dialog");
  const stage = $("#region-stage");
  const image = $("#region-image");
  const rectangle = $("#region-box");
  const go = $("#region-search");
  let start = null;
  let box = null;
  showImage(image, src);
  rectangle.hidden = true;
  go.disabled = true;
  const at = (event) => {
    const r = image.getBoundingClientRect();
    return [Math.min(Math.max((event.clientX - r.left) / r.width, 0), 1),
            Math.min(Math.max((event.clientY - r.top) / r.height, 0), 1)];
  };
  const paint = () => {
    const r = image.getBoundingClientRect();
    Object.assign(rectangle.style, {
      left: `${box[0] * r.width}px`, top: `${box[1] * r.height}px`,
      width: `${(box[2] - box[0]) * r.width}px`, height: `${(box[3] - box[1]) * r.height}px`,
    });
    rectangle.hidden = false;
  };
  stage.onpointerdown = (event) => {
    event.preventDefault();
    start = at(event);
    stage.setPointerCapture(event.pointerId);
  };
  stage.onpointermove = (event) => {
    if (!start) return;
    const [x, y] = at(event);
    box = [Math.min(start[0], x), Math.min(start[1], y), Math.max(start[0], x), Math.max(start[1], y)]
      .map((v) => Number(v.toFixed(4)));
    paint();
  };
  stage.onpointerup = () => {
    start = null;
    go.disabled = !box || box[2] - box[0] < 0.02 || box[3] - box[1] < 0.02;
  };
  go.onclick = () => {
    dialog.close();
    onSearch(box);
  };
  $("#region-cancel").onclick = () => dialog.close();
  dialog.showModal();
}

// -- set-up ----------------------------------------------------------------------------------------

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
  input.addEventListener("change", () => searchUpload(input.files[0]));
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
    searchUpload(event.dataTransfer.files[0]);
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

function rerun() {
  if (current) runQuery(current.query, current.queryThumb, true);
}

function regionOfUpload() {
  const file = current.query.file;
  const url = URL.createObjectURL(file);
  drawRegion(url, (box) => runQuery({kind: "upload", file, box}));
}

document.addEventListener("DOMContentLoaded", async () => {
  $("#text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runQuery({kind: "text", text: $("#query").value});
  });
  $("#back-button").addEventListener("click", back);
  $("#refine-button").addEventListener("click", refine);
  $("#query-region").addEventListener("click", regionOfUpload);
  $("#sign-out").addEventListener("click", signOut);
  $("#controls").addEventListener("change", rerun);
  setUpDropZone();
  showIndexStatus();
  showAccess();
  await loadFacets();
  await runFromUrl();
  document.body.dataset.ready = "true";
});
