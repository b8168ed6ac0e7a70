// The drop zone: an image file (PNG, JPEG or DICOM) dropped or chosen becomes the query. The
// service keeps it under an upload_id, which later searches (a region, Refine, "Why?", a copied
// link) send instead of the file.

import {run} from "./search.js";
import {$} from "./ui.js";

function searchUpload(file) {
  if (file) run({kind: "upload", file, name: file.name, uploadId: null, box: null});
  $("#file-input").value = "";
}

export function setUpDropZone() {
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
