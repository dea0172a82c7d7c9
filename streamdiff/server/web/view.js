// streamdiff view-only page: one stream's output, full window, on black (an OBS Browser Source).
// URL: /view.html?view=<view token>; the socket is /ws/view/<view token>. No controls; it sends nothing.
// It reconnects forever (OBS keeps the source open while the stream's page comes and goes). The status line shows
// only in an ordinary browser, never inside OBS, and only until the first frame.

import { describeClose, parseOutputFrame, socketUrl } from "./protocol.js";

const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 5000;
const FPS_WINDOW = 30; // frames the fps is averaged over

const output = document.getElementById("output");
const statusEl = document.getElementById("status");
const ctx = output.getContext("2d");
const viewToken = new URLSearchParams(location.search).get("view");
const inObs = typeof window.obsstudio !== "undefined";

const state = { state: "idle", framesReceived: 0, fps: 0, streamId: null, lastError: null, closeCode: null };
const api = {};
for (const key of Object.keys(state)) Object.defineProperty(api, key, { get: () => state[key], enumerable: true });
window.streamdiff = Object.freeze(api);

let retryMs = RETRY_MIN_MS;
let latest = null;
let drawing = false;
const arrivals = []; // the last output arrival times (at most FPS_WINDOW, at most 5 s old), for fps

function setState(next, text) {
  state.state = next;
  statusEl.dataset.state = next;
  statusEl.textContent = text || next;
  statusEl.hidden = inObs || (state.framesReceived > 0 && next === "viewing");
}

function connect() {
  setState("connecting", "connecting");
  const socket = new WebSocket(socketUrl(`/ws/view/${encodeURIComponent(viewToken)}`));
  socket.binaryType = "arraybuffer";
  socket.onmessage = (event) => {
    if (typeof event.data === "string") {
      try {
        const message = JSON.parse(event.data);
        if (message.type === "viewing") {
          state.streamId = message.stream_id;
          retryMs = RETRY_MIN_MS;
          setState("viewing", "waiting for frames");
        } else if (message.type === "error") {
          state.lastError = message.message;
        }
      } catch {
        state.lastError = "the server sent a message that is not JSON";
      }
      return;
    }
    onFrame(event.data);
  };
  socket.onclose = (event) => {
    state.closeCode = event.code;
    state.lastError = describeClose(event.code, event.reason);
    setState("waiting", `${state.lastError} Retrying...`);
    setTimeout(connect, retryMs);
    retryMs = Math.min(RETRY_MAX_MS, retryMs * 2);
  };
}

function onFrame(buffer) {
  let frame;
  try {
    frame = parseOutputFrame(buffer);
  } catch (error) {
    state.lastError = error.message;
    return;
  }
  const now = performance.now();
  state.framesReceived += 1;
  arrivals.push(now);
  while (arrivals.length > FPS_WINDOW || now - arrivals[0] > 5000) arrivals.shift();
  state.fps = arrivals.length > 1 ? ((arrivals.length - 1) * 1000) / (now - arrivals[0]) : 0;
  if (state.framesReceived === 1) setState("viewing", "viewing");
  latest = frame; // latest-wins: a slow decode never builds a queue
  if (!drawing) draw();
}

async function draw() {
  drawing = true;
  while (latest) {
    const frame = latest;
    latest = null;
    try {
      const bitmap = await createImageBitmap(new Blob([frame.body], { type: frame.mimeType }));
      if (output.width !== bitmap.width || output.height !== bitmap.height) {
        output.width = bitmap.width;
        output.height = bitmap.height;
      }
      ctx.drawImage(bitmap, 0, 0);
      bitmap.close();
    } catch (error) {
      state.lastError = `could not decode a frame: ${error.message}`;
    }
  }
  drawing = false;
}

if (!viewToken) {
  state.lastError = "missing view token: open /view.html?view=<view token>";
  setState("error", state.lastError);
  statusEl.hidden = false;
} else {
  connect();
}
