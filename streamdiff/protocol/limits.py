"""The server's limits: one frozen, validated dataclass with a safe default for each.

Every per-client resource is bounded here: message size, frame rate, pixels, what a client may ask the engine for,
how many mistakes it may make, and how long it may stay silent. ``ServerLimits()`` is safe for a public service;
loosen with ``dataclasses.replace(limits, max_width=2048)`` (validated again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from ..config import CfgMode, parse_size, to_enum
from ..errors import ConfigError
from .images import ImageFormat

__all__ = ["SERVER_ONLY", "ServerLimits"]

#: Limits a client does not need to know (left out of ``ready.limits``).
SERVER_ONLY = frozenset({"max_streams", "max_viewers_per_stream", "handshake_timeout_s", "write_timeout_s",
                         "close_timeout_s", "send_buffer_bytes", "max_queued_messages", "max_awaiting_hello",
                         "max_awaiting_hello_per_address", "max_connects_per_address_per_s",
                         "connect_burst_per_address", "abuse_cooldown_s"})


@dataclass(frozen=True)
class ServerLimits:
    """Limits of ``streamdiff serve``; every field has a safe default. Sizes in bytes, times in seconds.

    Connections: ``max_streams`` streaming clients at once (more are closed with 1013), ``max_viewers_per_stream``
    view-only pages per stream. Messages: ``max_message_bytes`` for any WebSocket message (1009 above it),
    ``max_text_bytes`` for a JSON message. Frames: at most ``max_input_fps`` per stream with bursts of
    ``input_burst_frames`` (more are dropped and counted), ``max_frame_pixels`` declared pixels per input image,
    formats ``allowed_input_formats``. What a client may request: ``max_width``/``max_height`` (multiples of
    ``size_multiple``), ``max_steps`` denoising steps, ``max_frame_buffer_size``, ``allowed_cfg_types``,
    ``max_prompt_chars`` per prompt, and, when ``sizes`` lists any, only those
    (``WIDTHxHEIGHT``; :meth:`for_engine` fills it from an engine with a size list). Misbehaviour: more than ``max_errors`` errors within ``error_window_s`` closes
    the connection (1008). Time: ``hello_timeout_s`` to send hello, ``idle_timeout_s`` without any message,
    WebSocket pings every ``ping_interval_s`` answered within ``ping_timeout_s``.

    Server-side only (not sent to clients): ``handshake_timeout_s`` for the HTTP/WebSocket opening handshake (a
    slowloris client is cut off), ``write_timeout_s`` for one message to leave (a client that stops reading is
    dropped), ``close_timeout_s`` for the closing handshake, ``send_buffer_bytes`` of kernel send buffer per socket
    and ``max_queued_messages`` received but not yet handled (reading pauses beyond it; ``streamdiff serve`` on
    aiohttp bounds its queue by bytes instead, ~128 KiB, and does not use it).

    Control and admission: at most ``max_control_per_s`` text messages (hello, update) per second per connection
    with bursts of ``control_burst`` (more are answered ``rate_limited``, which costs the error budget); of those,
    updates that rebuild the stream's state on the engine (size, frame_buffer_size, number of steps, cfg_type) at
    most ``max_reshape_per_s`` with bursts of ``reshape_burst``. Server-side only: at most ``max_awaiting_hello``
    stream sockets that have not sent their hello yet, ``max_awaiting_hello_per_address`` of them from one client
    address (more are refused with HTTP 503 before the WebSocket upgrade), and at most
    ``max_connects_per_address_per_s`` new stream sockets a second from one address, with bursts of
    ``connect_burst_per_address`` (a client that reconnects as fast as it is closed gets 503), and none for
    ``abuse_cooldown_s`` after one of its connections was closed for exhausting its error budget. Reading: at most
    ``max_messages_per_s`` messages of any kind per second per connection are read, with bursts of
    ``message_burst``; beyond that the server reads more slowly (TCP pushes back on the sender) rather than reading
    and dropping at full speed.
    Images (docs/protocol.md, "Image limits"): decoding one frame may use ``max_decode_ms`` of CPU time (stopped
    there: ``decode_too_slow``; a 1920x1080 JPEG takes 15-25 ms), and one client's decodes at most
    ``max_decode_share`` of one core over the last ``decode_window_s`` seconds (frames beyond it are refused
    undecoded: ``decode_too_slow``; 30 progressive 1920x1080 frames a second use about 0.65).
    Image prompts: ``ip_adapter`` names the IP-Adapter the server's engine has ('' none; :meth:`for_engine` fills
    it); a stream chooses it with its ``ip_adapter`` setting.
    ControlNets: ``controlnets`` names the ControlNets the server's engine offers, in the operator's order (none:
    ``()``; :meth:`for_engine` fills it); a stream chooses among them by name with its ``controlnets`` setting.
    """

    max_streams: int = 4
    max_viewers_per_stream: int = 4
    max_message_bytes: int = 1 << 20
    max_text_bytes: int = 16 << 10
    max_input_fps: float = 30.0
    input_burst_frames: int = 4
    max_frame_pixels: int = 1920 * 1080
    allowed_input_formats: tuple[ImageFormat, ...] = (ImageFormat.JPEG, ImageFormat.WEBP)
    max_width: int = 1024
    max_height: int = 1024
    size_multiple: int = 8
    max_steps: int = 4
    max_frame_buffer_size: int = 1
    allowed_cfg_types: tuple[CfgMode, ...] = (CfgMode.NONE, CfgMode.SELF, CfgMode.INITIALIZE)
    max_prompt_chars: int = 1000
    max_errors: int = 10
    error_window_s: float = 10.0
    hello_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    handshake_timeout_s: float = 10.0
    write_timeout_s: float = 10.0
    close_timeout_s: float = 5.0
    send_buffer_bytes: int = 512 << 10
    max_queued_messages: int = 4
    # control and admission
    max_control_per_s: float = 10.0
    control_burst: int = 30
    max_reshape_per_s: float = 0.5
    reshape_burst: int = 4
    max_awaiting_hello: int = 64
    max_awaiting_hello_per_address: int = 8
    max_messages_per_s: float = 120.0
    message_burst: int = 64
    max_connects_per_address_per_s: float = 4.0
    connect_burst_per_address: int = 32
    abuse_cooldown_s: float = 2.0
    sizes: tuple[str, ...] = ()
    # images
    max_decode_ms: float = 200.0
    max_decode_share: float = 0.75
    decode_window_s: float = 10.0
    # image prompts
    ip_adapter: str = ""
    # ControlNets
    controlnets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"ServerLimits.{f.name}={value!r} must be an integer >= 1")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value <= 0:
                    raise ConfigError(f"ServerLimits.{f.name}={value!r} must be a finite number > 0")
                object.__setattr__(self, f.name, float(value))
        object.__setattr__(self, "allowed_input_formats",
                           _enum_tuple(ImageFormat, self.allowed_input_formats, "allowed_input_formats"))
        object.__setattr__(self, "allowed_cfg_types", _enum_tuple(CfgMode, self.allowed_cfg_types, "allowed_cfg_types"))
        if not isinstance(self.ip_adapter, str):
            raise ConfigError(f"ServerLimits.ip_adapter={self.ip_adapter!r} must be a name ('' for none)")
        if isinstance(self.controlnets, (str, bytes)) or not hasattr(self.controlnets, "__iter__"):
            raise ConfigError(f"ServerLimits.controlnets={self.controlnets!r} must be a list of ControlNet names")
        object.__setattr__(self, "controlnets", tuple(dict.fromkeys(self.controlnets)))
        if not all(isinstance(name, str) and name for name in self.controlnets):
            raise ConfigError(f"ServerLimits.controlnets={self.controlnets!r} must be a list of ControlNet names")
        if isinstance(self.sizes, (str, bytes)) or not hasattr(self.sizes, "__iter__"):
            raise ConfigError(f"ServerLimits.sizes={self.sizes!r} must be a list of WIDTHxHEIGHT sizes")
        object.__setattr__(self, "sizes", tuple(dict.fromkeys("{}x{}".format(*parse_size(v, "ServerLimits.sizes entry"))
                                                              for v in self.sizes)))
        if self.max_text_bytes > self.max_message_bytes:
            raise ConfigError(f"ServerLimits.max_text_bytes={self.max_text_bytes} is more than "
                              f"max_message_bytes={self.max_message_bytes}")
        if self.max_awaiting_hello_per_address > self.max_awaiting_hello:
            raise ConfigError(f"ServerLimits.max_awaiting_hello_per_address={self.max_awaiting_hello_per_address} is "
                              f"more than max_awaiting_hello={self.max_awaiting_hello}")
        for name in ("max_width", "max_height"):
            if getattr(self, name) < self.size_multiple:
                raise ConfigError(f"ServerLimits.{name}={getattr(self, name)} is less than "
                                  f"size_multiple={self.size_multiple}")

    def for_engine(self, engine: Any) -> ServerLimits:
        """These limits narrowed to the frame sizes ``engine`` runs (:attr:`StreamEngine.size_rule`), so that clients
        see them in ``ready`` and a hello asking for another size is refused before the engine is asked:
        ``size_multiple`` becomes a multiple of the engine's, ``max_width``/``max_height`` at most its largest side,
        and ``sizes`` the engine's list when it has one; ``ip_adapter`` and ``controlnets`` name the IP-Adapter and the
        ControlNets it has."""
        multiple = math.lcm(self.size_multiple, engine.size_multiple)
        listed = engine.allowed_sizes
        largest = {"max_width": max(w for w, _ in listed) if listed else engine.size_range[1],
                   "max_height": max(h for _, h in listed) if listed else engine.size_range[1]}
        caps = {name: max(multiple, min(getattr(self, name), side) // multiple * multiple)
                for name, side in largest.items()}
        sizes = tuple(f"{w}x{h}" for w, h in listed) if listed else self.sizes
        adapter = getattr(getattr(engine, "model", None), "ip_adapter", None)
        controlnets = tuple(getattr(engine, "controlnets", None) or ())
        return replace(self, size_multiple=multiple, sizes=sizes, ip_adapter=adapter.name if adapter else "",
                       controlnets=controlnets, **caps)

    def to_json(self) -> dict[str, Any]:
        """The limits a client needs to know, as sent in ``ready`` (docs/protocol.md, "Limits")."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in SERVER_ONLY:
                continue
            value = getattr(self, f.name)
            out[f.name] = [getattr(v, "value", v) for v in value] if isinstance(value, tuple) else value
        return out


def _enum_tuple(enum_cls: Any, values: Any, name: str) -> tuple[Any, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"ServerLimits.{name}={values!r} must be a list of values")
    out = tuple(dict.fromkeys(to_enum(enum_cls, v, name) for v in values))
    if not out:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"ServerLimits.{name} is empty; give at least one of {allowed}")
    return out
