// Small DOM helpers every module uses: find an element, say something in the status line, mark
// the page busy (tests and screen readers wait on aria-busy).

export const $ = (selector) => document.querySelector(selector);

export function say(text, isError = false) {
  const message = $("#message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

export function busy(on) {
  $("#search-button").disabled = on;
  document.body.setAttribute("aria-busy", on ? "true" : "false");
}

// An element with text, for building rows of plain text (untrusted text only ever as textContent).
export function element(tag, text = "", className = "") {
  const node = document.createElement(tag);
  if (text) node.textContent = text;
  if (className) node.className = className;
  return node;
}
