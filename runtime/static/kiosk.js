// The kiosk page of `facert serve` (README, Serving): camera frames or a photo go to
// /v1/analyze and come back as boxes over the faces; a sentence goes to /v1/generate, whose
// event stream moves the progress bar. No framework and no build step: the browser runs this file.
"use strict";

const FRAME_EVERY_MS = 1000;
const KEY_ITEM = "facert-api-key";
const COLORS = { reliable: "#00c853", unreliable: "#ff9100" };
const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

// The API key lives in this tab's sessionStorage: it survives a reload, not the tab.
const keyField = $("key");
keyField.value = sessionStorage.getItem(KEY_ITEM) || "";
keyField.addEventListener("input", () => sessionStorage.setItem(KEY_ITEM, keyField.value.trim()));

function headers(extra = {}) {
  const key = keyField.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showError(element, message) {
  element.textContent = message;
  element.hidden = !message;
}

// The server's own message from its {"error": {"code", "message"}} body.
async function errorOf(response) {
  try {
    const { error } = await response.json();
    return `${error.message} (${response.status} ${error.code})`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// --- Reading faces --------------------------------------------------------------------------

const video = $("video");
const picture = $("picture");
const overlay = $("overlay");
const readError = $("read-error");
let stream = null; // the camera's, while it runs
let source = 0; // bumped when the picture changes: answers about the old one are dropped
let photoUrl = null;

async function analyze(image, name) {
  const form = new FormData();
  form.append("image", image, name);
  const response = await fetch("v1/analyze", { method: "POST", headers: headers(), body: form });
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

function labelLines(face) {
  const lines = Object.entries(face.attributes).map(
    ([name, a]) => `${name}: ${a.value} ${Math.round(a.prob * 100)} %`,
  );
  const { score, threshold, reliable } = face.reading;
  if (reliable === false) {
    lines.unshift(`UNRELIABLE: ${score.toFixed(1)} dB < ${threshold.toFixed(1)} dB`);
  }
  return lines;
}

// Boxes and labels in the analysed image's pixels; CSS scales the canvas onto the picture.
// The list below repeats them as text (for screen readers, and for the page's tests).
function drawFaces(result, millis) {
  overlay.width = result.width;
  overlay.height = result.height;
  const ctx = overlay.getContext("2d");
  const size = Math.max(12, Math.round(result.width / 45));
  ctx.font = `${size}px sans-serif`;
  ctx.textBaseline = "top";
  ctx.lineWidth = Math.max(2, result.width / 250);
  const items = result.faces.map((face) => {
    const { x, y, w, h } = face.box;
    const reliable = face.reading.reliable !== false; // null: the model has no threshold
    const color = reliable ? COLORS.reliable : COLORS.unreliable;
    const lines = labelLines(face);
    ctx.strokeStyle = color;
    ctx.strokeRect(x, y, w, h);
    const width = Math.max(...lines.map((line) => ctx.measureText(line).width)) + 8;
    const height = lines.length * size * 1.2 + 8;
    const left = Math.max(0, Math.min(x, result.width - width));
    const top = y + h + height <= result.height ? y + h : Math.max(0, y - height);
    ctx.fillStyle = "rgba(0, 0, 0, 0.6)";
    ctx.fillRect(left, top, width, height);
    ctx.fillStyle = color;
    lines.forEach((line, i) => ctx.fillText(line, left + 4, top + 4 + i * size * 1.2));

    const item = document.createElement("li");
    item.dataset.box = [x, y, w, h].join(",");
    item.dataset.reliable = String(face.reading.reliable);
    item.className = reliable ? "" : "unreliable";
    item.textContent = lines.join(", ");
    return item;
  });
  $("faces").replaceChildren(...items);
  const found = result.faces.length ? `${result.faces.length} face(s)` : "no face found";
  $("read-status").textContent = `${found} in ${Math.round(millis)} ms`;
}

function clearFaces() {
  overlay.width = overlay.height = 0;
  $("faces").replaceChildren();
}

// Reads `image` and draws its faces, unless the picture has changed source meanwhile.
async function read(image, name, mine) {
  const started = performance.now();
  const result = await analyze(image, name);
  if (source === mine) drawFaces(result, performance.now() - started);
}

// One request at a time, always of the newest frame: a slow server means fewer readings,
// never a queue of stale frames. The boxes stay until the next answer replaces them.
async function readFrames(mine) {
  const grab = document.createElement("canvas");
  while (source === mine) {
    const started = performance.now();
    if (video.videoWidth) {
      grab.width = video.videoWidth;
      grab.height = video.videoHeight;
      grab.getContext("2d").drawImage(video, 0, 0);
      const frame = await new Promise((done) => grab.toBlob(done, "image/jpeg", 0.9));
      try {
        await read(frame, "frame.jpg", mine);
        if (source === mine) showError(readError, "");
      } catch (e) {
        if (source === mine) showError(readError, e.message);
      }
    }
    await sleep(Math.max(0, FRAME_EVERY_MS - (performance.now() - started)));
  }
}

function stopCamera() {
  if (!stream) return;
  source += 1;
  stream.getTracks().forEach((track) => track.stop());
  stream = null;
  video.srcObject = null;
  $("camera").textContent = "Start camera";
}

async function startCamera() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("no camera access on this page: open it on localhost or over HTTPS");
  }
  stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  const mine = ++source;
  video.srcObject = stream;
  picture.hidden = true;
  video.hidden = false;
  clearFaces();
  await video.play();
  $("camera").textContent = "Stop camera";
  readFrames(mine);
}

$("camera").addEventListener("click", async () => {
  showError(readError, "");
  if (stream) {
    stopCamera();
    return;
  }
  try {
    await startCamera();
  } catch (e) {
    showError(readError, `camera: ${e.message}`);
  }
});

$("photo").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = ""; // choosing the same file again is a new change
  if (!file) return;
  stopCamera();
  const mine = ++source;
  if (photoUrl) URL.revokeObjectURL(photoUrl);
  photoUrl = URL.createObjectURL(file);
  picture.src = photoUrl;
  video.hidden = true;
  picture.hidden = false;
  clearFaces();
  showError(readError, "");
  $("read-status").textContent = "reading…";
  try {
    await read(file, file.name, mine);
  } catch (e) {
    if (source !== mine) return;
    $("read-status").textContent = "";
    showError(readError, e.message);
  }
});

// --- Drawing faces --------------------------------------------------------------------------

const drawError = $("draw-error");

function setProgress(done, total) {
  const percent = Math.floor((100 * done) / total);
  $("progress").value = percent;
  $("percent").textContent = `${percent} %`;
}

// Server-sent events from a fetch() answer: EventSource can neither POST nor send the key.
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield [name, JSON.parse(data)];
    }
  }
}

function showDrawings(result, text) {
  for (const image of result.images) {
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${image.png_base64}`;
    img.alt = `a face drawn from “${text}”`;
    img.title = `${text} (seed ${result.seed})`;
    $("drawings").prepend(img);
  }
}

async function draw(text) {
  const response = await fetch("v1/generate", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ text }),
  });
  if (!response.ok) throw new Error(await errorOf(response));
  for await (const [name, data] of serverEvents(response)) {
    if (name === "progress") setProgress(data.done, data.total);
    else if (name === "error") throw new Error(`${data.error.message} (${data.error.code})`);
    else if (name === "result") return showDrawings(data, text);
  }
  throw new Error("the connection closed before the drawing was done");
}

$("draw").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = $("draw-button");
  button.disabled = true;
  showError(drawError, "");
  setProgress(0, 1);
  try {
    await draw($("text").value);
  } catch (e) {
    showError(drawError, e.message);
  } finally {
    button.disabled = false;
  }
});
