"""The Python client of the streamdiff protocol (docs/protocol.md).

- :mod:`.connection`: :class:`StreamClient`, one stream on a server (asyncio, ``websockets``);
- :mod:`.remote`: :class:`RemoteEngine`, an engine on a server behind the local engine's interface (``run --engine``);
- :mod:`.reconnect`: :class:`ReconnectingClient`, a stream that survives a replica going away (Ray fleets).
"""

from __future__ import annotations

from .connection import RequestFailed, ServerRefused, StreamClient, decode_output, stream_url

__all__ = ["RequestFailed", "ServerRefused", "StreamClient", "decode_output", "stream_url"]
