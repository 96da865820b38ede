// The model page: everything comes from /summary and /models/<name>.
"use strict";

const fmt = new Intl.NumberFormat("en");
const errorBox = document.getElementById("error");

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(unit ? 2 : 0)} ${units[unit]} (${fmt.format(n)} bytes)`;
}

function cells(row, values) {
  values.forEach((value) => {
    const cell = row.insertCell();
    cell.textContent = value;
  });
}

async function getJson(url) {
  const response = await authFetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  return body;
}

function showMemory(memory) {
  const table = document.getElementById("memory");
  table.innerHTML = "";
  [["Forward pass, activations", memory.forward_bytes],
   ["Training, activations and their gradients", memory.training_bytes],
   ["Inference in all (parameters + forward)", memory.inference_total_bytes],
   ["Training in all (parameters + training)", memory.training_total_bytes]]
    .forEach(([label, value]) => cells(table.insertRow(), [label, bytes(value)]));
}

function showSummary(summary) {
  document.getElementById("model-name").textContent =
    `${summary.model.name} v${summary.model.version} (${summary.arch})`;
  document.getElementById("params").textContent =
    `${fmt.format(summary.totals.params)} (${fmt.format(summary.totals.trainable_params)} trainable)`;
  document.getElementById("param-bytes").textContent = bytes(summary.totals.param_bytes);
  document.getElementById("accuracy").textContent = summary.test_accuracy == null ? "unknown"
    : `${(100 * summary.test_accuracy).toFixed(2)}% on the 10,000 MNIST test images`;
  showMemory(summary.memory);
  const notes = document.getElementById("notes");
  (summary.notes || []).forEach((text) => {
    const item = document.createElement("li");
    item.textContent = text;
    notes.append(item);
  });
  notes.hidden = !(summary.notes || []).length;
  const layers = document.getElementById("layers");
  summary.layers.forEach((l) => cells(layers.insertRow(), [
    l.name, l.type, l.output_shape.slice(1).join("×"), fmt.format(l.weights),
    fmt.format(l.biases), fmt.format(l.params), fmt.format(l.activations)]));
  const classes = document.getElementById("classes");
  (summary.per_class_accuracy || []).forEach((c) => cells(classes.insertRow(), [
    c.digit, fmt.format(c.correct), fmt.format(c.total), `${(100 * c.accuracy).toFixed(2)}%`]));
}

// An <img src> cannot send the token: fetch the plot with it and show it as a data: URL.
async function showImage(img, url) {
  const response = await authFetch(url);
  if (!response.ok) return;
  const blob = await response.blob();
  const reader = new FileReader();
  reader.onload = () => { img.src = reader.result; };
  reader.readAsDataURL(blob);
}

function showPlots(model) {
  const box = document.getElementById("plots");
  (model.plots || []).forEach((plot) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = plot.title;
    showImage(img, plot.url);
    const caption = document.createElement("figcaption");
    caption.textContent = plot.title;
    figure.append(img, caption);
    box.append(figure);
  });
}

// MODEL_CONFIG_FILE's labels, canary weights and shadow comparisons, when there are any.
function showRollout(model) {
  const labels = Object.entries(model.labels || {});
  const shadow = model.shadow || [];
  document.getElementById("rollout").hidden = !labels.length && !shadow.length;
  document.getElementById("labels").textContent =
    labels.map(([label, version]) => `${label} → v${version}`).join(", ") || "none";
  document.getElementById("traffic").textContent = Object.entries(model.traffic || {})
    .map(([label, percent]) => `${label}: ${percent}%`).join(", ") || "none";
  const rows = document.getElementById("shadow");
  shadow.forEach((s) => cells(rows.insertRow(), [
    `v${s.serving}`, `v${s.shadow}${s.label ? ` (${s.label}, ${s.percent}%)` : ""}`,
    fmt.format(s.compared),
    s.agreement == null ? "–" : `${(100 * s.agreement).toFixed(2)}%`,
    s.mean_abs_difference == null ? "–" : s.mean_abs_difference.toFixed(5)]));
}

async function load() {
  try {
    const summary = await getJson("/summary");
    showSummary(summary);
    const model = await getJson(`/models/${encodeURIComponent(summary.model.name)}`);
    showPlots(model);
    showRollout(model);
  } catch (err) {
    errorBox.textContent = `Could not load the model: ${err.message}`;
    errorBox.hidden = false;
  }
}

// Each keystroke asks the server again ("6", then "64"); answers can arrive out of
// order, so only the answer to the latest question is shown.
let latestMemoryQuery = 0;

document.getElementById("batch-size").addEventListener("input", async (event) => {
  const query = ++latestMemoryQuery;
  const size = Number(event.target.value);
  if (!Number.isInteger(size) || size < 1) {
    errorBox.textContent = "The batch size must be a whole number of at least 1.";
    errorBox.hidden = false;
    return;
  }
  try {
    const memory = (await getJson(`/summary?batch_size=${size}`)).memory;
    if (query !== latestMemoryQuery) return;
    showMemory(memory);
    errorBox.hidden = true;
  } catch (err) {
    if (query !== latestMemoryQuery) return;
    errorBox.textContent = `Could not compute memory: ${err.message}`;
    errorBox.hidden = false;
  }
});

load();
