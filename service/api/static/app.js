// The search page: a report sentence, an image or a region in, one card per case out; filters,
// keywords and a score threshold steer it, Like/Not refine it, the report panel and the viewer
// show a case in full. The page state lives in the URL, so a search can be shared and reloaded.
// Plain ES modules in js/, no build step; untrusted text (reports) is only ever set as textContent.
// (Labels are words and simple symbols, not emoji: many Linux browsers have no emoji font.)
//
//   js/ui.js      DOM helpers: $, the status line, busy
//   js/api.js     requests with the API key, the sign-in dialog, images fetched with the key
//   js/state.js   the query, refinement and controls, and the URL they are written to
//   js/search.js  running a search (or its refine), the cards grid, Back, Refine
//   js/cards.js   a result as a case card
//   js/panel.js   the report side panel
//   js/viewer.js  the full-size viewer: zoom, pan, window/level, heat-map, region
//   js/facets.js  the filter menus and the threshold's scale
//   js/upload.js  the drop zone

import {api, showAccess, signOut} from "./js/api.js";
import {loadFacets, loadScales} from "./js/facets.js";
import {closeReport} from "./js/panel.js";
import {rerun, run, setUpResults} from "./js/search.js";
import {readUrl} from "./js/state.js";
import {$} from "./js/ui.js";
import {setUpDropZone} from "./js/upload.js";
import {setUpViewer} from "./js/viewer.js";

async function showIndexStatus() {
  const line = $("#index-status");
  try {
    const ready = await api("readyz");
    line.textContent = `${ready.images} images · index ${ready.index_version}`;
    line.title = `model ${ready.model_fingerprint}`;
  } catch (err) {
    line.textContent = `not ready: ${err.message}`;
  }
}

async function start() {
  $("#text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run({kind: "text", text: $("#query").value});
  });
  $("#sign-out").addEventListener("click", signOut);
  $("#controls").addEventListener("change", rerun);
  $("#report-close").addEventListener("click", closeReport);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("#viewer").open) closeReport();
  });
  setUpResults();
  setUpDropZone();
  setUpViewer();
  showIndexStatus();
  showAccess();
  await Promise.all([loadFacets(), loadScales()]);
  const {query, refinement} = readUrl();
  if (query) await run(query, {refinement});
  document.body.dataset.ready = "true";
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
