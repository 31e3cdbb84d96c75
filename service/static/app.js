// The playground: a client of the public API only (/v1/models, /v1/generations), so it also
// shows how to use it. No framework, no build step.
"use strict";

// The compare view: the distilled Shapes models and their teacher, fewest steps first.
const COMPARE_MODELS = [
  "shapes-hyper-1step",
  "shapes-hyper-2step",
  "shapes-hyper-4step",
  "shapes-hyper-8step",
  "shapes-base",
];
const MAX_RESULTS = 12; // results kept on the page, newest first
const POLL_MS = 250;

const $ = (id) => document.getElementById(id);
let models = [];

function apiKey() {
  return $("api-key").value.trim();
}

// fetch() a JSON API route; an error answer becomes an Error with the API's own message.
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && body.error ? body.error : { message: response.statusText };
    const field = detail.field ? ` (${detail.field})` : "";
    throw new Error(`${response.status}: ${detail.message}${field}`);
  }
  return body;
}

// "1..50" -> every step from 1 to 50; "1, 2, 4" -> those; "4" -> 4.
function parseSteps(text) {
  const range = text.match(/^(\d+)\.\.(\d+)$/);
  if (range) return { min: Number(range[1]), max: Number(range[2]), allowed: null };
  const allowed = text.split(",").map((s) => Number(s.trim()));
  return { min: Math.min(...allowed), max: Math.max(...allowed), allowed };
}

function showError(element, error) {
  element.textContent = error ? String(error.message || error) : "";
  element.hidden = !error;
}

async function loadModels() {
  try {
    models = (await api("/v1/models")).data;
  } catch (error) {
    showError($("error"), error);
    return;
  }
  const select = $("model");
  select.replaceChildren();
  // models with a live worker first: the others would wait for a worker that never comes
  const ordered = [...models.filter((m) => m.served), ...models.filter((m) => !m.served)];
  for (const model of ordered) {
    const option = new Option(model.served ? model.id : `${model.id} (not served)`, model.id);
    option.disabled = !model.served;
    select.add(option);
  }
  showError($("error"), null);
  selectModel();
}

function currentModel() {
  return models.find((m) => m.id === $("model").value);
}

// Fill the form with what the chosen model allows.
function selectModel() {
  const model = currentModel();
  if (!model) return;
  const steps = parseSteps(model.steps);
  Object.assign($("steps"), { min: steps.min, max: steps.max, value: model.default_steps });
  $("size").replaceChildren(...model.sizes.map((size) => new Option(size, size)));
  $("size").value = model.default_size;
  $("negative-row").hidden = !model.negative_prompt;
  const allowed = steps.allowed ? steps.allowed.join(", ") : model.steps;
  $("model-note").textContent = `${model.description} · steps ${allowed} · ${model.backend}`;
}

// Submit a job and wait for it: the server holds the answer up to 60 s (Prefer: wait), then we
// poll the job until it ends.
async function runJob(body) {
  let job = await api("/v1/generations", {
    method: "POST",
    headers: { Prefer: "wait=60" },
    body: JSON.stringify({ ...body, response_format: "b64_json" }),
  });
  while (job.status === "queued" || job.status === "running") {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    job = await api(`/v1/generations/${encodeURIComponent(job.id)}`);
  }
  if (job.status !== "succeeded") {
    throw new Error(`job ${job.status}: ${job.error ? job.error.message : "no images"}`);
  }
  return job;
}

function seconds(value) {
  return value == null ? "–" : `${value.toFixed(2)} s`;
}

function timings(job) {
  const total = (Date.parse(job.finished_at) - Date.parse(job.created_at)) / 1000;
  return `queue ${seconds(job.queue_seconds)} · run ${seconds(job.run_seconds)} · total ${seconds(total)}`;
}

function imageElement(image) {
  const img = document.createElement("img");
  img.className = "generated";
  img.src = `data:${image.content_type};base64,${image.b64_json}`;
  img.alt = `seed ${image.seed}`;
  return img;
}

function showResult(job, prompt) {
  const result = document.createElement("article");
  result.className = "result";
  const caption = document.createElement("p");
  caption.className = "caption";
  caption.textContent = prompt;
  const images = document.createElement("div");
  images.className = "images";
  for (const image of job.images) {
    const figure = document.createElement("figure");
    const label = document.createElement("figcaption");
    label.textContent = `seed ${image.seed}`;
    figure.append(imageElement(image), label);
    images.append(figure);
  }
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = `${job.model} · ${timings(job)}`;
  result.append(caption, images, meta);
  $("results").prepend(result);
  while ($("results").children.length > MAX_RESULTS) $("results").lastChild.remove();
}

async function generate(event) {
  event.preventDefault();
  const model = currentModel();
  const [width, height] = $("size").value.split("x").map(Number);
  const body = {
    prompt: $("prompt").value,
    model: model ? model.id : undefined,
    steps: Number($("steps").value),
    width,
    height,
    n: Number($("n").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (model && model.negative_prompt && $("negative-prompt").value) {
    body.negative_prompt = $("negative-prompt").value;
  }
  const button = $("generate-button");
  button.disabled = true;
  showError($("error"), null);
  try {
    showResult(await runJob(body), body.prompt);
  } catch (error) {
    showError($("error"), error);
  } finally {
    button.disabled = false;
  }
}

function compareCard(modelId) {
  const card = document.createElement("article");
  card.className = "card";
  card.dataset.model = modelId;
  const title = document.createElement("h3");
  title.textContent = modelId;
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = "waiting…";
  card.append(title, meta);
  return card;
}

async function compare(event) {
  event.preventDefault();
  const prompt = $("compare-prompt").value;
  const seed = Number($("compare-seed").value || 0);
  const known = COMPARE_MODELS.filter((id) => models.some((m) => m.id === id));
  showError($("compare-error"), known.length ? null : "none of the compared models is in the registry");
  const cards = known.map(compareCard);
  $("compare-results").replaceChildren(...cards);
  $("compare-button").disabled = true;
  // One model after the other, so each time is that model's alone, not a share of the machine.
  for (const [index, modelId] of known.entries()) {
    const card = cards[index];
    const meta = card.querySelector(".meta");
    const model = models.find((m) => m.id === modelId);
    if (!model.served) {
      meta.textContent = "not served by this deployment";
      continue;
    }
    meta.textContent = "running…";
    try {
      const job = await runJob({ prompt, model: modelId, seed });
      card.insertBefore(imageElement(job.images[0]), meta);
      meta.textContent = `${model.default_steps} step(s) · ${timings(job)}`;
    } catch (error) {
      meta.textContent = String(error.message || error);
      meta.classList.add("error");
    }
  }
  $("compare-button").disabled = false;
}

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === name);
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== name;
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem("hypersd-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("hypersd-api-key", apiKey());
    loadModels();
  });
  $("model").addEventListener("change", selectModel);
  $("random-seed").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 31);
  });
  $("generate-form").addEventListener("submit", generate);
  $("compare-form").addEventListener("submit", compare);
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  loadModels();
});
