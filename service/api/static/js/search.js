// Running a search and showing it: the request a query (and its refinement) makes, the grid of
// cards, the Back stack and Refine. A refinement stays with its query: any later control change
// re-runs the refine, never the plain search. After an upload the service keeps the image under an
// upload_id, so Refine, Region and "Why?" use the upload itself as the query.

import {api, postJson, showImage} from "./api.js";
import {card, caseOf} from "./cards.js";
import {showScale} from "./facets.js";
import {openReport} from "./panel.js";
import {appendControls, controls, state, writeUrl} from "./state.js";
import {$, busy, say} from "./ui.js";
import {openViewer} from "./viewer.js";

const viewStack = [];  // earlier views, for the Back button
let current = null;  // {query, refinement, results, scale, title, meta}

function titleOf(query) {
  const region = query.box ? " (region)" : "";
  if (query.kind === "text") return `Images for “${query.text.trim()}”`;
  if (query.kind === "upload") return `Cases similar to ${query.name}${region}`;
  return `Cases similar to ${query.title || "the image shown"}${region}`;
}

// The query a refine keeps: the text, the similar-cases image or the kept upload, with the region
// searched when one was drawn (the region stays the query).
function refineBody(query, refinement) {
  const body = {...controls(), liked: refinement.liked, disliked: refinement.disliked};
  if (refinement.weights) body.weights = refinement.weights;
  if (query.kind === "text") body.text = query.text;
  else if (query.kind === "similar") body.image_id = query.imageId;
  else if (query.kind === "upload" && query.uploadId) body.upload_id = query.uploadId;
  if ((body.image_id || body.upload_id) && query.box) body.box = query.box.join(",");
  return body;
}

function hasQueryVector(query) {
  return query.kind === "text" || query.kind === "similar"
    || (query.kind === "upload" && Boolean(query.uploadId));
}

function request(query, refinement) {
  if (refinement) return postJson("v1/search/refine", refineBody(query, refinement));
  const chosen = controls();
  if (query.kind === "text") {
    return postJson("v1/search/text", {text: query.text, mode: $("#mode").value, ...chosen});
  }
  if (query.kind === "similar") {
    const params = new URLSearchParams();
    appendControls(params, chosen);
    if (query.box) params.set("box", query.box.join(","));
    return api(`v1/images/${query.imageId}/similar?${params}`);
  }
  const form = new FormData();
  if (query.uploadId) form.append("upload_id", query.uploadId);
  else form.append("file", query.file, query.file.name);
  appendControls(form, chosen);
  if (query.box) form.append("box", query.box.join(","));
  return api("v1/search/image", {method: "POST", body: form});
}

async function answer(query, refinement) {
  try {
    return await request(query, refinement);
  } catch (err) {
    // the service no longer keeps the upload: send the file again while this tab has it
    if (err.code !== "unknown_upload" || !query.file) throw err;
    query.uploadId = null;
    return request(query, refinement);
  }
}

function describe(response, refinement) {
  const ms = response.took_ms.toFixed(1);
  const unit = $("#group-by").value === "none" ? "images" : "cards";
  const cut = response.truncated
    ? ` · only the first ${response.max_tokens} tokens of the text were used` : "";
  const refined = refinement ? " · refined" : "";
  return `${response.results.length} ${unit} in ${ms} ms · index ${response.index_version}${refined}${cut}`;
}

// Runs a query (with its refinement, if any) and shows the answer; push: a new view Back returns
// from, else it replaces the one shown (a control change).
export async function run(query, {refinement = null, push = true} = {}) {
  if (query.kind === "text" && !query.text.trim()) {
    say("Type a report sentence first.", true);
    return;
  }
  busy(true);
  say(refinement ? "Refining…" : "Searching…");
  try {
    const response = await answer(query, refinement);
    if (query.kind === "upload" && response.upload_id) query.uploadId = response.upload_id;
    say("");
    let title = titleOf(query);
    if (refinement) {
      title += `, refined (${refinement.liked.length} liked, ${refinement.disliked.length} not)`;
    }
    if (push && current) viewStack.push(current);
    render({query, refinement, results: response.results, scale: response.scale || null, title,
            meta: describe(response, refinement)});
    writeUrl();
  } catch (err) {
    say(err.message, true);
  } finally {
    busy(false);
  }
}

export function rerun() {
  if (current) run(current.query, {refinement: current.refinement, push: false});
}

function refine() {
  const refinement = {
    liked: [...state.feedback.liked],
    disliked: [...state.feedback.disliked],
    weights: current.refinement ? current.refinement.weights : null,
  };
  run(current.query, {refinement});
}

function unrefine() {
  run(current.query);
}

export function back() {
  if (!viewStack.length) return;
  render(viewStack.pop());
  writeUrl();
}

// -- the cards' actions ----------------------------------------------------------------------------

// What "Why?" compares a result with: the text, the similar-cases image or the kept upload.
function explainQuery(query) {
  if (query.kind === "text") return {text: query.text.slice(0, 2000)};
  if (query.kind === "similar") return {query_id: query.imageId};
  return query.uploadId ? {upload_id: query.uploadId} : null;
}

function resultItems() {
  return state.results.map((result) => ({
    id: result.id,
    title: caseOf(result).title,
    pixels: `v1/images/${result.id}/pixels`,
    image: result.image_url,
    thumbnail: result.thumbnail_url,
  }));
}

function view(index, {heat = false, region = false} = {}) {
  const query = current.query;
  openViewer({
    items: resultItems(),
    index,
    heat,
    region,
    explain: (item) => {
      const compared = explainQuery(query);
      return compared && item.id ? {image_id: item.id, ...compared} : null;
    },
    onRegion: (item, box) => run({kind: "similar", imageId: item.id, box, title: item.title}),
  });
}

export function viewUpload() {
  const query = current.query;
  const local = query.file && /^image\/(png|jpeg)$/.test(query.file.type)
    ? URL.createObjectURL(query.file) : null;
  openViewer({
    items: [{id: null, title: query.name, image: local, thumbnail: local,
             pixels: query.uploadId ? `v1/uploads/${query.uploadId}/pixels` : null}],
    index: 0,
    region: true,
    explain: () => null,
    onRegion: (_item, box) => run({...query, box}),
  });
}

const actions = {
  report: (result, index) => openReport(result, () => view(index)),
  view: (index, options) => view(index, options),
  similar: (result) => run({kind: "similar", imageId: result.id, box: null,
                            title: caseOf(result).title}),
  caption: (result) => {
    $("#query").value = result.report;
    run({kind: "text", text: result.report});
  },
  mark,
  canExplain: () => Boolean(current && explainQuery(current.query)),
};

function mark(node, id, which) {
  const {feedback} = state;
  const other = which === "liked" ? "disliked" : "liked";
  const on = !feedback[which].has(id);
  feedback[other].delete(id);
  if (on) feedback[which].add(id);
  else feedback[which].delete(id);
  showMarks(node, id);
  showRefineButtons();
}

function showMarks(node, id) {
  const {liked, disliked} = state.feedback;
  node.classList.toggle("liked", liked.has(id));
  node.classList.toggle("disliked", disliked.has(id));
  node.querySelector(".like").setAttribute("aria-pressed", String(liked.has(id)));
  node.querySelector(".dislike").setAttribute("aria-pressed", String(disliked.has(id)));
}

function sameAs(set, list) {
  return set.size === list.length && list.every((id) => set.has(id));
}

function showRefineButtons() {
  const {liked, disliked} = state.feedback;
  const refinement = current.refinement;
  const unchanged = refinement
    ? sameAs(liked, refinement.liked) && sameAs(disliked, refinement.disliked)
    : liked.size === 0 && disliked.size === 0;
  const usable = liked.size > 0 || (disliked.size > 0 && hasQueryVector(current.query));
  const button = $("#refine-button");
  button.hidden = unchanged || !usable;
  button.textContent = `Refine (${liked.size} liked, ${disliked.size} not)`;
  $("#unrefine-button").hidden = !refinement;
}

// -- the results -----------------------------------------------------------------------------------

function queryThumbnail(query) {
  if (query.kind === "similar") return `v1/images/${query.imageId}/thumbnail`;
  if (query.kind === "upload" && query.file && /^image\/(png|jpeg)$/.test(query.file.type)) {
    return (query.thumb = query.thumb || URL.createObjectURL(query.file));
  }
  return null;
}

function render(shown) {
  current = shown;
  state.query = shown.query;
  state.refinement = shown.refinement;
  state.results = shown.results;
  state.scale = shown.scale;
  state.feedback = {
    liked: new Set(shown.refinement ? shown.refinement.liked : []),
    disliked: new Set(shown.refinement ? shown.refinement.disliked : []),
  };
  $("#results").hidden = false;
  const title = $("#results-title");
  title.textContent = "";
  const thumb = queryThumbnail(shown.query);
  if (thumb) {
    const img = document.createElement("img");
    img.className = "query-thumb";
    img.alt = "";
    showImage(img, thumb);
    title.appendChild(img);
  }
  title.appendChild(document.createTextNode(shown.title));
  $("#results-meta").textContent = shown.meta;
  $("#back-button").hidden = viewStack.length === 0;
  $("#grid").replaceChildren(...shown.results.map((result, index) => {
    const node = card(result, index, actions);
    showMarks(node, result.id);
    return node;
  }));
  showRefineButtons();
  const query = shown.query;
  $("#query-region").hidden = !(query.kind === "upload" && (query.uploadId || queryThumbnail(query)));
  showScale(shown.scale);
  if (shown.results.length === 0) say("No matching images: loosen the filters or the threshold.");
  suggestFor(query);
}

// What the reports of similar cases said: for an image query, a side panel of report sentences
// (of the whole image; an upload by its upload_id, so a link to it shows the panel too).
async function suggestFor(query) {
  const panel = $("#suggest-panel");
  panel.hidden = true;
  if (query.kind === "text" || query.box) return;
  const form = new FormData();
  if (query.kind === "similar") form.append("image_id", query.imageId);
  else if (query.uploadId) form.append("upload_id", query.uploadId);
  else if (query.file) form.append("file", query.file, query.file.name);
  else return;
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

export function setUpResults() {
  $("#back-button").addEventListener("click", back);
  $("#refine-button").addEventListener("click", refine);
  $("#unrefine-button").addEventListener("click", unrefine);
  $("#query-region").addEventListener("click", viewUpload);
}
