// A result as a clinician reads it: the case's diagnosis or impression first, age and sex, the
// exam, the date; the sentence of the report that decided the match, then the report's start; the
// score with its calibrated label. Paths, hashes, `split` and licences stay off the card (the
// report panel shows licence and source, where attribution belongs).

import {showImage} from "./api.js";
import {$} from "./ui.js";

const SEXES = {m: "male", male: "male", f: "female", female: "female"};
const MATCH_WORDS = {strong: "strong match", possible: "possible match", weak: "weak match"};

function firstSentence(text) {
  const sentence = (text || "").trim().split(/(?<=[.!?])\s+/)[0] || "";
  return sentence.length > 90 ? `${sentence.slice(0, 87)}…` : sentence;
}

// The case summary the service sends (`case`), completed from the metadata of an older service.
export function caseOf(result) {
  const given = result.case || {};
  const fields = (result.metadata && result.metadata.fields) || {};
  const pick = (...values) => values.find((value) => typeof value === "string" && value.trim()) || null;
  return {
    title: pick(given.title, fields.diagnosis, fields.impression, fields.finding,
                firstSentence(result.report)) || "Image without a report",
    age: pick(given.age, String(fields.age ?? "")),
    sex: pick(given.sex, fields.sex),
    exam: pick(given.exam, result.metadata && result.metadata.modality),
    date: pick(given.date),
    source: pick(given.source, fields.dataset),
    licence: pick(given.licence, fields.licence, fields.license),
  };
}

// "54 y, female · CT · Chest · 2019-03-02"
export function factsOf(summary) {
  const person = [];
  if (summary.age) person.push(/^\d+(\.\d+)?$/.test(summary.age) ? `${summary.age} y` : summary.age);
  if (summary.sex) person.push(SEXES[summary.sex.toLowerCase()] || summary.sex);
  return [person.join(", "), summary.exam, summary.date].filter(Boolean).join(" · ");
}

export function matchWords(match) {
  return MATCH_WORDS[match] || "";
}

function showScore(node, result) {
  node.querySelector(".score").textContent = result.score.toFixed(3);
  const label = node.querySelector(".match");
  if (result.match) {
    label.textContent = matchWords(result.match);
    label.className = `match match-${result.match}`;
    label.title = "how this score compares with the scores this index gives such queries";
    label.hidden = false;
  }
}

// Why a card ranked for a text query: the report sentence that agreed with it (highlighted), the
// query's words its report asserts, and the image's own similarity.
function showEvidence(node, result) {
  const evidence = result.evidence;
  if (!evidence) return;
  const line = node.querySelector(".evidence");
  if (evidence.sentence) {
    const said = document.createElement("mark");
    said.textContent = evidence.sentence;
    line.append(said, " ");
  } else if (!evidence.has_report) {
    line.append("No report: ranked by the image. ");
  }
  const parts = [];
  if (evidence.terms.length) parts.push(`says: ${evidence.terms.join(", ")}`);
  if (evidence.sentence) parts.push(`sentence ${evidence.sentence_score.toFixed(2)}`);
  parts.push(`image ${evidence.image.toFixed(2)}`);
  const detail = document.createElement("span");
  detail.className = "muted small";
  detail.textContent = parts.join(" · ");
  line.append(detail);
  line.hidden = false;
  node.querySelector(".score").title =
    "score: the image, its report's nearest sentence and the query's words, weighed together";
}

// The report's start, without the evidence sentence already shown above it when the report opens
// with it (a one-sentence caption then shows once, not twice).
function reportAfter(result) {
  const report = (result.report || "").trim();
  const sentence = result.evidence && result.evidence.sentence;
  return sentence && report.startsWith(sentence) ? report.slice(sentence.length).trim() : report;
}

export function card(result, index, actions) {
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = result.id;
  const summary = caseOf(result);
  const thumb = node.querySelector(".thumb");
  showImage(thumb, result.thumbnail_url);
  thumb.alt = summary.title;
  node.querySelector(".title").textContent = summary.title;
  node.querySelector(".facts").textContent = factsOf(summary);
  showScore(node, result);
  showEvidence(node, result);
  node.querySelector(".report").textContent = reportAfter(result);
  if (result.group && result.group.size > 1) {
    const more = node.querySelector(".more");
    more.hidden = false;
    more.textContent = `+${result.group.size - 1} more`;
    more.title = `${result.group.size} matching images of this ${result.group.by}`;
  }
  const viewer = node.querySelector(".viewer");
  if (result.viewer_url && /^https?:\/\//.test(result.viewer_url)) {
    viewer.href = result.viewer_url;
    viewer.hidden = false;
  }
  wire(node, result, index, actions);
  return node;
}

function wire(node, result, index, actions) {
  const on = (selector, action) => node.querySelector(selector).addEventListener("click", action);
  on(".thumb-wrap", () => actions.view(index));
  on(".open-report", () => actions.report(result, index));
  on(".view", () => actions.view(index));
  on(".similar", () => actions.similar(result));
  node.querySelector(".caption").hidden = !result.report;
  on(".caption", () => actions.caption(result));
  on(".region", () => actions.view(index, {region: true}));
  node.querySelector(".why").hidden = !actions.canExplain();
  on(".why", () => actions.view(index, {heat: true}));
  on(".like", () => actions.mark(node, result.id, "liked"));
  on(".dislike", () => actions.mark(node, result.id, "disliked"));
}
