// The report side panel, one click from a card: the whole report as the index split it into
// sentences (GET /v1/images/{id}/report), the sentence that matched the query highlighted, the
// sentences that deny a finding tagged "denied"; and the image's licence and source, since
// attribution belongs where the case is read in full.

import {api, openImage} from "./api.js";
import {caseOf, factsOf, matchWords} from "./cards.js";
import {$, element} from "./ui.js";

const PMC_ARTICLE = /^PMC\d+$/;
const TAGS = {absent: "denied", uncertain: "uncertain", historical: "prior"};

export function closeReport() {
  const panel = $("#report-panel");
  panel.hidden = true;
  delete panel.dataset.id;
  document.body.classList.remove("reading");
}

export async function openReport(result, onView) {
  const panel = $("#report-panel");
  const summary = caseOf(result);
  panel.dataset.id = result.id;
  delete panel.dataset.loaded;
  $("#report-title").textContent = summary.title;
  $("#report-facts").textContent = factsOf(summary);
  const label = matchWords(result.match);
  $("#report-match").textContent = `${label ? `${label}, ` : ""}score ${result.score.toFixed(3)}`;
  attribute(summary, (result.metadata && result.metadata.fields) || {});
  const file = $("#report-file");
  file.href = result.image_url;
  file.onclick = (event) => openImage(event, result.image_url);
  $("#report-view").onclick = onView;
  $("#report-text").textContent = "Loading the report…";
  panel.hidden = false;
  document.body.classList.add("reading");  // the cards reflow beside the panel
  let body = null;
  try {
    body = await api(`v1/images/${result.id}/report`);
  } catch (err) {
    body = null;  // an older service: the report text the result carries, split here
  }
  if (panel.dataset.id !== result.id) return;  // another card's report was opened meanwhile
  showReport(body, result);
  panel.dataset.loaded = "true";
}

// Sentences with offsets, for a service without the report route: the same breaks a reader sees.
function splitSentences(report) {
  return [...report.matchAll(/[^.!?\n]+[.!?]*/g)]
    .filter((found) => found[0].trim())
    .map((found) => ({text: found[0], start: found.index, end: found.index + found[0].length,
                      findings: []}));
}

function matchedSentence(sentences, evidence) {
  if (!evidence) return null;
  const wanted = evidence.trim().toLowerCase();
  const said = (sentence) => sentence.text.trim().toLowerCase();
  return sentences.find((s) => said(s) === wanted)
    || sentences.find((s) => said(s).includes(wanted) || wanted.includes(said(s)))
    || null;
}

function showReport(body, result) {
  const box = $("#report-text");
  const report = body ? body.report : result.report;
  if (!report) {
    box.textContent = "No report was indexed with this image.";
    return;
  }
  const sentences = (body && body.sentences.length ? body.sentences : splitSentences(report))
    .slice().sort((a, b) => a.start - b.start);
  const matched = matchedSentence(sentences, result.evidence && result.evidence.sentence);
  box.replaceChildren();
  let at = 0;
  for (const sentence of sentences) {
    if (sentence.start < at) continue;
    if (sentence.start > at) box.append(report.slice(at, sentence.start));
    const span = element(sentence === matched ? "mark" : "span", report.slice(sentence.start, sentence.end));
    span.classList.add("sentence");
    if (sentence === matched) span.classList.add("matched");
    for (const [status, tag] of Object.entries(TAGS)) {
      const named = sentence.findings.filter((f) => f.status === status).map((f) => f.finding);
      if (!named.length) continue;
      span.classList.add(tag);
      const marker = element("span", `${tag}: ${[...new Set(named)].join(", ")}`, `tag ${tag}`);
      span.append(" ", marker);
    }
    box.append(span);
    at = sentence.end;
  }
  if (at < report.length) box.append(report.slice(at));
  const highlighted = box.querySelector("mark.matched");
  if (highlighted) highlighted.scrollIntoView({block: "center"});
}

function attribute(summary, fields) {
  const line = $("#report-attribution");
  const licence = line.querySelector(".licence");
  const name = line.querySelector(".source-name");
  const source = line.querySelector(".source");
  licence.textContent = summary.licence ? `Licence: ${summary.licence}` : "";
  name.textContent = summary.source ? `Source: ${summary.source}` : "";
  licence.hidden = !summary.licence;
  name.hidden = !summary.source;
  const article = fields.pmc_article;
  source.hidden = !(article && PMC_ARTICLE.test(article));
  if (!source.hidden) {
    source.href = `https://www.ncbi.nlm.nih.gov/pmc/articles/${article}/`;
    source.textContent = `source article: ${article}`;
  }
  line.hidden = !summary.licence && !summary.source && source.hidden;
}
