// streamdiff stream page: webcam or screen -> WebRTC (POST /whip, rtc.js; docs/webrtc.md) -> output <video>, or
// -> JPEG -> WebSocket (/ws) -> output canvas (docs/protocol.md). WebRTC is the default where the browser has it;
// the "Transport" select or ?transport=ws chooses the WebSocket.
//
// WebSocket mode:
// Pipelined, not lock-step: a frame is captured whenever fewer than `maxInFlight` frames await their output and the
// socket's send buffer is empty, so the browser never queues frames behind each other. Output is latest-wins: a frame
// that arrives while the previous one is still being decoded replaces any older one waiting.

import {
  PROTOCOL_VERSION, describeClose, packInputFrame, packReferenceImage, parseOutputFrame, randomToken, socketUrl,
} from "./protocol.js";
import { connectRtc, rtcSupported } from "./rtc.js";

const JPEG_QUALITY = 0.8;
const MAX_BUFFERED_BYTES = 0; // send only when the previous frame has left the browser's buffer
const STALE_MS = 3000; // frames without an output after this long were dropped by the server (latest-wins)
const UPDATE_DELAY_MS = 250; // debounce of live updates while typing or dragging
const FPS_WINDOW = 30; // output frames the fps is averaged over

const $ = (id) => document.getElementById(id);
const els = {
  status: $("status"), input: $("input"), output: $("output"), capture: $("capture"), fps: $("fps"),
  latency: $("latency"), serverMs: $("server-ms"), startCamera: $("start-camera"), startScreen: $("start-screen"),
  stop: $("stop"), size: $("size"), prompt: $("prompt"), negativePrompt: $("negative-prompt"),
  strength: $("strength"), strengthValue: $("strength-value"), guidance: $("guidance"),
  guidanceValue: $("guidance-value"), seed: $("seed"), randomSeed: $("random-seed"), error: $("error"),
  view: $("view"), viewUrl: $("view-url"), copyView: $("copy-view"), framesSent: $("frames-sent"),
  framesReceived: $("frames-received"), streamId: $("stream-id"), imagePrompt: $("image-prompt"),
  reference: $("reference"), ipScale: $("ip-scale"), ipScaleValue: $("ip-scale-value"),
  transport: $("transport"), outputVideo: $("output-video"), controlnetPicker: $("controlnet-picker"),
  controlnet: $("controlnet"), controlnetScale: $("controlnet-scale"),
  controlnetScaleValue: $("controlnet-scale-value"),
};
const REFERENCE_SIDE = 512; // a reference image is sent at most this large (the image encoder sees ~224 px)
let ipAdapter = ""; // the IP-Adapter the server offers (ready.limits.ip_adapter), "" for none
let controlnets = []; // the ControlNets the server offers (ready.limits.controlnets), by name

// Read-only state for tests and curious users: window.streamdiff.framesSent, .lastLatencyMs, ...
const state = {
  state: "idle", // idle | starting | connecting | streaming | closed | error
  framesSent: 0,
  framesReceived: 0,
  lastLatencyMs: null,
  lastServerMs: null,
  fps: 0,
  inFlight: 0,
  lastError: null,
  lastErrorCode: null,
  closeCode: null,
  streamId: null,
  viewUrl: null,
  transport: null, // "webrtc" | "ws": the transport of the current (or last) stream
  settingsVersion: null, // of the ready, then of the last ack
  latencyMeasure: null, // "end-to-end" (capture/encode -> shown), or null before the first measure
};
const api = {};
for (const key of Object.keys(state)) Object.defineProperty(api, key, { get: () => state[key], enumerable: true });
window.streamdiff = Object.freeze(api);

// The token comes from the page's query string (?token=...); it is kept for this tab and removed from the address
// bar so that it is not shared by accident. It is sent in the hello, never in a URL.
const params = new URLSearchParams(location.search);
if (params.has("token")) {
  sessionStorage.setItem("streamdiff-token", params.get("token"));
  params.delete("token");
  const query = params.toString();
  history.replaceState(null, "", location.pathname + (query ? `?${query}` : "") + location.hash);
}
const token = sessionStorage.getItem("streamdiff-token");

// The transport: WebRTC where the browser has it, unless ?transport=ws (or the select) says otherwise.
if (!rtcSupported()) els.transport.querySelector('option[value="webrtc"]').disabled = true;
els.transport.value = params.get("transport") === "ws" || !rtcSupported() ? "ws" : "webrtc";

// A view token kept across sessions, so an OBS Browser Source URL stays valid when this page reconnects.
let viewToken = localStorage.getItem("streamdiff-view-token");
if (!viewToken || !/^[A-Za-z0-9_-]{16,64}$/.test(viewToken)) {
  viewToken = randomToken(16);
  localStorage.setItem("streamdiff-view-token", viewToken);
}

let ws = null;
let rtc = null; // the WebRTC connection (rtc.js), in WebRTC mode
let mediaStream = null;
let running = false;
let nextFrameId = 0;
let nextRequestId = 1;
let maxInFlight = 2;
let minIntervalMs = 0;
let lastSentAt = -Infinity;
const inFlight = new Map(); // frame id -> capture time (performance.now())
let lostReported = 0; // frames the server said will get no output (stats: dropped + rate-limited + rejected)
let lostAccounted = 0; // of those, frames already forgotten because a later output answered them
const arrivals = []; // the last output arrival times (at most FPS_WINDOW, at most 5 s old), for fps
let latestOutput = null;
let drawing = false;
const outputCtx = els.output.getContext("2d");
const captureCtx = els.capture.getContext("2d", { willReadFrequently: false });

function setState(next, text) {
  state.state = next;
  els.status.dataset.state = next;
  els.status.textContent = text || next;
}

function showError(message, code = null) {
  state.lastError = message;
  state.lastErrorCode = code;
  els.error.textContent = message;
  els.error.hidden = false;
}

function clearError() {
  els.error.hidden = true;
  els.error.textContent = "";
}

function mediaErrorMessage(error, screen) {
  if (!navigator.mediaDevices) return "Camera and screen capture need HTTPS or localhost.";
  switch (error && error.name) {
    case "NotAllowedError":
      return screen ? "Screen sharing was cancelled or denied." : "Camera permission denied: allow the camera for this site and try again.";
    case "NotFoundError":
      return "No camera was found.";
    case "NotReadableError":
      return "The camera is in use by another program.";
    case "OverconstrainedError":
      return "The camera cannot deliver the requested size.";
    default:
      return `Could not start capture: ${error && error.message ? error.message : error}`;
  }
}

// -- start / stop --------------------------------------------------------------------------------------------------

async function start(screen) {
  stop();
  clearError();
  setState("starting", screen ? "choosing a screen" : "starting the camera");
  const size = Number(els.size.value);
  try {
    if (!navigator.mediaDevices) throw new Error("no mediaDevices");
    mediaStream = screen
      ? await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: 30 }, audio: false })
      : await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
  } catch (error) {
    setState("error", "capture failed");
    showError(mediaErrorMessage(error, screen), "media");
    return;
  }
  mediaStream.getVideoTracks().forEach((track) => track.addEventListener("ended", () => stop("capture ended")));
  els.input.srcObject = mediaStream;
  await els.input.play().catch(() => {});
  els.capture.width = size;
  els.capture.height = size;
  setControls(true);
  state.transport = els.transport.value;
  if (state.transport === "webrtc") connectWebRtc(size);
  else connect(size);
}

function stop(reason) {
  running = false;
  if (ws) {
    const socket = ws;
    ws = null;
    socket.onclose = null;
    if (socket.readyState <= WebSocket.OPEN) socket.close(1000, "client stopped");
  }
  if (rtc) {
    const connection = rtc;
    rtc = null;
    connection.close();
  }
  els.outputVideo.srcObject = null;
  if (mediaStream) mediaStream.getTracks().forEach((track) => track.stop());
  mediaStream = null;
  els.input.srcObject = null;
  inFlight.clear();
  state.inFlight = 0;
  setControls(false);
  if (state.state !== "error" && state.state !== "idle") setState("closed", reason || "stopped");
}

function setControls(active) {
  els.stop.disabled = !active;
  els.size.disabled = active;
  els.transport.disabled = active;
}

// -- the socket ------------------------------------------------------------------------------------------------------

function settingsFromControls(size) {
  return {
    width: size,
    height: size,
    prompt: els.prompt.value,
    negative_prompt: els.negativePrompt.value,
    strength: Number(els.strength.value),
    guidance_scale: Number(els.guidance.value),
    seed: Number(els.seed.value),
    output: { format: "jpeg", quality: 80 },
  };
}

function connect(size) {
  setState("connecting", "connecting");
  showOutput(false);
  lostReported = 0;
  lostAccounted = 0;
  const socket = new WebSocket(socketUrl("/ws"));
  socket.binaryType = "arraybuffer";
  ws = socket;
  socket.onopen = () => {
    const hello = { type: "hello", version: PROTOCOL_VERSION, client: "streamdiff-web/1", view_token: viewToken,
                    settings: settingsFromControls(size) };
    if (token) hello.token = token;
    socket.send(JSON.stringify(hello));
  };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") onText(event.data);
    else onOutput(event.data);
  };
  socket.onclose = (event) => {
    state.closeCode = event.code;
    if (ws === socket) ws = null;
    running = false;
    const message = describeClose(event.code, event.reason);
    if ((event.reason || "").startsWith("view_token_in_use:")) {
      // Another tab (or this page's previous connection) holds the viewer URL: this page takes a new one.
      viewToken = randomToken(16);
      localStorage.setItem("streamdiff-view-token", viewToken);
    }
    if (event.code !== 1000) showError(message, event.code);
    setState(event.code === 1000 ? "closed" : "error", event.code === 1000 ? "closed" : `closed (${event.code})`);
    stop(message);
  };
}

function onText(text) {
  let message;
  try {
    message = JSON.parse(text);
  } catch {
    showError("The server sent a message that is not JSON.");
    return;
  }
  if (message.type === "ready") {
    state.settingsVersion = message.settings_version;
    state.streamId = message.stream_id;
    els.streamId.textContent = message.stream_id;
    applyServerSettings(message.settings);
    const maxFps = message.limits && message.limits.max_input_fps;
    minIntervalMs = maxFps ? 1000 / maxFps : 0;
    ipAdapter = (message.limits && message.limits.ip_adapter) || "";
    els.imagePrompt.hidden = !ipAdapter;
    offerControlnets(message.limits && message.limits.controlnets, message.settings);
    if (message.view && message.view.url) {
      state.viewUrl = new URL(message.view.url, location.href).href;
      els.viewUrl.href = state.viewUrl;
      els.viewUrl.textContent = state.viewUrl;
      els.view.hidden = false;
    }
    setState("streaming", "streaming");
    running = true;
    if (ws) captureLoop(); // over WebRTC the camera's track is the input
    else els.imagePrompt.hidden = true; // reference images are binary messages: WebSocket mode only
  } else if (message.type === "ack") {
    state.settingsVersion = message.settings_version;
    applyServerSettings(message.settings);
  } else if (message.type === "stats") {
    lostReported = (message.frames_dropped || 0) + (message.frames_rate_limited || 0) + (message.frames_rejected || 0);
  } else if (message.type === "error") {
    const where = message.field ? ` [${message.field}]` : "";
    showError(`${message.message}${where}`, message.code);
  }
  // Other types (stats, future ones) are ignored.
}

function applyServerSettings(settings) {
  if (!settings || !Array.isArray(settings.t_index_list)) return;
  // Frames inside the server's Stream Batch: n steps x F frames; one more may be on the wire.
  maxInFlight = Math.max(2, settings.t_index_list.length * (settings.frame_buffer_size || 1) + 1);
}

// -- WebRTC ------------------------------------------------------------------------------------------------------------

function showOutput(video) {
  els.outputVideo.hidden = !video;
  els.output.hidden = video;
}

async function connectWebRtc(size) {
  setState("connecting", "connecting (WebRTC)");
  const track = mediaStream.getVideoTracks()[0];
  const settings = settingsFromControls(size);
  delete settings.output; // output is video over WebRTC
  let connection;
  try {
    connection = await connectRtc({
      track, settings, viewToken, token,
      handlers: {
        onMessage: onText,
        onTrack: (stream) => {
          els.outputVideo.srcObject = stream;
          els.outputVideo.play().catch(() => {});
        },
        onClose: (reason) => {
          if (rtc !== connection) return;
          rtc = null;
          running = false;
          showError(reason, "rtc_closed");
          setState("error", "closed");
          stop(reason);
        },
      },
    });
  } catch (error) {
    if ((error.status === 404 || error.status === 405) && mediaStream && mediaStream.getVideoTracks()[0] === track) {
      state.transport = "ws"; // a server without WebRTC (no aiortc): the WebSocket does the same
      connect(size);
      return;
    }
    if (error.status === 409) { // the viewer URL is taken (another tab): this page takes a new one
      viewToken = randomToken(16);
      localStorage.setItem("streamdiff-view-token", viewToken);
    }
    setState("error", error.status ? `refused (${error.status})` : "failed");
    showError(error.message, error.status || "rtc");
    stop(error.message);
    return;
  }
  if (!mediaStream || mediaStream.getVideoTracks()[0] !== track) {
    connection.close(); // stopped while connecting
    return;
  }
  rtc = connection;
  showOutput(true);
  watchVideoFrames(connection);
}

// Every frame the output <video> shows: fps, frames received and, by RTP timestamp, the end-to-end latency.
function watchVideoFrames(connection) {
  const video = els.outputVideo;
  if (!video.requestVideoFrameCallback) return;
  const onFrame = (now, metadata) => {
    if (rtc !== connection) return;
    state.framesReceived += 1;
    state.framesSent = connection.framesEncoded;
    arrivals.push(now);
    while (arrivals.length > FPS_WINDOW || now - arrivals[0] > 5000) arrivals.shift();
    state.fps = arrivals.length > 1 ? ((arrivals.length - 1) * 1000) / (now - arrivals[0]) : 0;
    const sentAt = metadata.rtpTimestamp !== undefined ? connection.sentAt(metadata.rtpTimestamp) : undefined;
    if (sentAt !== undefined) {
      state.lastLatencyMs = (metadata.presentationTime || now) - sentAt;
      state.latencyMeasure = "end-to-end";
      els.latency.textContent = state.lastLatencyMs.toFixed(0);
    }
    els.fps.textContent = state.fps.toFixed(1);
    els.framesReceived.textContent = state.framesReceived;
    els.framesSent.textContent = state.framesSent;
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

// -- sending frames ---------------------------------------------------------------------------------------------------

function nextVideoFrame() {
  return new Promise((resolve) => {
    if (els.input.requestVideoFrameCallback) els.input.requestVideoFrameCallback(() => resolve());
    else requestAnimationFrame(() => resolve());
  });
}

// Frames that may still get an output: lost frames the server reported do not count (docs/protocol.md).
function awaiting() {
  return inFlight.size - Math.max(0, lostReported - lostAccounted);
}

function dropStale(now) {
  for (const [id, capturedAt] of inFlight) if (now - capturedAt > STALE_MS) inFlight.delete(id);
  state.inFlight = inFlight.size;
}

async function captureLoop() {
  while (running && ws && ws.readyState === WebSocket.OPEN) {
    await nextVideoFrame();
    if (!running || !ws || ws.readyState !== WebSocket.OPEN) break;
    const now = performance.now();
    dropStale(now);
    if (awaiting() >= maxInFlight || ws.bufferedAmount > MAX_BUFFERED_BYTES) continue;
    if (now - lastSentAt < minIntervalMs) continue;
    const video = els.input;
    if (!video.videoWidth || !video.videoHeight) continue;
    drawCropped(video);
    const capturedAt = performance.now();
    const blob = await new Promise((resolve) => els.capture.toBlob(resolve, "image/jpeg", JPEG_QUALITY));
    if (!blob || !running || !ws || ws.readyState !== WebSocket.OPEN) continue;
    const body = await blob.arrayBuffer();
    const frameId = nextFrameId;
    nextFrameId = (nextFrameId + 1) >>> 0;
    ws.send(packInputFrame(frameId, capturedAt, body));
    lastSentAt = capturedAt;
    inFlight.set(frameId, capturedAt);
    state.inFlight = inFlight.size;
    state.framesSent += 1;
    els.framesSent.textContent = state.framesSent;
  }
}

function drawCropped(video) {
  // Centre crop to the stream's (square) aspect, scaled to the stream's size.
  const { width, height } = els.capture;
  const scale = Math.max(width / video.videoWidth, height / video.videoHeight);
  const sw = width / scale;
  const sh = height / scale;
  captureCtx.drawImage(video, (video.videoWidth - sw) / 2, (video.videoHeight - sh) / 2, sw, sh, 0, 0, width, height);
}

// -- receiving frames -------------------------------------------------------------------------------------------------

function onOutput(buffer) {
  let frame;
  try {
    frame = parseOutputFrame(buffer);
  } catch (error) {
    showError(`Bad output frame: ${error.message}`);
    return;
  }
  const now = performance.now();
  // Latest-wins on the server: every frame captured up to this one is answered or was dropped.
  let answered = 0;
  for (const [id, capturedAt] of inFlight) {
    if (capturedAt <= frame.clientTs) {
      inFlight.delete(id);
      answered += 1;
    }
  }
  lostAccounted += Math.max(0, answered - 1);
  state.inFlight = inFlight.size;
  state.lastLatencyMs = now - frame.clientTs;
  state.lastServerMs = frame.timings.serverMs;
  state.framesReceived += 1;
  arrivals.push(now);
  while (arrivals.length > FPS_WINDOW || now - arrivals[0] > 5000) arrivals.shift();
  state.fps = arrivals.length > 1 ? ((arrivals.length - 1) * 1000) / (now - arrivals[0]) : 0;
  els.latency.textContent = state.lastLatencyMs.toFixed(0);
  els.serverMs.textContent = state.lastServerMs.toFixed(0);
  els.fps.textContent = state.fps.toFixed(1);
  els.framesReceived.textContent = state.framesReceived;
  latestOutput = frame;
  if (!drawing) drawLatest();
}

async function drawLatest() {
  drawing = true;
  while (latestOutput) {
    const frame = latestOutput;
    latestOutput = null;
    try {
      const bitmap = await createImageBitmap(new Blob([frame.body], { type: frame.mimeType }));
      if (els.output.width !== bitmap.width || els.output.height !== bitmap.height) {
        els.output.width = bitmap.width;
        els.output.height = bitmap.height;
      }
      outputCtx.drawImage(bitmap, 0, 0);
      bitmap.close();
    } catch (error) {
      showError(`Could not decode an output frame: ${error.message}`);
    }
  }
  drawing = false;
}

// -- live updates -----------------------------------------------------------------------------------------------------

const pendingChanges = {};
let updateTimer = null;

function queueUpdate(changes, immediate = false) {
  Object.assign(pendingChanges, changes);
  clearTimeout(updateTimer);
  updateTimer = setTimeout(flushUpdate, immediate ? 0 : UPDATE_DELAY_MS);
}

function flushUpdate() {
  const open = (ws && ws.readyState === WebSocket.OPEN) || (rtc && rtc.open);
  if (!open || state.state !== "streaming") return;
  const settings = { ...pendingChanges };
  for (const key of Object.keys(pendingChanges)) delete pendingChanges[key];
  if (Object.keys(settings).length === 0) return;
  clearError();
  const text = JSON.stringify({ type: "update", request_id: nextRequestId++, settings });
  if (ws) ws.send(text);
  else rtc.send(text);
}

// The ControlNet picker: none or one of the server's ControlNets (Canny edges of the input, the protocol's default
// preprocessor) at the slider's weight; an update replaces the stream's whole list, so "none" sends [].
function controlnetChoice() {
  const name = els.controlnet.value;
  return name ? [{ name, scale: Number(els.controlnetScale.value) }] : [];
}

function showControlnetScale() {
  els.controlnetScaleValue.textContent = Number(els.controlnetScale.value).toFixed(2);
}

// On ready: the picker lists what this server offers (hidden when nothing). A choice made for an earlier stream that
// this server still offers is sent again; otherwise the picker shows what the stream uses.
function offerControlnets(names, settings) {
  controlnets = Array.isArray(names) ? names.filter((name) => typeof name === "string" && name) : [];
  const chosen = els.controlnet.value;
  els.controlnet.replaceChildren(new Option("none", ""), ...controlnets.map((name) => new Option(name, name)));
  els.controlnetPicker.hidden = controlnets.length === 0;
  const using = settings && Array.isArray(settings.controlnets) ? settings.controlnets : [];
  if (chosen && controlnets.includes(chosen)) {
    els.controlnet.value = chosen;
    queueUpdate({ controlnets: controlnetChoice() }, true);
  } else if (using.length > 0 && controlnets.includes(using[0].name)) {
    els.controlnet.value = using[0].name;
    if (Number.isFinite(using[0].scale)) els.controlnetScale.value = using[0].scale;
    showControlnetScale();
  } else {
    els.controlnet.value = "";
  }
}

// An image prompt: the update choosing the server's IP-Adapter goes first, then the image (JPEG, at most
// REFERENCE_SIDE px) as its own binary message; the server answers it with an ack (docs/protocol.md).
async function sendReference(file) {
  if (!file || !ipAdapter || !ws || ws.readyState !== WebSocket.OPEN || state.state !== "streaming") return;
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, REFERENCE_SIDE / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
  if (!blob || !ws || ws.readyState !== WebSocket.OPEN) return;
  Object.assign(pendingChanges, { ip_adapter: ipAdapter, ip_adapter_scale: Number(els.ipScale.value) });
  flushUpdate();
  ws.send(packReferenceImage(nextRequestId++, await blob.arrayBuffer()));
}

function onReference(file) {
  sendReference(file).catch((error) => showError(`The image prompt could not be sent: ${error.message}`));
}

els.reference.addEventListener("change", () => onReference(els.reference.files[0]));
els.imagePrompt.addEventListener("dragover", (event) => event.preventDefault());
els.imagePrompt.addEventListener("drop", (event) => {
  event.preventDefault();
  onReference(event.dataTransfer.files[0]);
});
els.ipScale.addEventListener("input", () => {
  els.ipScaleValue.textContent = Number(els.ipScale.value).toFixed(2);
  queueUpdate({ ip_adapter_scale: Number(els.ipScale.value) });
});
els.controlnet.addEventListener("change", () => queueUpdate({ controlnets: controlnetChoice() }, true));
els.controlnetScale.addEventListener("input", () => {
  showControlnetScale();
  if (els.controlnet.value) queueUpdate({ controlnets: controlnetChoice() });
});
els.prompt.addEventListener("input", () => queueUpdate({ prompt: els.prompt.value }));
els.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    queueUpdate({ prompt: els.prompt.value }, true);
  }
});
els.negativePrompt.addEventListener("input", () => queueUpdate({ negative_prompt: els.negativePrompt.value }));
els.strength.addEventListener("input", () => {
  els.strengthValue.textContent = Number(els.strength.value).toFixed(2);
  queueUpdate({ strength: Number(els.strength.value) });
});
els.guidance.addEventListener("input", () => {
  els.guidanceValue.textContent = Number(els.guidance.value).toFixed(1);
  queueUpdate({ guidance_scale: Number(els.guidance.value) });
});
els.seed.addEventListener("change", () => {
  const seed = Math.max(0, Math.floor(Number(els.seed.value) || 0));
  els.seed.value = seed;
  queueUpdate({ seed }, true);
});
els.randomSeed.addEventListener("click", () => {
  els.seed.value = crypto.getRandomValues(new Uint32Array(1))[0];
  queueUpdate({ seed: Number(els.seed.value) }, true);
});
els.startCamera.addEventListener("click", () => start(false));
els.startScreen.addEventListener("click", () => start(true));
els.stop.addEventListener("click", () => {
  stop("stopped");
  setState("idle", "idle");
});
els.copyView.addEventListener("click", () => {
  if (state.viewUrl && navigator.clipboard) navigator.clipboard.writeText(state.viewUrl).catch(() => {});
});
els.strengthValue.textContent = Number(els.strength.value).toFixed(2);
els.guidanceValue.textContent = Number(els.guidance.value).toFixed(1);
showControlnetScale();
if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) els.startScreen.disabled = true;
