"""WebRTC for ``streamdiff serve``: WHIP ingest (OBS 30+, ffmpeg, GStreamer, browsers), WHEP playback, ``sendrecv``
peers with a data channel (docs/webrtc.md).

- :mod:`.config`: :class:`RtcConfig` (``--rtc-host``, SDP size, codecs, connect timeout);
- :mod:`.signaling`: sans I/O: offer checks, WHIP URL query → settings, bearer tokens, the resource table;
- :mod:`.jitter`: received video frames leave the jitter buffer at their marked (last) packet, not one frame later;
- :mod:`.media`: a video track's newest frames into the session, the session's outputs as a video track;
- :mod:`.peer`: ICE gathering on chosen addresses, the data-channel :class:`PeerTransport`, a peer's life cycle;
- :mod:`.whip`: :class:`RtcFront`, WHIP/WHEP's requests for the server's one application (:mod:`..asgi`).

aiortc is imported only when a peer connects.
"""

from __future__ import annotations

from .config import RtcConfig
from .whip import RtcFront

__all__ = ["RtcConfig", "RtcFront"]
