// The stream page's WebRTC transport (docs/webrtc.md): one RTCPeerConnection to POST /whip that sends the camera's
// track, receives the output track (sendrecv) and opens a data channel for the protocol's JSON messages.
//
// End-to-end latency: the server gives each output frame the RTP timestamp of the input frame it came from. Where
// the browser has the (legacy) encoded-transform API, the page records when each of its frames left the encoder,
// by RTP timestamp, and `requestVideoFrameCallback` on the output <video> gives each displayed frame's RTP timestamp
// and presentation time: latency = shown - encoded (the capture → encoder step is not counted; a few ms). The
// server's receiver counts RTP timestamps from the first frame it got (aiortc), so the output's RTP timestamp is the
// input's minus the first input's: the page keys its frames the same way.

const GATHER_TIMEOUT_MS = 3000; // send the offer with what was gathered by then (host candidates take ~ms)
const SENT_KEPT = 600; // RTP timestamps of sent frames remembered (20 s at 30 fps)

/** Whether this browser can stream over WebRTC. */
export function rtcSupported() {
  return typeof RTCPeerConnection === "function";
}

/** Whether the page can measure end-to-end latency (the legacy encoded-transform API, Chromium). */
export function encodedTransformSupported() {
  return typeof RTCRtpSender !== "undefined" && typeof RTCRtpSender.prototype.createEncodedStreams === "function";
}

/** The WHIP URL of `settings` (docs/webrtc.md, "WHIP URL parameters"): flat settings only, lists comma-separated. */
export function whipUrl(settings, viewToken) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(settings)) {
    if (value === undefined || value === null || typeof value === "object" && !Array.isArray(value)) continue;
    query.set(key, Array.isArray(value) ? value.join(",") : String(value));
  }
  if (viewToken) query.set("view_token", viewToken);
  return `/whip?${query}`;
}

function waitForGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

// Pipe an encoded stream through unchanged, calling `see(frame)` on each frame.
function passThrough(streams, see) {
  const transform = new TransformStream({
    transform(frame, controller) {
      if (see) see(frame);
      controller.enqueue(frame);
    },
  });
  streams.readable.pipeThrough(transform).pipeTo(streams.writable).catch(() => {});
}

/**
 * Connect: `track` (the camera's) is sent; `handlers.onMessage(text)` gets the data channel's messages,
 * `handlers.onTrack(stream)` the output, `handlers.onClose(reason)` the end. Resolves to the connection
 * (`send(text)`, `close()`, `sentAt(rtpTimestamp)`, `stats()`), or rejects with an Error whose `status` is the HTTP
 * status of a refused offer.
 */
export async function connectRtc({ track, settings, viewToken, token, handlers }) {
  const measure = encodedTransformSupported();
  const pc = new RTCPeerConnection(measure ? { encodedInsertableStreams: true } : {});
  const sent = new Map(); // RTP timestamp - origin -> performance.now() when the frame left the encoder
  let origin = null; // the RTP timestamp of the first encoded frame
  let framesEncoded = 0;
  let location = null;
  let closed = false;

  const sender = pc.addTransceiver(track, { direction: "sendrecv" }).sender;
  if (measure) {
    passThrough(sender.createEncodedStreams(), (frame) => {
      framesEncoded += 1;
      if (origin === null) origin = frame.timestamp;
      sent.set((frame.timestamp - origin) >>> 0, performance.now());
      if (sent.size > SENT_KEPT) sent.delete(sent.keys().next().value);
    });
  }
  pc.addEventListener("track", (event) => {
    if (measure) passThrough(event.receiver.createEncodedStreams(), null); // Chromium stalls unless piped through
    handlers.onTrack(event.streams[0] || new MediaStream([event.track]));
  });
  const channel = pc.createDataChannel("streamdiff");
  channel.addEventListener("message", (event) => {
    if (typeof event.data === "string") handlers.onMessage(event.data);
  });

  const finish = (reason) => {
    if (closed) return;
    closed = true;
    pc.close();
    handlers.onClose(reason);
  };
  pc.addEventListener("connectionstatechange", () => {
    if (pc.connectionState === "failed") finish("The WebRTC connection failed (no route to the server's UDP ports?).");
    else if (pc.connectionState === "closed") finish("The WebRTC connection closed.");
  });
  channel.addEventListener("close", () => finish("The server closed the stream."));

  await pc.setLocalDescription(await pc.createOffer());
  await waitForGathering(pc);
  const headers = { "Content-Type": "application/sdp" };
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(whipUrl(settings, viewToken), { method: "POST", headers, body: pc.localDescription.sdp });
  } catch (error) {
    pc.close();
    throw new Error(`The WHIP request failed: ${error.message}`);
  }
  const body = await response.text();
  if (response.status !== 201) {
    pc.close();
    const error = new Error(body.trim() || `WHIP answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  location = response.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: body });

  return {
    pc,
    measured: measure,
    get framesEncoded() {
      return framesEncoded;
    },
    get open() {
      return !closed && channel.readyState === "open";
    },
    send(text) {
      if (closed || channel.readyState !== "open") return false;
      channel.send(text);
      return true;
    },
    sentAt(rtpTimestamp) {
      return sent.get(rtpTimestamp);
    },
    // Ends the stream: DELETE the resource (its slot is freed at once), then close the connection.
    close() {
      if (closed) return;
      closed = true;
      if (location) {
        const del = { method: "DELETE", headers: token ? { Authorization: `Bearer ${token}` } : {}, keepalive: true };
        fetch(location, del).catch(() => {});
      }
      pc.close();
    },
  };
}
