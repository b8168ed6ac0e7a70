// The filter menus, read from GET /v1/facets as the service serves them (it hides identifiers and
// internal fields), and the threshold's scale: what scores of this kind of query usually are, and
// where the calibrated labels start (the search response's `scale`, before a search GET /v1/scores).

import {api} from "./api.js";
import {$} from "./ui.js";

const MAX_CHOICES = 40;  // fields with more distinct values (diagnoses, ids) make poor menus

export async function loadFacets() {
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
  select.add(new Option("any", ""));  // no count: it must not read like a filter that is on
  for (const {value, count} of facet.values) select.add(new Option(`${value} (${count})`, value));
  label.appendChild(select);
  return label;
}

// -- the threshold's scale -------------------------------------------------------------------------

const fixed = (value) => (typeof value === "number" ? value.toFixed(2) : "?");

function kindWords(kind) {
  return String(kind).replaceAll("_", " ");
}

function describeScale(scale) {
  return `${kindWords(scale.kind)} scores usually run ${fixed(scale.low)}–${fixed(scale.high)}; `
    + `strong match ≥ ${fixed(scale.strong)}, possible ≥ ${fixed(scale.possible)}`;
}

let served = [];  // GET /v1/scores: every kind's scale, for the hint before a search

export async function loadScales() {
  try {
    const response = await api("v1/scores");
    const found = Array.isArray(response) ? response
      : response.scales || response.kinds || [];
    served = Array.isArray(found)
      ? found
      : Object.entries(found).map(([kind, scale]) => ({kind, ...scale}));
  } catch (err) {
    served = [];  // an older service: the hint waits for the first search
  }
  showScale(null);
}

export function showScale(scale) {
  const hint = $("#min-score-scale");
  const input = $("#min-score");
  const usable = (s) => s && typeof s.strong === "number" && typeof s.possible === "number";
  if (usable(scale)) {
    hint.textContent = describeScale(scale);
    input.placeholder = `e.g. ${fixed(scale.possible)}`;
  } else {
    const kinds = served.filter(usable);
    hint.textContent = kinds.map((s) => `${kindWords(s.kind)}: ${fixed(s.low)}–${fixed(s.high)}`)
      .join(" · ");
    input.placeholder = "none";
  }
  input.title = hint.textContent
    ? `cosine similarity (−1 to 1): ${hint.textContent}` : "cosine similarity, −1 to 1";
}
