// Every API request goes through here. A 401 asks for an API key, keeps it in sessionStorage (gone
// with the tab; never localStorage, never the URL) and sends it again as X-API-Key. Images and
// viewer pixels are fetched with the key too, so it never travels in a URL.

import {$, say} from "./ui.js";

const KEY_ITEM = "convirt-api-key";
let keyPrompt = null;  // one dialog however many requests are refused at once

// An API error with the service's code (unknown_upload, explain_busy, ...) and HTTP status.
export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function withKey(options = {}) {
  const key = apiKey();
  return key ? {...options, headers: {...(options.headers || {}), "X-API-Key": key}} : options;
}

// fetch with the key, asking for one on a 401; answers the Response of any other status.
async function send(path, options) {
  for (;;) {
    const sent = apiKey();
    const response = await fetch(path, withKey(options));
    if (response.status !== 401) return response;
    let message = "";
    try {
      message = (await response.json()).error.message;
    } catch (err) {
      message = "";
    }
    if (apiKey() === sent) {  // not already replaced while this request was out
      sessionStorage.removeItem(KEY_ITEM);
      await askForKey(sent ? message : "");
    }
  }
}

async function failure(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch (err) {
    error = null;
  }
  return new ApiError(error ? error.message : `HTTP ${response.status}`, response.status,
                      error ? error.code : null);
}

export async function api(path, options = {}) {
  const response = await send(path, options);
  if (!response.ok) throw await failure(response);
  return response.json();
}

export function postJson(path, body) {
  return api(path, {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body),
  });
}

// Binary answers (viewer pixels): the bytes and the headers that describe them.
export async function binary(path) {
  const response = await send(path, {});
  if (!response.ok) throw await failure(response);
  return {bytes: await response.arrayBuffer(), headers: response.headers};
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
// a blob: URL. Without one (open, or behind the sign-in proxy, whose cookie every request carries)
// src is the URL.
export function showImage(img, url) {
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

export function openImage(event, url) {
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

export async function showAccess() {
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

export function signOut() {
  sessionStorage.removeItem(KEY_ITEM);
  location.replace(location.pathname);  // nothing of the last search stays on screen
}
