"""Benchmark the transports of ``streamdiff serve``: WebSocket (JPEG) vs WebRTC (aiortc, H.264), same clip, same model.

One ``streamdiff serve`` process (the built-in trained ``tiny`` model, empty prompt, cfg ``none``: an output is a
function of its input frame alone, so PSNR of a received output against the engine's own output for the clean input
frame, computed here, measures what the transport lost both ways; ``--rtc-host 127.0.0.1``) and, in
interleaved rounds (ws rtc, then rtc ws, …), one client of each kind sending the same moving test pattern at 30
frames/s (a paced source: a frame captured while ``--window`` frames await their output is skipped, as the page does):

- ``ws``: :class:`streamdiff.client.StreamClient`, input JPEG at ``--jpeg-quality`` (90, the client's default),
  output JPEG at the server's default quality (80); bytes per frame are the binary messages' sizes (header + JPEG)
  each way; an output is matched to its input by frame id.
- ``chromium`` (``--transports ws rtc chromium``): the stream page over WebRTC in headless Chromium (playwright and
  Debian's Chromium; the clip as the fake camera): the page's own latency (encoder out → shown), fps; no bytes, PSNR.
- ``rtc``: an aiortc peer (``sendrecv`` video, H.264, ICE on 127.0.0.1 only, RTP timestamps from 0) to ``POST
  /whip``; its receiver hands a frame to the decoder at the frame's marked (last) packet, as the server's does
  (:mod:`streamdiff.server.rtc.jitter`); ``rtc-aiortc-buffer``: the same peer with aiortc's own buffer, which
  hands a frame over only at the next frame's first packet (the client side of that change, A/B in one run);
  bytes per frame from ``getStats()`` (outbound ``bytesSent`` over frames sent, and the same count of
  received RTP payload bytes over frames received: RTP payloads, without RTP/SRTP/UDP/IP headers); an output is matched to its input by RTP timestamp.
  The server encodes its output at constant quality (``rtc_quality``, a crf; ``--rtc-quality`` here);
  ``rtc-aiortc-encoder``: the same peer against a second server whose output goes through aiortc's own encoder
  (a bitrate from the receiver's estimate, at least 500 kbit/s): the two encoders A/B in one run.

Per transport, the median over rounds of: end-to-end latency p50/p95 (input handed to the encoder/socket → output
decoded here), output frames/s, bytes per frame each way, PSNR (dB) of outputs against the engine's own output for
the clean input.

    python tools/bench_transport.py                           # 3 rounds of 10 s each: table + JSON
    python tools/bench_transport.py --rounds 1 --seconds 2 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from streamdiff.bench.harness import write_json
from streamdiff.client import StreamClient
from streamdiff.io.sources import pattern_frame
from streamdiff.protocol.images import encode
from streamdiff.server.rtc.jitter import use_marker_jitter_buffer
from streamdiff.testing.serve import ServeProcess

FPS = 30.0
PTS_STEP = 3000  # 90 kHz RTP clock at 30 frames/s
INPUT_HEADER, OUTPUT_HEADER = 20, 40  # bytes of the WebSocket frame headers (docs/protocol.md)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(latencies: list[float], outputs: int, seconds: float, sent_bytes: float, sent_frames: int,
            received_bytes: float, psnrs: list[float]) -> dict[str, Any]:
    return {"e2e_p50_ms": percentile(latencies, 50), "e2e_p95_ms": percentile(latencies, 95),
            "fps": outputs / seconds, "outputs": outputs, "inputs": sent_frames,
            "bytes_per_input_frame": sent_bytes / max(1, sent_frames),
            "bytes_per_output_frame": received_bytes / max(1, outputs),
            "psnr_db": float(np.median(psnrs)) if psnrs else float("nan")}


class Pacer:
    """The clip's frame index due now at FPS (a live source), and whether a new one is due."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.index = -1

    async def next(self) -> int:
        self.index += 1
        due = self.start + self.index / FPS
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        return self.index


async def ws_round(url: str, clip: list[np.ndarray], reference: list[np.ndarray], size: int, quality: int,
                   output_quality: int, warmup: float, seconds: float,
                   window: int) -> dict[str, Any]:
    client = await StreamClient.connect(url, {"width": size, "height": size, "prompt": "",
                                              "output": {"format": "jpeg", "quality": output_quality}})
    bodies = [encode(frame, "jpeg", quality) for frame in clip]
    waiting: dict[int, tuple[float, int]] = {}  # frame id -> (sent perf_counter, clip index)
    measure_from = time.perf_counter() + warmup
    end = measure_from + seconds
    latencies: list[float] = []
    psnrs: list[float] = []
    sent_bytes = received_bytes = 0
    sent_frames = outputs = 0
    pacer = Pacer()
    try:
        while time.perf_counter() < end and not client.closed.is_set():
            now = time.perf_counter()
            while client.outputs:
                out = client.outputs.popleft()
                entry = waiting.get(out.frame_id)
                for frame_id in [f for f in waiting if f <= out.frame_id]:
                    del waiting[frame_id]
                if entry is None or entry[0] < measure_from:
                    continue
                latencies.append((now - entry[0]) * 1000)
                outputs += 1
                received_bytes += OUTPUT_HEADER + len(out.body)
                psnrs.append(psnr(np.asarray(Image.open(io.BytesIO(out.body)).convert("RGB")), reference[entry[1]]))
            for frame_id in [f for f, (t, _) in waiting.items() if now - t > 3.0]:
                del waiting[frame_id]
            index = await pacer.next()
            if len(waiting) >= window:
                continue
            body = bodies[index % len(bodies)]
            frame_id = await client.send_frame(body, frame_id=index)
            sent_at = time.perf_counter()
            waiting[frame_id] = (sent_at, index % len(bodies))
            if sent_at >= measure_from:
                sent_frames += 1
                sent_bytes += INPUT_HEADER + len(body)
    finally:
        await client.close()
    return summary(latencies, outputs, seconds, sent_bytes, sent_frames, received_bytes, psnrs)


async def rtc_round(http_url: str, clip: list[np.ndarray], reference: list[np.ndarray], size: int, warmup: float,
                    seconds: float, marker_buffer: bool = True) -> dict[str, Any]:
    from aiohttp import ClientSession
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription, VideoStreamTrack
    from aiortc.mediastreams import MediaStreamError
    from av import VideoFrame

    from streamdiff.server.rtc.media import keep_rtp_timestamps
    from streamdiff.server.rtc.peer import gather_on

    sent: dict[int, tuple[float, int]] = {}  # pts -> (handed to the encoder, clip index)

    class ClipTrack(VideoStreamTrack):
        def __init__(self) -> None:
            super().__init__()
            self.pacer: Pacer | None = None

        async def recv(self) -> VideoFrame:
            if self.readyState != "live":
                raise MediaStreamError
            self.pacer = self.pacer or Pacer()
            index = await self.pacer.next()
            frame = VideoFrame.from_ndarray(clip[index % len(clip)], format="rgb24")
            frame.pts, frame.time_base = index * PTS_STEP, Fraction(1, 90000)
            sent[frame.pts] = (time.perf_counter(), index % len(clip))
            return frame

    received: list[tuple[float, int, np.ndarray]] = []

    async def collect(track: Any) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                received.append((time.perf_counter(), frame.pts, frame.to_ndarray(format="rgb24")))

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    transceiver = pc.addTransceiver(ClipTrack(), direction="sendrecv")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                     if c.mimeType.lower() == "video/h264"])
    keep_rtp_timestamps(transceiver.sender)
    count_received(transceiver.receiver)
    if marker_buffer:
        use_marker_jitter_buffer(transceiver.receiver)
    tasks: list[asyncio.Task[Any]] = []
    pc.on("track", lambda track: tasks.append(asyncio.ensure_future(collect(track))))
    with gather_on(("127.0.0.1",)):
        await pc.setLocalDescription(await pc.createOffer())
    async with ClientSession() as http:
        query = f"/whip?width={size}&height={size}&prompt="
        async with http.post(http_url + query, data=pc.localDescription.sdp.encode(),
                             headers={"Content-Type": "application/sdp"}) as response:
            answer = await response.text()
            if response.status != 201:
                raise RuntimeError(f"WHIP answered {response.status}: {answer}")
            location = response.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        try:
            await asyncio.sleep(warmup)
            before, first_pts = await rtc_bytes(pc), max(sent, default=-1)
            measure_from, first_out = time.perf_counter(), len(received)
            await asyncio.sleep(seconds)
            after, last_pts = await rtc_bytes(pc), max(sent, default=-1)
            window = received[first_out:]
        finally:
            with contextlib.suppress(Exception):
                async with http.delete(http_url + location):
                    pass
            await pc.close()
            for task in tasks:
                task.cancel()
    latencies = [(t - sent[pts][0]) * 1000 for t, pts, _ in window if pts in sent and sent[pts][0] >= measure_from]
    psnrs = [psnr(image, reference[sent[pts][1]]) for _, pts, image in window if pts in sent]
    sent_frames = (last_pts - first_pts) // PTS_STEP
    return summary(latencies, len(window), seconds, after[0] - before[0], sent_frames, after[1] - before[1], psnrs)


async def rtc_bytes(pc: Any) -> tuple[int, int]:
    """(bytes sent, bytes received) of the peer's video RTP payloads so far (aiortc's outbound ``bytesSent`` counts
    payload octets; its inbound stats have no byte count, so :func:`count_received` counts the same way)."""
    report = await pc.getStats()
    out = sum(s.bytesSent for s in report.values() if s.type == "outbound-rtp")
    return out, sum(getattr(t.receiver, "payload_bytes", 0) for t in pc.getTransceivers())


def count_received(receiver: Any) -> None:
    """Count the RTP payload bytes ``receiver`` (an aiortc ``RTCRtpReceiver``) gets, as ``receiver.payload_bytes``."""
    handle = receiver._handle_rtp_packet
    receiver.payload_bytes = 0

    async def counted(packet: Any, arrival_time_ms: int) -> None:
        receiver.payload_bytes += len(packet.payload)
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = counted


async def effective_settings(url: str, size: int) -> dict[str, Any]:
    """The settings the server gives a stream of this benchmark (its ``ready``)."""
    client = await StreamClient.connect(url, {"width": size, "height": size, "prompt": ""})
    try:
        return client.ready.settings.to_json()
    finally:
        await client.close()


def reference_outputs(model: str, settings: dict[str, Any], clip: list[np.ndarray]) -> list[np.ndarray]:
    """The engine's own output for every clip frame, in this process, with the stream's settings (cfg ``none``: an
    output is a function of its input frame alone; the Stream Batch is filled by running the clip's start again)."""
    from streamdiff import StreamConfig, StreamPipeline

    config = StreamConfig(width=settings["width"], height=settings["height"], t_index_list=settings["t_index_list"],
                          num_inference_steps=settings["num_inference_steps"],
                          frame_buffer_size=settings["frame_buffer_size"], cfg_type=settings["cfg_type"])
    pipe = StreamPipeline.from_pretrained(model, config, device="cpu")
    pipe.prepare(settings["prompt"], settings["negative_prompt"], settings["guidance_scale"], settings["delta"],
                 settings["seed"])
    fill = len(config.t_index_list) * config.frame_buffer_size
    outputs = [out for frame in clip + clip[:fill] for out in [pipe(frame)] if out is not None]
    pipe.close()
    return outputs[:len(clip)]


def write_y4m(path: str, clip: list[np.ndarray]) -> None:
    """The clip as a 30 fps 4:2:0 Y4M file (BT.601 studio range): Chromium's fake camera plays it in a loop."""
    height, width = clip[0].shape[:2]
    parts = [f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1 C420jpeg\n".encode()]
    for frame in clip:
        r, g, b = (frame[..., i].astype(np.float32) for i in range(3))
        y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
        u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
        v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
        half = (height // 2, 2, width // 2, 2)
        planes = [y, u.reshape(half).mean((1, 3)), v.reshape(half).mean((1, 3))]
        parts.append(b"FRAME\n" + b"".join(np.clip(p.round(), 0, 255).astype(np.uint8).tobytes() for p in planes))
    Path(path).write_bytes(b"".join(parts))


def chromium_round(http_url: str, clip_path: str, size: int, warmup: float, seconds: float,
                   chromium: str) -> dict[str, Any]:
    """The stream page in headless Chromium over WebRTC (its default): the page's own end-to-end latency (encoder
    out → shown, by RTP timestamp) sampled at every shown frame; no bytes or PSNR (not exposed by the page)."""
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-video-capture={clip_path}", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--autoplay-policy=no-user-gesture-required"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_context(permissions=["camera"]).new_page()
            page.goto(http_url + "/")
            page.select_option("#size", str(size))
            page.click("#start-camera")
            page.wait_for_function("() => window.streamdiff.framesReceived > 0", timeout=60_000)
            if page.evaluate("() => window.streamdiff.transport") != "webrtc":
                raise RuntimeError("the page did not stream over WebRTC")
            page.wait_for_timeout(warmup * 1000)
            # a page-side sampler: one latency per shown frame
            page.evaluate("""() => { window.__samples = []; let last = window.streamdiff.framesReceived;
              const v = document.getElementById("output-video");
              const tick = () => { const s = window.streamdiff; if (s.framesReceived !== last) {
                last = s.framesReceived; if (s.lastLatencyMs !== null) window.__samples.push(s.lastLatencyMs); }
                v.requestVideoFrameCallback(tick); }; v.requestVideoFrameCallback(tick); }""")
            page.wait_for_timeout(seconds * 1000)
            samples = page.evaluate("() => window.__samples")
            page.click("#stop")
        finally:
            browser.close()
    return {"e2e_p50_ms": percentile(samples, 50), "e2e_p95_ms": percentile(samples, 95),
            "fps": len(samples) / seconds, "outputs": len(samples), "inputs": float("nan"),
            "bytes_per_input_frame": float("nan"), "bytes_per_output_frame": float("nan"), "psnr_db": float("nan")}


def options_file(folder: str, name: str, rtc_quality: str) -> str:
    """A ``streamdiff serve --config`` TOML file setting ``rtc_quality`` (a crf, or ``aiortc``)."""
    path = os.path.join(folder, f"{name}.toml")
    value = rtc_quality if rtc_quality.strip().isdigit() else f'"{rtc_quality}"'
    Path(path).write_text(f"rtc_quality = {value}\n")
    return path


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["transport | e2e p50 ms | e2e p95 ms | fps out | bytes/input frame | bytes/output frame | PSNR dB",
             "---|---|---|---|---|---|---"]
    for name, r in rows.items():
        lines.append(f"{name} | {r['e2e_p50_ms']:.0f} | {r['e2e_p95_ms']:.0f} | {r['fps']:.1f} | "
                     f"{r['bytes_per_input_frame']:.0f} | {r['bytes_per_output_frame']:.0f} | {r['psnr_db']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per transport (default 3)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring, per round")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds measured per round")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="the WebSocket client's input JPEG quality")
    parser.add_argument("--output-quality", type=int, default=80,
                        help="the WebSocket stream's output JPEG quality (80, the server's default)")
    parser.add_argument("--window", type=int, default=3, help="WebSocket frames awaiting their output at most")
    parser.add_argument("--rtc-quality", default=None,
                        help="the server's WebRTC output crf (its rtc_quality option; default: the server's)")
    parser.add_argument("--transports", nargs="+", default=["ws", "rtc"],
                        choices=["ws", "rtc", "rtc-aiortc-buffer", "rtc-aiortc-encoder", "chromium"],
                        help="chromium: the stream page over WebRTC in headless Chromium (needs playwright)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable")
    parser.add_argument("--still", action="store_true",
                        help="send the test pattern's first frame only (a still camera) instead of the moving clip")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    clip = [pattern_frame(0 if args.still else i, args.size, args.size) for i in range(30)]  # 1 s, looped
    serve_args = ["--model", args.model, "--size", f"{args.size}x{args.size}", "--max-streams", "2",
                  "--cfg-type", "none", "--rtc-host", "127.0.0.1", "--stats-interval", "1"]
    rounds: dict[str, list[dict[str, Any]]] = {t: [] for t in args.transports}
    started = time.monotonic()
    folder = tempfile.mkdtemp(prefix="bench-transport-")
    clip_path = os.path.join(folder, "clip.y4m")
    write_y4m(clip_path, clip)
    with contextlib.ExitStack() as stack:
        quality = [] if args.rtc_quality is None else ["--config", options_file(folder, "quality", args.rtc_quality)]
        server = stack.enter_context(ServeProcess(*serve_args, *quality))
        aiortc_server = stack.enter_context(ServeProcess(*serve_args, "--config",
                                                         options_file(folder, "aiortc", "aiortc"))) \
            if "rtc-aiortc-encoder" in args.transports else None
        settings = asyncio.run(effective_settings(server.url, args.size))
        reference = reference_outputs(args.model, settings, clip)
        for r in range(args.rounds):
            for name in args.transports if r % 2 == 0 else args.transports[::-1]:
                if name == "ws":
                    result = asyncio.run(ws_round(server.url, clip, reference, args.size, args.jpeg_quality,
                                                  args.output_quality, args.warmup,
                                                  args.seconds, args.window))
                elif name == "chromium":
                    result = chromium_round(server.http_url, clip_path, args.size, args.warmup, args.seconds,
                                            args.chromium)
                else:
                    url = aiortc_server.http_url if name == "rtc-aiortc-encoder" and aiortc_server else server.http_url
                    result = asyncio.run(rtc_round(url, clip, reference, args.size, args.warmup,
                                                   args.seconds, marker_buffer=name != "rtc-aiortc-buffer"))
                rounds[name].append(result)
                print(f"round {r + 1} {name}: p50 {result['e2e_p50_ms']:.0f} ms, {result['fps']:.1f} fps, "
                      f"{result['bytes_per_output_frame']:.0f} B/output frame, {result['psnr_db']:.1f} dB",
                      file=sys.stderr)
    rows = {name: {key: statistics.median(r[key] for r in results) if not math.isnan(results[0][key])
                   else float("nan") for key in results[0]}
            for name, results in rounds.items()}
    report = {"benchmark": "transport", "size": args.size, "model": args.model, "fps_in": FPS,
              "warmup_s": args.warmup, "seconds": args.seconds, "jpeg_quality": args.jpeg_quality,
              "output_quality": args.output_quality, "rtc_quality": args.rtc_quality, "still": args.still,
              "load_average": os.getloadavg(), "python": platform.python_version(),
              "elapsed_s": time.monotonic() - started, "results": rows, "rounds": rounds}
    if "ws" in rows and "rtc" in rows:
        ws, rtc = rows["ws"], rows["rtc"]
        report["bytes_ratio_rtc_to_ws"] = {
            "input": rtc["bytes_per_input_frame"] / ws["bytes_per_input_frame"],
            "output": rtc["bytes_per_output_frame"] / ws["bytes_per_output_frame"]}
        report["psnr_difference_db"] = rtc["psnr_db"] - ws["psnr_db"]
    if "ws" in rows:
        report["output_bytes_ratio_to_ws"] = {name: row["bytes_per_output_frame"] / rows["ws"]["bytes_per_output_frame"]
                                             for name, row in rows.items() if name != "ws"
                                             and not math.isnan(row["bytes_per_output_frame"])}
    print(format_table(rows))
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
