// The web page of `python -m embedding serve`: plain JavaScript, no build step, nothing
// fetched from other hosts. Every call goes to this server's /v1 API (the API key, when
// given, as a bearer token); every error shows the server's JSON message.
"use strict";

const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function galleryPath() {
  return `/v1/galleries/${encodeURIComponent($("gallery-name").value.trim() || "default")}`;
}

async function call(method, path, form) {
  const response = await fetch(path, { method, headers: headers(), body: form });
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function show(id, text, failed = false) {
  const element = $(id);
  element.textContent = text;
  element.classList.toggle("error", failed);
}

async function checkReady() {
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    if (response.ok) {
      show("model-status", `Model ${body.model} (${body.dim} dimensions) is ready.`);
      refreshIdentities();
    } else {
      show("model-status", body.error.message, true);
      setTimeout(checkReady, 1000);
    }
  } catch (error) {
    show("model-status", "The service does not answer.", true);
    setTimeout(checkReady, 2000);
  }
}

async function verify(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("a", $("verify-a").files[0]);
  form.append("b", $("verify-b").files[0]);
  const faces = $("verify-faces").checked ? "?faces=true" : "";
  show("verify-result", "Comparing…");
  try {
    const result = await call("POST", `/v1/verify${faces}`, form);
    const verdict = result.same ? "Same person" : "Different people";
    const calibrated = result.threshold_source === "default" ? ", uncalibrated" : "";
    show(
      "verify-result",
      `${verdict}: similarity ${result.similarity.toFixed(4)} ` +
        `(threshold ${result.threshold}${calibrated}).`
    );
  } catch (error) {
    show("verify-result", error.message, true);
  }
}

async function enroll(event) {
  event.preventDefault();
  const name = $("enroll-name").value.trim();
  const form = new FormData();
  for (const file of $("enroll-photos").files) form.append("images", file);
  show("enroll-result", `Enrolling ${name}…`);
  try {
    const result = await call(
      "POST", `${galleryPath()}/identities/${encodeURIComponent(name)}`, form
    );
    const count = result.ids.length;
    show("enroll-result", `Enrolled ${name}: ${count} photo${count === 1 ? "" : "s"}.`);
    refreshIdentities();
  } catch (error) {
    show("enroll-result", error.message, true);
  }
}

const BOX_COLOUR = { MATCH: "#00c853", UNKNOWN: "#ff1744" };

async function drawFaces(file, faces) {
  const bitmap = await createImageBitmap(file);
  const canvas = $("identify-canvas");
  const scale = Math.min(1, 640 / bitmap.width);
  canvas.width = Math.round(bitmap.width * scale);
  canvas.height = Math.round(bitmap.height * scale);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  context.lineWidth = 3;
  context.font = "bold 16px sans-serif";
  context.textBaseline = "bottom";
  const names = [];
  for (const face of faces) {
    const [x1, y1, x2, y2] = face.box.map((v) => v * scale);
    const best = face.matches[0];
    const text = face.verdict === "MATCH" ? `${best.label} ${best.similarity.toFixed(2)}` : "unknown";
    context.strokeStyle = BOX_COLOUR[face.verdict];
    context.fillStyle = BOX_COLOUR[face.verdict];
    context.strokeRect(x1, y1, x2 - x1, y2 - y1);
    context.fillText(text, x1 + 2, Math.max(18, y1 - 2));
    names.push(text);
  }
  canvas.setAttribute(
    "aria-label",
    faces.length ? `The photo with ${faces.length} face(s): ${names.join(", ")}` : "The photo, no face"
  );
}

async function identify(event) {
  event.preventDefault();
  const file = $("identify-photo").files[0];
  const form = new FormData();
  form.append("image", file);
  show("identify-result", "Searching…");
  $("identify-faces").replaceChildren();
  try {
    const result = await call("POST", `${galleryPath()}/identify?k=3`, form);
    await drawFaces(file, result.faces);
    for (const face of result.faces) {
      const item = document.createElement("li");
      const best = face.matches[0];
      item.textContent = best
        ? `${face.verdict}: ${best.label} (similarity ${best.similarity.toFixed(4)})`
        : `${face.verdict}: the gallery is empty`;
      $("identify-faces").append(item);
    }
    const count = result.faces.length;
    show("identify-result", count ? `${count} face${count === 1 ? "" : "s"} found.` : "No face found.");
  } catch (error) {
    show("identify-result", error.message, true);
  }
}

async function refreshIdentities(note = "") {
  const body = $("identities-table").tBodies[0];
  try {
    const result = await call("GET", `${galleryPath()}/identities`);
    body.replaceChildren();
    for (const { label, count } of result.identities) {
      const row = body.insertRow();
      row.insertCell().textContent = label;
      row.insertCell().textContent = String(count);
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Delete";
      button.setAttribute("aria-label", `Delete ${label}`);
      button.addEventListener("click", () => removeIdentity(label));
      row.insertCell().append(button);
    }
    const count = result.identities.length;
    const summary = `${count} identit${count === 1 ? "y" : "ies"} in ${result.gallery}.`;
    show("identities-result", note ? `${note} ${summary}` : summary);
  } catch (error) {
    body.replaceChildren();
    show("identities-result", error.message, true);
  }
}

async function removeIdentity(label) {
  try {
    const result = await call("DELETE", `${galleryPath()}/identities/${encodeURIComponent(label)}`);
    const count = result.removed;
    await refreshIdentities(`Deleted ${label} (${count} photo${count === 1 ? "" : "s"}).`);
  } catch (error) {
    show("identities-result", error.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("verify-form").addEventListener("submit", verify);
  $("enroll-form").addEventListener("submit", enroll);
  $("identify-form").addEventListener("submit", identify);
  $("refresh-identities").addEventListener("click", () => refreshIdentities());
  $("gallery-name").addEventListener("change", () => refreshIdentities());
  checkReady();
});
