// The streamdiff wire format for browsers (docs/protocol.md): frame headers, URLs, close codes.
// Shared by the stream page (app.js) and the view-only page (view.js). No dependencies, no build step.

export const PROTOCOL_VERSION = 1;
export const INPUT_HEADER_SIZE = 20; // "SDFI", version, 3 reserved, uint32 frame_id, float64 client_ts
export const OUTPUT_HEADER_SIZE = 40; // "SDFO", version, format, uint16 settings_version, frame_id, client_ts, 5 x f32 ms
const INPUT_MAGIC = [0x53, 0x44, 0x46, 0x49]; // "SDFI"
const OUTPUT_MAGIC = [0x53, 0x44, 0x46, 0x4f]; // "SDFO"
const REFERENCE_MAGIC = [0x53, 0x44, 0x46, 0x52]; // "SDFR"
const MIME_TYPES = { 1: "image/jpeg", 2: "image/webp" };

/** One binary input message: the 20-byte big-endian header followed by the JPEG/WebP `body` (ArrayBuffer). */
export function packInputFrame(frameId, clientTs, body) {
  const out = new Uint8Array(INPUT_HEADER_SIZE + body.byteLength);
  const view = new DataView(out.buffer);
  out.set(INPUT_MAGIC, 0);
  view.setUint8(4, PROTOCOL_VERSION);
  view.setUint32(8, frameId >>> 0); // DataView is big-endian unless told otherwise
  view.setFloat64(12, clientTs);
  out.set(new Uint8Array(body), INPUT_HEADER_SIZE);
  return out.buffer;
}

/** One binary reference-image message (an image prompt): the input header with "SDFR" and `requestId`, then `body`. */
export function packReferenceImage(requestId, body) {
  const out = new Uint8Array(INPUT_HEADER_SIZE + body.byteLength);
  const view = new DataView(out.buffer);
  out.set(REFERENCE_MAGIC, 0);
  view.setUint8(4, PROTOCOL_VERSION);
  view.setUint32(8, requestId >>> 0);
  out.set(new Uint8Array(body), INPUT_HEADER_SIZE);
  return out.buffer;
}

/** Parse a binary output message (ArrayBuffer); throws Error on a malformed header. */
export function parseOutputFrame(buffer) {
  if (buffer.byteLength < OUTPUT_HEADER_SIZE) {
    throw new Error(`output frame of ${buffer.byteLength} bytes is shorter than its ${OUTPUT_HEADER_SIZE}-byte header`);
  }
  const view = new DataView(buffer);
  const magicOk = OUTPUT_MAGIC.every((b, i) => view.getUint8(i) === b);
  const mimeType = MIME_TYPES[view.getUint8(5)];
  if (!magicOk || view.getUint8(4) !== PROTOCOL_VERSION || mimeType === undefined) {
    throw new Error("output frame header is not SDFO version 1 with format 1 (JPEG) or 2 (WebP)");
  }
  return {
    frameId: view.getUint32(8),
    clientTs: view.getFloat64(12),
    settingsVersion: view.getUint16(6), // the ready's or ack's settings_version whose settings made this output
    mimeType,
    timings: {
      decodeMs: view.getFloat32(20),
      queueMs: view.getFloat32(24),
      engineMs: view.getFloat32(28),
      encodeMs: view.getFloat32(32),
      serverMs: view.getFloat32(36),
    },
    body: new Uint8Array(buffer, OUTPUT_HEADER_SIZE),
  };
}

/** ws:// or wss:// URL of `path` on the page's own host. */
export function socketUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

/** A random URL-safe token of `bytes` random bytes (view tokens). */
export function randomToken(bytes = 16) {
  const raw = crypto.getRandomValues(new Uint8Array(bytes));
  return btoa(String.fromCharCode(...raw)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** A sentence for a WebSocket close: code (RFC 6455) and the server's reason ("error_code: message"). */
export function describeClose(code, reason) {
  const errorCode = (reason || "").split(":", 1)[0];
  const detail = reason ? ` (${reason})` : "";
  switch (code) {
    case 1000:
      return reason ? `Closed: ${reason}` : "Closed.";
    case 1001:
      return errorCode === "idle_timeout"
        ? "Closed after a long time without frames; start again."
        : `The server is shutting down; try again in a moment${detail}.`;
    case 1002:
    case 1003:
    case 1007:
      return `The server refused a message${detail}.`;
    case 1006:
      return "Connection lost (network error or the server stopped).";
    case 1008:
      if (errorCode === "unauthorized") return "Bad or missing token: open this page with ?token=YOUR_TOKEN.";
      if (errorCode === "forbidden_origin") return "The server does not accept connections from this page's origin.";
      if (errorCode === "unknown_view_token") return "No stream has this view token (yet).";
      return `Closed by the server's policy${detail}.`;
    case 1009:
      return "A frame was too large for the server; choose a smaller size.";
    case 1011:
      return `Server error${detail}.`;
    case 1013:
      if (errorCode === "view_token_in_use") {
        return "Another tab or stream uses this page's viewer URL; this page made a new one: start again.";
      }
      return "The server is full: every stream slot is busy. Try again later.";
    default:
      return `Connection closed (code ${code})${detail}.`;
  }
}
