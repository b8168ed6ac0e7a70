// The viewer: one image at full size (GET /v1/images/{id}/pixels or /v1/uploads/{id}/pixels:
// little-endian uint16 grayscale with its size and window in headers) on a plain canvas, with zoom
// (wheel, +/-), pan (drag), window/level (right- or Ctrl-drag, the inputs, Reset to the image's own
// window), the "Why?" heat-map and a drawn region at full resolution with a scale bar in the
// original's pixels, and ←/→ through the results. Boxes and heat-map crops are fractions of the
// image, so they map onto any size the service sends. The window is shown and typed in what the
// values stand for (X-Rescale-Slope/Intercept: Hounsfield units for CT, labelled by X-Value-Unit),
// and kept in samples.

import {api, binary, withKey} from "./api.js";
import {$} from "./ui.js";

const ZOOM_STEP = 1.25;
const MIN_BOX = 0.02;  // the service refuses smaller regions
const WINDOW_SPEED = 1 / 400;  // of the value range per dragged pixel

let session = null;  // {items, index, explain(item) -> params | null, onRegion(item, box), wantHeat}
// {width, height, originalWidth, originalHeight, values, min, max, window, own, bitmap, note,
//  slope, intercept, unit}: values, min, max and the windows are in samples (what the bytes hold);
//  what a sample stands for (HU for CT) is intercept + slope * sample, and that is what is shown
let picture = null;
let view = {scale: 1, x: 0, y: 0};  // screen (CSS px in the stage) = image px * scale + (x, y)
let heat = null;  // the explain response drawn over the image
let box = null;  // the drawn region, fractions [left, top, right, bottom]
let regionMode = false;
let drag = null;
let loading = 0;  // the latest load: an older one that finishes late is dropped
let repaint = 0;

const dialog = () => $("#viewer");
const stage = () => $("#viewer-stage");

function status(text) {
  $("#viewer-status").textContent = text;
}

export function openViewer({items, index, heat: withHeat = false, region = false, explain, onRegion}) {
  session = {items, index, explain, onRegion, wantHeat: withHeat};
  setRegionMode(region);
  if (!dialog().open) dialog().showModal();
  show(index);
}

async function show(index) {
  session.index = index;
  const item = session.items[index];
  const token = ++loading;
  heat = null;
  box = null;
  picture = null;
  const node = dialog();
  node.dataset.heat = "none";
  delete node.dataset.loaded;
  $("#viewer-title").textContent = item.title;
  const many = session.items.length > 1;
  $("#viewer-position").textContent = many ? `${index + 1} of ${session.items.length}` : "";
  $("#viewer-prev").disabled = index === 0;
  $("#viewer-next").disabled = index === session.items.length - 1;
  $("#viewer-prev").hidden = $("#viewer-next").hidden = !many;
  $("#viewer-why").hidden = !session.explain(item);
  $("#viewer-why").setAttribute("aria-pressed", String(session.wantHeat));
  $("#viewer-region-search").disabled = true;
  status("Loading the image…");
  let loaded;
  try {
    loaded = await loadPicture(item);
  } catch (err) {
    if (token === loading) status(`image unavailable: ${err.message}`);
    return;
  }
  if (token !== loading) return;
  picture = loaded;
  paintBitmap();
  fit();
  showWindow();
  node.dataset.loaded = "true";
  describe();
  if (session.wantHeat && session.explain(item)) await explain();
}

// -- pixels ----------------------------------------------------------------------------------------

async function loadPicture(item) {
  if (item.pixels) {
    try {
      return fromPixels(await binary(item.pixels));
    } catch (err) {
      if (!item.image && !item.thumbnail) throw err;  // else: what the browser can decode
    }
  }
  try {
    return await fromImage(item.image, "8-bit copy decoded by the browser");
  } catch (err) {
    return fromImage(item.thumbnail, "thumbnail only: the full image could not be shown");
  }
}

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function fromPixels({bytes, headers}) {
  const number = (name) => Number(headers.get(name));
  const width = number("X-Width");
  const height = number("X-Height");
  let values;
  if (LITTLE_ENDIAN) {
    values = new Uint16Array(bytes);
  } else {
    const data = new DataView(bytes);
    values = new Uint16Array(bytes.byteLength / 2).map((_, n) => data.getUint16(2 * n, true));
  }
  if (!(width > 0 && height > 0) || values.length < width * height) {
    throw new Error("the pixel data does not match its size");
  }
  let min = number("X-Value-Min");
  let max = number("X-Value-Max");
  if (!Number.isFinite(min) || !Number.isFinite(max)) [min, max] = range(values);
  const center = number("X-Window-Center");
  const span = number("X-Window-Width");
  const own = Number.isFinite(center) && span > 0
    ? {center, width: span} : {center: (min + max) / 2, width: Math.max(max - min, 1)};
  const slope = number("X-Rescale-Slope");
  const intercept = number("X-Rescale-Intercept");
  const rescaled = Number.isFinite(slope) && slope !== 0 && Number.isFinite(intercept);
  return {
    width, height, values, min, max, own, window: {...own},
    originalWidth: number("X-Original-Width") || width,
    originalHeight: number("X-Original-Height") || height,
    slope: rescaled ? slope : 1,
    intercept: rescaled ? intercept : 0,
    unit: headers.get("X-Value-Unit") || "",
    note: headers.get("X-Colour-Made-Grey") === "1" ? "colour shown as grey" : "",
  };
}

function range(values) {
  let min = Infinity;
  let max = -Infinity;
  for (const v of values) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  return [min, max];
}

async function fromImage(url, note) {
  if (!url) throw new Error("no image");
  const response = await fetch(url, /^blob:/.test(url) ? {} : withKey());
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  const bitmap = await createImageBitmap(await response.blob());
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const values = new Uint16Array(bitmap.width * bitmap.height);
  for (let n = 0; n < values.length; n++) {
    values[n] = Math.round(0.299 * rgba[4 * n] + 0.587 * rgba[4 * n + 1] + 0.114 * rgba[4 * n + 2]);
  }
  const own = {center: 127.5, width: 256};
  return {width: bitmap.width, height: bitmap.height, values, min: 0, max: 255, own,
          window: {...own}, originalWidth: bitmap.width, originalHeight: bitmap.height,
          slope: 1, intercept: 0, unit: "", note};
}

// The window as a lookup table, then the image through it (DICOM's linear VOI function).
function paintBitmap() {
  const {width, height, values, window: shown} = picture;
  const lower = shown.center - shown.width / 2;
  const table = new Uint32Array(65536);
  for (let v = 0; v < 65536; v++) {
    const gray = Math.round(Math.min(Math.max((v - lower) / shown.width, 0), 1) * 255);
    table[v] = LITTLE_ENDIAN ? (0xff000000 | (gray << 16) | (gray << 8) | gray) >>> 0
      : ((gray << 24) | (gray << 16) | (gray << 8) | 0xff) >>> 0;
  }
  const image = new ImageData(width, height);
  const pixels = new Uint32Array(image.data.buffer);
  for (let n = 0; n < width * height; n++) pixels[n] = table[values[n]];
  const bitmap = picture.bitmap || document.createElement("canvas");
  bitmap.width = width;
  bitmap.height = height;
  bitmap.getContext("2d").putImageData(image, 0, 0);
  picture.bitmap = bitmap;
}

function setWindow(center, width) {
  picture.window = {center, width: Math.max(width, 1)};
  showWindow();
  if (!repaint) {
    repaint = requestAnimationFrame(() => {
      repaint = 0;
      if (!picture) return;
      paintBitmap();
      draw();
      describe();
    });
  }
}

// -- units: the window is kept in samples and shown (and typed) in what they stand for ------------

// What a sample stands for (HU for CT); MONOCHROME1's slope is negative (white is low).
const realOf = (sample) => picture.intercept + picture.slope * sample;
const sampleOf = (real) => (real - picture.intercept) / picture.slope;
const rounded = (value) => Math.round(value * 100) / 100;

// The window in real units: its centre, and its width (a length, so never negative).
function realWindow({center, width}) {
  return {center: realOf(center), width: Math.abs(picture.slope) * width};
}

function withUnit(value) {
  return picture.unit ? `${value} ${picture.unit}` : String(value);
}

function showWindow() {
  const shown = realWindow(picture.window);
  $("#wl-center").value = String(rounded(shown.center));
  $("#wl-width").value = String(rounded(shown.width));
  $("#wl-unit").textContent = picture.unit;
}

// -- drawing ---------------------------------------------------------------------------------------

function fit() {
  const {clientWidth, clientHeight} = stage();
  view.scale = Math.min(clientWidth / picture.width, clientHeight / picture.height);
  view.x = (clientWidth - picture.width * view.scale) / 2;
  view.y = (clientHeight - picture.height * view.scale) / 2;
  draw();
}

function zoomAt(sx, sy, factor) {
  if (!picture) return;
  const scale = Math.min(Math.max(view.scale * factor, 0.02), 64);
  view.x = sx - ((sx - view.x) * scale) / view.scale;
  view.y = sy - ((sy - view.y) * scale) / view.scale;
  view.scale = scale;
  draw();
  describe();
}

function zoomCentre(factor) {
  zoomAt(stage().clientWidth / 2, stage().clientHeight / 2, factor);
}

function sized(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const {clientWidth, clientHeight} = stage();
  canvas.width = Math.round(clientWidth * ratio);
  canvas.height = Math.round(clientHeight * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return context;
}

function draw() {
  if (!picture) return;
  const context = sized($("#viewer-image"));
  context.fillStyle = "#000";
  context.fillRect(0, 0, stage().clientWidth, stage().clientHeight);
  context.imageSmoothingEnabled = view.scale < 1;
  const shownW = picture.width * view.scale;
  const shownH = picture.height * view.scale;
  context.drawImage(picture.bitmap, view.x, view.y, shownW, shownH);
  stage().dataset.rect = [view.x, view.y, shownW, shownH].map((v) => v.toFixed(1)).join(",");
  drawOverlay();
}

function drawOverlay() {
  const context = sized($("#viewer-overlay"));
  if (!picture) return;
  const shownW = picture.width * view.scale;
  const shownH = picture.height * view.scale;
  if (heat) drawHeat(context, shownW, shownH);
  if (box) {
    const [left, top, right, bottom] = box;
    context.strokeStyle = "#ffb000";
    context.lineWidth = 2;
    context.fillStyle = "rgba(255, 176, 0, 0.15)";
    const rect = [view.x + left * shownW, view.y + top * shownH,
                  (right - left) * shownW, (bottom - top) * shownH];
    context.fillRect(...rect);
    context.strokeRect(...rect);
  }
  drawScaleBar(context);
}

function drawHeat(context, shownW, shownH) {
  const {grid, crop} = heat;
  const rows = grid.length;
  const cols = grid[0].length;
  const x0 = view.x + crop.left * shownW;
  const y0 = view.y + crop.top * shownH;
  const cellW = (crop.width * shownW) / cols;
  const cellH = (crop.height * shownH) / rows;
  const peak = Math.max(...grid.flat(), 1e-9);
  grid.forEach((row, r) => row.forEach((value, c) => {
    const strength = Math.max(0, value) / peak;
    context.fillStyle = `rgba(255, 40, 0, ${(0.6 * strength).toFixed(3)})`;
    context.fillRect(x0 + c * cellW, y0 + r * cellH, cellW + 0.5, cellH + 0.5);
  }));
  context.strokeStyle = "rgba(255, 255, 255, 0.5)";
  context.setLineDash([4, 4]);
  context.strokeRect(x0, y0, crop.width * shownW, crop.height * shownH);  // what the encoder sees
  context.setLineDash([]);
  // the colour scale: how much hiding a cell lowers the similarity
  const right = stage().clientWidth - 16;
  const bottom = stage().clientHeight - 16;
  const gradient = context.createLinearGradient(right - 160, 0, right, 0);
  gradient.addColorStop(0, "rgba(255, 40, 0, 0)");
  gradient.addColorStop(1, "rgba(255, 40, 0, 0.6)");
  context.fillStyle = "rgba(0, 0, 0, 0.6)";
  context.fillRect(right - 168, bottom - 40, 176, 48);
  context.fillStyle = gradient;
  context.fillRect(right - 160, bottom - 14, 160, 10);
  context.fillStyle = "#fff";
  context.font = "12px system-ui, sans-serif";
  context.fillText("similarity lost when hidden", right - 160, bottom - 26);
  context.fillText("0", right - 160, bottom + 6);
  const label = `${peak.toFixed(3)}`;
  context.fillText(label, right - context.measureText(label).width, bottom + 6);
}

// A bar of a round number of the original image's pixels (the service may send it smaller).
function drawScaleBar(context) {
  const perOriginal = view.scale * (picture.width / picture.originalWidth);
  let length = 1;
  for (const step of [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]) {
    length = step;
    if (step * perOriginal >= 60) break;
  }
  const x = 16;
  const y = stage().clientHeight - 16;
  const span = length * perOriginal;
  context.fillStyle = "rgba(0, 0, 0, 0.6)";
  context.fillRect(x - 6, y - 22, span + 12, 30);
  context.strokeStyle = "#fff";
  context.lineWidth = 2;
  context.beginPath();
  context.moveTo(x, y - 6);
  context.lineTo(x, y);
  context.lineTo(x + span, y);
  context.lineTo(x + span, y - 6);
  context.stroke();
  context.fillStyle = "#fff";
  context.font = "12px system-ui, sans-serif";
  context.fillText(`${length} px of the original`, x, y - 9);
}

function describe(under = "") {
  if (!picture) return;
  const p = picture;
  const zoom = Math.round(view.scale * (p.width / p.originalWidth) * 100);
  const size = p.width === p.originalWidth ? `${p.width} × ${p.height}`
    : `${p.width} × ${p.height} shown of ${p.originalWidth} × ${p.originalHeight}`;
  const shown = realWindow(p.window);
  const parts = [size, `zoom ${zoom}% of the original`,
                 `window ${withUnit(rounded(shown.center))} / ${withUnit(rounded(shown.width))}`];
  if (p.note) parts.push(p.note);
  if (under) parts.push(under);
  status(parts.join(" · "));
}

// -- "Why?": the heat-map --------------------------------------------------------------------------

async function explain() {
  const item = session.items[session.index];
  const params = session.explain(item);
  if (!params || !picture) return;
  status("Working out why it matched…");
  let found;
  try {
    found = await api(`v1/explain?${new URLSearchParams(params)}`);
  } catch (err) {
    status(`no heat-map: ${err.message}`);
    return;
  }
  if (session.items[session.index] !== item || !session.wantHeat) return;
  heat = found;
  drawOverlay();
  dialog().dataset.heat = "drawn";
  describe("red: what the match rests on (hiding it lowers the score most)");
}

function toggleHeat() {
  session.wantHeat = !session.wantHeat;
  $("#viewer-why").setAttribute("aria-pressed", String(session.wantHeat));
  if (session.wantHeat) {
    explain();
  } else {
    heat = null;
    dialog().dataset.heat = "none";
    drawOverlay();
  }
}

// -- pointer, wheel and keys -----------------------------------------------------------------------

function setRegionMode(on) {
  regionMode = on;
  $("#viewer-region").setAttribute("aria-pressed", String(on));
  stage().classList.toggle("drawing", on);
}

function pointAt(event) {
  const rect = stage().getBoundingClientRect();
  return [event.clientX - rect.left, event.clientY - rect.top];
}

function fractionAt(event) {
  const [sx, sy] = pointAt(event);
  const clamp = (v) => Math.min(Math.max(v, 0), 1);
  return [clamp((sx - view.x) / view.scale / picture.width),
          clamp((sy - view.y) / view.scale / picture.height)];
}

function onPointerDown(event) {
  if (!picture) return;
  let mode = null;
  if (event.button === 2 || (event.button === 0 && event.ctrlKey)) mode = "window";
  else if (event.button === 0) mode = regionMode ? "box" : "pan";
  if (!mode) return;
  event.preventDefault();
  drag = {mode, x: event.clientX, y: event.clientY, view: {...view}, window: {...picture.window},
          from: fractionAt(event)};
  stage().setPointerCapture(event.pointerId);
}

function onPointerMove(event) {
  if (!picture) return;
  if (!drag) {
    const [fx, fy] = fractionAt(event);
    const x = Math.min(Math.floor(fx * picture.width), picture.width - 1);
    const y = Math.min(Math.floor(fy * picture.height), picture.height - 1);
    describe(`value ${withUnit(rounded(realOf(picture.values[y * picture.width + x])))}`);
    return;
  }
  const dx = event.clientX - drag.x;
  const dy = event.clientY - drag.y;
  if (drag.mode === "pan") {
    view.x = drag.view.x + dx;
    view.y = drag.view.y + dy;
    draw();
  } else if (drag.mode === "window") {
    const spread = Math.max(picture.max - picture.min, 1) * WINDOW_SPEED;
    setWindow(drag.window.center + dy * spread, drag.window.width + dx * spread);
  } else {
    const [fx, fy] = fractionAt(event);
    const [x0, y0] = drag.from;
    box = [Math.min(x0, fx), Math.min(y0, fy), Math.max(x0, fx), Math.max(y0, fy)]
      .map((v) => Number(v.toFixed(4)));
    $("#viewer-region-search").disabled = box[2] - box[0] < MIN_BOX || box[3] - box[1] < MIN_BOX;
    drawOverlay();
  }
}

function onKey(event) {
  if (event.target instanceof HTMLInputElement) return;
  const actions = {
    ArrowLeft: () => step(-1),
    ArrowRight: () => step(1),
    "+": () => zoomCentre(ZOOM_STEP),
    "=": () => zoomCentre(ZOOM_STEP),
    "-": () => zoomCentre(1 / ZOOM_STEP),
    "0": () => picture && fit(),
  };
  const action = actions[event.key];
  if (!action) return;
  event.preventDefault();
  action();
}

function step(delta) {
  const index = session.index + delta;
  if (index >= 0 && index < session.items.length) show(index);
}

// The inputs are in real units (HU for CT): the window they mean, in samples.
function onWindowInput() {
  const center = Number($("#wl-center").value);
  const width = Number($("#wl-width").value);
  if (picture && Number.isFinite(center) && Number.isFinite(width) && width > 0) {
    setWindow(sampleOf(center), width / Math.abs(picture.slope));
  }
}

function searchRegion() {
  const item = session.items[session.index];
  const drawn = box;
  dialog().close();
  session.onRegion(item, drawn);
}

export function setUpViewer() {
  const node = dialog();
  const place = stage();
  place.addEventListener("pointerdown", onPointerDown);
  place.addEventListener("pointermove", onPointerMove);
  place.addEventListener("pointerup", () => (drag = null));
  place.addEventListener("pointercancel", () => (drag = null));
  place.addEventListener("contextmenu", (event) => event.preventDefault());
  place.addEventListener("wheel", (event) => {
    event.preventDefault();
    const [sx, sy] = pointAt(event);
    zoomAt(sx, sy, event.deltaY < 0 ? ZOOM_STEP : 1 / ZOOM_STEP);
  }, {passive: false});
  node.addEventListener("keydown", onKey);
  node.addEventListener("close", () => {
    loading++;  // a load still out is dropped
    picture = null;
    heat = null;
    drag = null;
  });
  $("#viewer-close").addEventListener("click", () => node.close());
  $("#viewer-prev").addEventListener("click", () => step(-1));
  $("#viewer-next").addEventListener("click", () => step(1));
  $("#viewer-zoom-in").addEventListener("click", () => zoomCentre(ZOOM_STEP));
  $("#viewer-zoom-out").addEventListener("click", () => zoomCentre(1 / ZOOM_STEP));
  $("#viewer-fit").addEventListener("click", () => picture && fit());
  $("#viewer-why").addEventListener("click", toggleHeat);
  $("#viewer-region").addEventListener("click", () => setRegionMode(!regionMode));
  $("#viewer-region-search").addEventListener("click", searchRegion);
  $("#wl-center").addEventListener("change", onWindowInput);
  $("#wl-width").addEventListener("change", onWindowInput);
  $("#wl-reset").addEventListener("click", () => picture && setWindow(picture.own.center, picture.own.width));
  window.addEventListener("resize", () => node.open && picture && draw());
}
