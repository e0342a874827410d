// simmim-service page: see what the model sees. A plain ES module, no dependencies, no build
// step; it talks to this server's public API only (GET /info, POST /reconstruct, /similarity).
//
// State: the images added (each a File, with an error once the server refused it), which one is
// reconstructed, and the API key in sessionStorage (this tab only). Every change redraws what it
// affects: the reconstruction of the selected image, the similarity matrix of the readable ones.

const KEY_STORAGE = "simmim-api-key";
const MAX_TRIES = 20; // tries per request while the server answers 429 (queue full) or 503
const MAX_WAIT_S = 30; // longest Retry-After honoured
const NEIGHBOURS = 3; // nearest neighbours listed per image
const REDRAW_DELAY_MS = 150; // slider and seed changes within this are drawn once

const $ = (id) => document.getElementById(id);

const state = {
  images: [], // {id, file, name, url, error: ApiError | null}
  nextId: 1,
  selected: null, // id of the image reconstructed
};

class ApiError extends Error {
  /** An answer other than 2xx: status (0: no answer), the server's error code, message and the
   * index of the image at fault in the request's list (when it names one). */
  constructor(status, code, message, index = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.index = index;
  }
}

const WHAT = {
  0: "The server cannot be reached",
  400: "This file cannot be read as an image",
  401: "The API key was refused",
  413: "Too large",
  415: "Not accepted",
  422: "Invalid request",
  429: "The server's queue is full",
  500: "The model failed",
  503: "The model is not ready",
  504: "The server took too long",
};

function describe(error) {
  /** "What happened (status code): the server's message"; shown next to the image it concerns,
   * so the message's own "a[1]: " (the image's place in that request) is left out. */
  const what = WHAT[error.status] || "Error";
  const message = error.index === null ? error.message : error.message.replace(/^\w+\[\d+\]: /, "");
  const code = error.code ? ` ${error.code}` : "";
  return `${what} (${error.status || "no answer"}${code}): ${message}`;
}

// --- the API key ------------------------------------------------------------------------------
let keyPrompt = null; // one prompt shared by every request that met a 401

function askForKey(refused) {
  /** Show the key dialog; resolves once a key is stored, rejects if it is closed without one. */
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve, reject) => {
    const dialog = $("key-dialog");
    const input = $("key-input");
    const error = $("key-error");
    error.hidden = !refused;
    error.textContent = refused ? "That key was refused (401). Try again." : "";
    input.value = "";
    let given = false;
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, input.value);
      given = true;
      dialog.close();
    };
    dialog.onclose = () => {
      keyPrompt = null;
      if (given) resolve();
      else reject(new ApiError(401, "unauthorized", "no API key was given"));
    };
    dialog.showModal();
    input.focus();
  });
  return keyPrompt;
}

// --- requests ---------------------------------------------------------------------------------
function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    });
  });
}

function retryAfterSeconds(response) {
  const value = response.headers.get("Retry-After");
  let seconds = Number(value);
  if (value && Number.isNaN(seconds)) seconds = (Date.parse(value) - Date.now()) / 1000;
  return Math.min(MAX_WAIT_S, Math.max(1, Math.ceil(seconds || 1)));
}

async function readError(response) {
  try {
    const { error } = await response.json();
    return new ApiError(response.status, error.code, error.message, error.index ?? null);
  } catch {
    return new ApiError(response.status, "", response.statusText || "unexpected answer");
  }
}

async function api(path, { body, signal, onWait } = {}) {
  /** JSON from GET path (POST body when given). A 401 asks for the key and tries again; 429 and
   * 503 wait Retry-After (onWait(error, seconds) says so) and try again, up to MAX_TRIES times.
   * Throws ApiError, or the AbortError of `signal`. */
  for (let attempt = 1; ; attempt += 1) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = { Accept: "application/json" };
    if (key) headers.Authorization = `Bearer ${key}`;
    let response;
    try {
      response = await fetch(path, { method: body ? "POST" : "GET", headers, body, signal });
    } catch (error) {
      if (signal?.aborted) throw error;
      throw new ApiError(0, "", "check that it is running");
    }
    if (response.ok) return response.json();
    const error = await readError(response);
    if (response.status === 401) {
      sessionStorage.removeItem(KEY_STORAGE);
      await askForKey(Boolean(key));
      continue;
    }
    if ((response.status === 429 || response.status === 503) && attempt < MAX_TRIES) {
      const seconds = retryAfterSeconds(response);
      onWait?.(error, seconds, attempt);
      await sleep(seconds * 1000, signal);
      continue;
    }
    throw error;
  }
}

function waiting(error, seconds, attempt) {
  const said = describe(error).replace(/\.?$/, ".");
  return `${said} Trying again in ${seconds} s (try ${attempt + 1} of ${MAX_TRIES}).`;
}

function setStatus(element, text, kind = "") {
  element.textContent = text;
  element.className = `status ${kind}`.trim();
}

// --- the model card ---------------------------------------------------------------------------
const PERCENT = new Intl.NumberFormat("en", {
  style: "percent",
  minimumFractionDigits: 1,
  maximumFractionDigits: 1,
});
const FIGURE_NAMES = { knn_top1: "kNN top-1", linear_probe_top1: "linear probe top-1" };

function evaluationText(evaluation) {
  /** "fp32: kNN top-1 82.6%, linear probe top-1 85.0%; int8: ..." from the card's figures. */
  if (!evaluation || typeof evaluation !== "object") return "not recorded";
  const parts = [];
  for (const [variant, figures] of Object.entries(evaluation)) {
    if (!figures || typeof figures !== "object") continue;
    const shown = Object.entries(figures)
      .filter(([name, value]) => typeof value === "number" && /top\d|acc/.test(name))
      .map(([name, value]) => {
        const title = FIGURE_NAMES[name] || name.replaceAll("_", " ");
        return `${title} ${PERCENT.format(value)}`;
      });
    if (shown.length) parts.push(`${variant}: ${shown.join(", ")}`);
  }
  if (!parts.length) return "not recorded";
  return parts.join("; ") + (evaluation.data ? ` (on ${evaluation.data})` : "");
}

function trainingText(training) {
  if (!training) return "not recorded";
  const amount = [
    training.images && `${training.images.toLocaleString("en")} images`,
    training.steps && `${training.steps.toLocaleString("en")} steps`,
  ].filter(Boolean);
  return `${training.data || "unknown"}${amount.length ? ` (${amount.join(", ")})` : ""}`;
}

function finetunedText(finetuned) {
  const top1 = finetuned.test_top1 == null ? "" : `; its classifier: test top-1 ${PERCENT.format(finetuned.test_top1)}`;
  const classes = finetuned.classes ? `, ${finetuned.classes.length} classes` : "";
  return `on ${finetuned.labels || finetuned.data}${classes}${top1}; serves its ${finetuned.serves}`;
}

function encoderText(encoder) {
  if (!encoder) return "not recorded";
  if (!encoder.parameters) return encoder.arch;
  return `${encoder.arch} (${encoder.parameters.toLocaleString("en")} parameters)`;
}

function renderCard(info) {
  const card = info.model;
  const channels = { 1: "gray", 3: "RGB" }[card.in_chans] || `${card.in_chans} channels`;
  const pooling = card.pooling ? ` (${card.pooling} pooling)` : "";
  const rows = [
    ["Name", card.name],
    ...(card.domain ? [["Domain", card.domain]] : []),
    ["Training data", trainingText(card.training)],
    ...(card.finetuned ? [["Fine-tuned", finetunedText(card.finetuned)]] : []),
    ["Input", `${card.image_size} × ${card.image_size} px, ${channels}`],
    ["Encoder", encoderText(card.encoder)],
    ["Embedding", `${card.embedding_dim} dimensions${pooling}`],
    ["Evaluation", evaluationText(card.evaluation)],
    ["int8 served", info.settings.int8 ? "yes (encoder.int8.onnx)" : "no (fp32 encoder)"],
    ["Server", `${info.state || "unknown"}, version ${info.version}`],
  ];
  const list = $("model-card");
  list.replaceChildren();
  for (const [term, value] of rows) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    list.append(dt, dd);
  }
  list.hidden = false;
  setStatus($("model-status"), "");
  const ratio = $("mask-ratio");
  ratio.value = card.mask_ratio ?? ratio.value;
  showRatio();
}

async function loadCard() {
  try {
    renderCard(await api("/info"));
  } catch (error) {
    setStatus($("model-status"), describe(error), "error");
  }
}

// --- the images -------------------------------------------------------------------------------
function label(image) {
  return `${state.images.indexOf(image) + 1}. ${image.name}`;
}

function sizeText(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} kB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function addImages(files) {
  const added = [...files].map((file) => ({
    id: state.nextId++,
    file,
    name: file.name || "image",
    url: URL.createObjectURL(file),
    error: null,
  }));
  if (!added.length) return;
  state.images.push(...added);
  const first = !readable().some((image) => image.id === state.selected);
  if (first) state.selected = added[0].id;
  renderImages();
  if (first) reconstruct();
  compare();
}

function removeImage(image) {
  const position = state.images.indexOf(image);
  state.images.splice(position, 1);
  URL.revokeObjectURL(image.url);
  const wasSelected = image.id === state.selected;
  if (wasSelected) state.selected = readable()[0]?.id ?? null;
  renderImages();
  // keyboard focus stays in the list: on the next image's button, else the file input
  const buttons = $("image-list").querySelectorAll("button");
  (buttons[Math.min(position, buttons.length - 1)] || $("files")).focus();
  if (wasSelected) reconstruct();
  compare();
}

function readable() {
  return state.images.filter((image) => !image.error);
}

function imageStatus(image) {
  return document.querySelector(`#image-list li[data-id="${image.id}"] .status`);
}

function failImage(image, error) {
  /** The server refused this image (400, 413): say so next to it; leave it out from now on. */
  image.error = error;
  if (image.id === state.selected) {
    state.selected = readable()[0]?.id ?? null;
    reconstruct(error);
  }
  renderImages();
}

function renderImages() {
  const list = $("image-list");
  const focused = list.contains(document.activeElement)
    ? document.activeElement.closest("li")?.dataset.id
    : null;
  list.replaceChildren();
  for (const image of state.images) {
    const item = document.createElement("li");
    item.dataset.id = image.id;
    item.classList.toggle("failed", Boolean(image.error));
    const thumb = document.createElement("img");
    thumb.className = "thumb";
    thumb.alt = "";
    thumb.src = image.url;
    thumb.addEventListener("error", () => { thumb.style.visibility = "hidden"; });
    const text = document.createElement("div");
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = label(image);
    const size = document.createElement("div");
    size.className = "size";
    size.textContent = sizeText(image.file.size);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${label(image)}`);
    remove.addEventListener("click", () => removeImage(image));
    text.append(name, size, remove);
    const status = document.createElement("p");
    status.setAttribute("role", "status");
    if (image.error) setStatus(status, describe(image.error), "error");
    else setStatus(status, "");
    item.append(thumb, text, status);
    list.append(item);
    if (String(image.id) === focused) remove.focus(); // a redraw keeps the keyboard's place
  }
  const select = $("recon-image");
  select.replaceChildren();
  for (const image of readable()) {
    const option = new Option(label(image), image.id, false, image.id === state.selected);
    select.append(option);
  }
  select.disabled = !select.options.length;
}

// --- the reconstruction -----------------------------------------------------------------------
let reconstruction = { generation: 0, abort: null };

function showRatio() {
  $("mask-ratio-value").textContent = Number($("mask-ratio").value).toFixed(2);
}

async function reconstruct(previousError = null) {
  /** Redraw original | masked | reconstruction of the selected image (the latest call wins). */
  const generation = ++reconstruction.generation;
  reconstruction.abort?.abort();
  const image = state.images.find((candidate) => candidate.id === state.selected);
  const status = $("recon-status");
  const panels = $("panels");
  const section = $("reconstruction");
  if (!image) {
    panels.hidden = true;
    $("loss").hidden = true;
    if (previousError) setStatus(status, describe(previousError), "error");
    else if (state.images.length) setStatus(status, "No readable image left.");
    else setStatus(status, "Add an image to see its reconstruction.");
    return;
  }
  const abort = new AbortController();
  reconstruction.abort = abort;
  const ratio = $("mask-ratio").value;
  const seed = $("seed").value.trim();
  const paste = $("paste-visible").checked;
  const form = new FormData();
  form.append("image", image.file, image.name);
  form.append("mask_ratio", ratio);
  if (seed !== "") form.append("seed", seed);
  form.append("paste_visible", String(paste));
  setStatus(status, `Reconstructing ${label(image)}…`);
  section.setAttribute("aria-busy", "true");
  const onWait = (error, seconds, attempt) => {
    const text = waiting(error, seconds, attempt);
    setStatus(status, text, "waiting");
    const next = imageStatus(image);
    if (next) setStatus(next, text, "waiting");
  };
  try {
    const answer = await api("/reconstruct", { body: form, signal: abort.signal, onWait });
    if (generation !== reconstruction.generation) return;
    const name = label(image);
    const pictures = [
      ["panel-original", answer.original, `${name} as the model sees it`],
      ["panel-masked", answer.masked_input, `${name} with ${ratio} of its patches masked`],
      ["panel-reconstruction", answer.reconstruction, `the model's reconstruction of ${name}`],
    ];
    await Promise.all(pictures.map(([id, png, alt]) => {
      const img = $(id);
      img.alt = alt;
      img.src = `data:image/png;base64,${png}`;
      return img.decode().catch(() => {});
    }));
    if (generation !== reconstruction.generation) return;
    const masked = answer.mask.flat();
    $("loss-value").textContent = answer.loss.toFixed(4);
    const share = masked.reduce((a, b) => a + b, 0) / masked.length;
    $("masked-share").textContent = PERCENT.format(share);
    panels.dataset.image = image.id;
    panels.dataset.maskRatio = ratio;
    panels.dataset.seed = seed;
    panels.dataset.pasteVisible = String(paste);
    panels.hidden = false;
    $("loss").hidden = false;
    setStatus(status, "");
    const own = imageStatus(image);
    if (own && !image.error) setStatus(own, "");
  } catch (error) {
    if (abort.signal.aborted || generation !== reconstruction.generation) return;
    if (error.status === 400 || error.status === 413) {
      failImage(image, error); // the request held this image only
      return;
    }
    panels.hidden = true;
    $("loss").hidden = true;
    setStatus(status, `${label(image)}: ${describe(error)}`, "error");
    const own = imageStatus(image);
    if (own && error.status !== 422) setStatus(own, describe(error), "error"); // 422: the controls
  } finally {
    if (generation === reconstruction.generation) section.removeAttribute("aria-busy");
  }
}

let redrawTimer = null;
function redrawSoon() {
  clearTimeout(redrawTimer);
  redrawTimer = setTimeout(() => reconstruct(), REDRAW_DELAY_MS);
}

// --- the similarity matrix --------------------------------------------------------------------
let comparison = { generation: 0, abort: null };

async function compare() {
  /** The cosine similarity matrix of every readable image, and each one's nearest neighbours;
   * an image the server cannot read is marked next to it and left out. */
  const generation = ++comparison.generation;
  comparison.abort?.abort();
  const abort = new AbortController();
  comparison.abort = abort;
  const status = $("sim-status");
  const section = $("similarity");
  for (;;) {
    const images = readable();
    if (images.length < 2) {
      $("matrix-wrap").hidden = true;
      $("neighbours-block").hidden = true;
      setStatus(status, "Add two images or more to compare them.");
      return;
    }
    const form = new FormData();
    for (const image of images) form.append("a", image.file, image.name);
    setStatus(status, `Comparing ${images.length} images…`);
    section.setAttribute("aria-busy", "true");
    const onWait = (error, seconds, attempt) => {
      setStatus(status, waiting(error, seconds, attempt), "waiting");
    };
    try {
      const { scores } = await api("/similarity", { body: form, signal: abort.signal, onWait });
      if (generation !== comparison.generation) return;
      renderMatrix(images, scores);
      setStatus(status, "");
      return;
    } catch (error) {
      if (abort.signal.aborted || generation !== comparison.generation) return;
      if ((error.status === 400 || error.status === 413) && error.index !== null) {
        failImage(images[error.index], error);
        continue;
      }
      $("matrix-wrap").hidden = true;
      $("neighbours-block").hidden = true;
      setStatus(status, describe(error), "error");
      return;
    } finally {
      if (generation === comparison.generation) section.removeAttribute("aria-busy");
    }
  }
}

function shade(value, low, high) {
  /** Background and text colours for a value between low and high (darker: higher). */
  const t = high > low ? (value - low) / (high - low) : 1;
  const lightness = 96 - 62 * t;
  return [`hsl(214 62% ${lightness}%)`, lightness < 58 ? "#fff" : "#1d2329"];
}

function renderMatrix(images, scores) {
  const values = scores.flat();
  const low = Math.min(...values);
  const high = Math.max(...values);
  const table = $("matrix");
  const head = document.createElement("tr");
  const corner = document.createElement("td");
  head.append(corner);
  const number = (image) => state.images.indexOf(image) + 1; // as in the list of images
  images.forEach((image) => {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = String(number(image));
    th.title = image.name;
    head.append(th);
  });
  table.tHead.replaceChildren(head);
  const rows = images.map((image, i) => {
    const row = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = label(image);
    row.append(th);
    scores[i].forEach((value, j) => {
      const td = document.createElement("td");
      td.textContent = value.toFixed(3);
      td.dataset.value = String(value);
      td.title = `${images[i].name} and ${images[j].name}: ${value.toFixed(4)}`;
      const [background, color] = shade(value, low, high);
      td.style.background = background;
      td.style.color = color;
      row.append(td);
    });
    return row;
  });
  table.tBodies[0].replaceChildren(...rows);
  $("matrix-range").textContent = `${low.toFixed(3)} to ${high.toFixed(3)}`;
  $("matrix-wrap").hidden = false;

  const list = $("neighbours");
  list.replaceChildren(...images.map((image, i) => {
    const nearest = images
      .map((other, j) => ({ other, j, value: scores[i][j] }))
      .filter(({ j }) => j !== i)
      .sort((a, b) => b.value - a.value)
      .slice(0, NEIGHBOURS);
    const item = document.createElement("li");
    const name = document.createElement("strong");
    name.textContent = label(image);
    const names = nearest.map(({ other, value }) => `${label(other)} (${value.toFixed(3)})`);
    item.append(name, `: ${names.join(", ")}`);
    return item;
  }));
  $("neighbours-block").hidden = false;
}

// --- wiring -----------------------------------------------------------------------------------
function start() {
  showRatio();
  $("files").addEventListener("change", (event) => {
    addImages(event.target.files);
    event.target.value = ""; // the same file can be added again
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addImages(event.dataTransfer.files);
  });
  $("recon-image").addEventListener("change", (event) => {
    state.selected = Number(event.target.value);
    reconstruct();
  });
  $("mask-ratio").addEventListener("input", () => {
    showRatio();
    redrawSoon();
  });
  $("seed").addEventListener("input", redrawSoon);
  $("paste-visible").addEventListener("change", () => reconstruct());
  loadCard();
}

start();
