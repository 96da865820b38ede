// The drawing page: a pad for mouse, pen and touch (Pointer Events), uploads and drops,
// and the prediction with its probabilities and the 28×28 image the model received.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const live = document.getElementById("live");
const errorBox = document.getElementById("error");
const LINE_WIDTH = 22; // in canvas pixels (280 wide): a finger's width on a phone
let drawing = false;
let dirty = false;
let timer = null;
let generation = 0; // bumped by Clear: answers for an older drawing are dropped

function resetPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  dirty = false;
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width,
          (event.clientY - box.top) * pad.height / box.height];
}

function startStroke(event) {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  const [x, y] = point(event);
  ctx.beginPath();
  ctx.moveTo(x, y);
  ctx.lineTo(x + 0.1, y);
  ctx.stroke();
}

function extendStroke(event) {
  if (!drawing) return;
  event.preventDefault();
  const [x, y] = point(event);
  ctx.lineTo(x, y);
  ctx.stroke();
  dirty = true;
  schedule();
}

function endStroke() {
  if (!drawing) return;
  drawing = false;
  dirty = true;
  schedule();
}

function schedule() {
  if (!live.checked) return;
  clearTimeout(timer);
  timer = setTimeout(predictPad, 250); // debounced: at most one request per pause
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = !message;
}

function showPrediction(body) {
  const prediction = body.predictions[0];
  document.getElementById("digit").textContent = String(prediction.digit);
  document.getElementById("confidence").textContent =
    `${(100 * prediction.confidence).toFixed(1)}% sure (model ${body.model.name} v${body.model.version})`;
  document.querySelectorAll("#bars li").forEach((item, digit) => {
    const share = 100 * prediction.probabilities[digit];
    item.querySelector(".fill").style.width = `${share}%`;
    item.querySelector(".value").textContent = `${share.toFixed(1)}%`;
    item.classList.toggle("best", digit === prediction.digit);
  });
  const seen = document.getElementById("seen");
  if (prediction.input_png) {
    seen.src = `data:image/png;base64,${prediction.input_png}`;
    seen.hidden = false;
  }
}

async function send(blob, type, asked = generation) {
  try {
    const response = await authFetch("/predict?explain=1", {
      method: "POST", headers: {"Content-Type": type || "application/octet-stream"}, body: blob});
    const body = await response.json();
    if (asked !== generation) return;
    if (!response.ok) {
      showError(`The server could not read that image: ${body.error ? body.error.message : response.status}`);
      return;
    }
    showError("");
    showPrediction(body);
  } catch (err) {
    showError(`The server did not answer: ${err.message}`);
  }
}

function predictPad() {
  if (!dirty) {
    showError("Draw a digit first.");
    return;
  }
  const asked = generation; // toBlob is asynchronous: remember which drawing this is
  pad.toBlob((blob) => send(blob, "image/png", asked), "image/png");
}

function sendFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (${file.type}).`);
    return;
  }
  send(file, file.type);
}

ctx.lineWidth = LINE_WIDTH;
ctx.lineCap = "round";
ctx.lineJoin = "round";
ctx.strokeStyle = "#000";
resetPad();

pad.addEventListener("pointerdown", startStroke);
pad.addEventListener("pointermove", extendStroke);
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);
document.getElementById("clear").addEventListener("click", () => {
  clearTimeout(timer);
  generation += 1;
  resetPad();
  document.getElementById("digit").textContent = "?";
  document.getElementById("confidence").textContent = "";
  document.querySelectorAll("#bars li").forEach((item) => {
    item.querySelector(".fill").style.width = "0%";
    item.querySelector(".value").textContent = "0%";
    item.classList.remove("best");
  });
  document.getElementById("seen").hidden = true;
  showError("");
});
document.getElementById("predict").addEventListener("click", predictPad);
document.getElementById("file").addEventListener("change", (e) => sendFile(e.target.files[0]));

const drop = document.getElementById("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  sendFile(e.dataTransfer.files[0]);
});
