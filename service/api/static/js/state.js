// What is shown, in one place: the query, the refinement (Like/Not ids and weights, kept through
// every later control change) and the controls. All of it is written into the URL, so a copied
// link reopens the same results, refinement and upload included (an upload by its upload_id, which
// the service keeps for a while for the one who sent it).

import {$} from "./ui.js";

export const state = {
  // {kind: "text", text} | {kind: "similar", imageId, box, title}
  // | {kind: "upload", uploadId, name, box, file}: file only until the service kept it
  query: null,
  refinement: null,  // {liked: [id], disliked: [id], weights: {query, liked, disliked} | null}
  feedback: {liked: new Set(), disliked: new Set()},  // the marks on the cards, what Refine sends
  results: [],
  scale: null,  // the last response's score scale
};

export function requestedK() {
  const k = parseInt($("#k").value, 10);
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), 100) : 12;
}

function words(text) {
  return text.split(",").map((word) => word.trim()).filter(Boolean);
}

// The controls as the API takes them (k, group_by, min_score, must, must_not, filters).
export function controls() {
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
export function appendControls(target, chosen) {
  target.append("k", String(chosen.k));
  target.append("group_by", chosen.group_by);
  if (chosen.min_score !== undefined) target.append("min_score", String(chosen.min_score));
  if (Object.keys(chosen.filters).length) target.append("filters", JSON.stringify(chosen.filters));
  for (const word of chosen.must || []) target.append("must", word);
  for (const word of chosen.must_not || []) target.append("must_not", word);
}

const ID = /^\d+$/;
const ids = (text) => (text || "").split(",").filter((id) => ID.test(id));
const WEIGHTS = ["query", "liked", "disliked"];

export function writeUrl() {
  const query = state.query;
  const params = new URLSearchParams();
  if (query.kind === "text") {
    params.set("q", query.text);
    if ($("#mode").value !== "hybrid") params.set("mode", $("#mode").value);
  } else if (query.kind === "similar") {
    params.set("similar", query.imageId);
  } else if (query.uploadId) {
    params.set("upload", query.uploadId);
    params.set("name", query.name);
  } else {
    return;  // an upload the service did not keep cannot be put in a link
  }
  if (query.box) params.set("box", query.box.join(","));
  const chosen = controls();
  params.set("k", String(chosen.k));
  params.set("group", chosen.group_by);
  if (chosen.min_score !== undefined) params.set("min", String(chosen.min_score));
  if (chosen.must) params.set("must", chosen.must.join(", "));
  if (chosen.must_not) params.set("not", chosen.must_not.join(", "));
  if (Object.keys(chosen.filters).length) params.set("f", JSON.stringify(chosen.filters));
  const refinement = state.refinement;
  if (refinement) {
    if (refinement.liked.length) params.set("liked", refinement.liked.join(","));
    if (refinement.disliked.length) params.set("disliked", refinement.disliked.join(","));
    if (refinement.weights) params.set("w", WEIGHTS.map((w) => refinement.weights[w]).join(","));
  }
  history.replaceState(null, "", `${location.pathname}?${params}`);
}

// The query and refinement a URL names (null: none), its controls set on the page.
export function readUrl() {
  const params = new URLSearchParams(location.search);
  setControls(params);
  const box = params.has("box") ? params.get("box").split(",").map(Number) : null;
  let query = null;
  if (params.has("q")) {
    $("#query").value = params.get("q");
    query = {kind: "text", text: params.get("q")};
  } else if (params.has("similar") && ID.test(params.get("similar"))) {
    query = {kind: "similar", imageId: params.get("similar"), box, title: null};
  } else if (params.has("upload")) {
    query = {kind: "upload", uploadId: params.get("upload"), name: params.get("name") || "an upload",
             box, file: null};
  }
  const liked = ids(params.get("liked"));
  const disliked = ids(params.get("disliked"));
  let weights = null;
  const given = (params.get("w") || "").split(",").map(Number);
  if (given.length === 3 && given.every(Number.isFinite)) {
    weights = Object.fromEntries(WEIGHTS.map((w, n) => [w, given[n]]));
  }
  const refinement = liked.length || disliked.length ? {liked, disliked, weights} : null;
  return {query, refinement};
}
