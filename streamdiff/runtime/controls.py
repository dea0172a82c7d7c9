"""Live controls of a running stream: settings changes, pause, stop, strength and filter toggles.

Any thread (a window's key handler, a terminal reading prompts, a server) calls these methods. Changes go straight
to the stream's :meth:`~streamdiff.engine.Stream.update`, which validates them in the caller's thread (an invalid one
raises :class:`~streamdiff.errors.ConfigError` there and changes nothing) and has the engine apply them between two
ticks. Nothing here touches the model.
"""

from __future__ import annotations

import threading
from typing import Any

from ..config import FilterConfig, StreamConfig, parse_int_list, parse_size, t_index_list_for_strength

STRENGTH_STEP = 0.05
MIN_STRENGTH = 0.05


class Controls:
    """Thread-safe requests to a running stream. The runner binds it to its stream when the run starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._stop = threading.Event()
        self.stream: Any = None

    def bind(self, stream: Any) -> None:
        """Control ``stream`` (a :class:`~streamdiff.engine.Stream` or a remote stream with ``update``/``config``)."""
        self.stream = stream

    # -- settings -------------------------------------------------------------------------------------------

    @property
    def config(self) -> StreamConfig | None:
        """The stream's newest requested configuration (None before the run starts)."""
        return None if self.stream is None else self.stream.config

    @property
    def strength(self) -> float | None:
        """The denoising strength of the first step (1 = from pure noise)."""
        config = self.config
        return None if config is None else 1.0 - config.t_index_list[0] / config.num_inference_steps

    def update(self, **changes: Any) -> int:
        """Change settings live (see :meth:`Stream.update`): ConfigError here when invalid. Returns the version."""
        if self.stream is None:
            raise RuntimeError("the controls are not bound to a running stream yet")
        return self.stream.update(**changes)

    def change_strength(self, delta: float) -> float | None:
        """Raise or lower the denoising strength by ``delta`` (new t_index_list, same number of steps)."""
        with self._lock:
            config, strength = self.config, self.strength
            if config is None or strength is None:
                return None
            new = min(1.0, max(MIN_STRENGTH, round(strength + delta, 4)))
            if new != strength:
                steps = config.denoising_steps
                self.update(t_index_list=t_index_list_for_strength(new, steps, config.num_inference_steps))
            return new

    def toggle_filter(self) -> bool | None:
        """Switch the similarity filter on or off; returns the new state."""
        with self._lock:
            config = self.config
            if config is None:
                return None
            current = config.filter
            self.update(filter=FilterConfig(not current.enabled, current.threshold, current.max_skip_frames))
            return not current.enabled

    # -- run state --------------------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def toggle_pause(self) -> bool:
        """Pause or resume capture (the stream gets no frames while paused); returns True when now paused."""
        if self._unpaused.is_set():
            self._unpaused.clear()
            return True
        self._unpaused.set()
        return False

    def wait_unpaused(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a resume; True when running."""
        return self._unpaused.wait(timeout)

    def request_stop(self) -> None:
        """Ask the run to end (like end of input, but without flushing). The runner notices within ~50 ms."""
        self._stop.set()
        self._unpaused.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def command(self, text: str) -> str:
        """Carry out one text command (see :func:`parse_command`); returns what was done. ConfigError if invalid."""
        if self.stream is None:
            raise RuntimeError("the controls are not bound to a running stream yet")
        kind, changes = parse_command(text, self.stream.config)
        if kind == "quit":
            self.request_stop()
            return "stopping"
        if kind == "pause":
            return "paused" if self.toggle_pause() else "resumed"
        if kind == "update":
            version = self.update(**changes)
            return f"settings v{version}: " + ", ".join(f"{k}={v!r}" for k, v in changes.items())
        return ""


# -- text commands (a terminal, ``streamdiff run --control-stdin``) ----------------------------------------------------

_TRUE, _FALSE = {"1", "true", "on", "yes"}, {"0", "false", "off", "no"}
_TEXT_FIELDS = {"prompt", "negative_prompt", "cfg_type", "mode"}
_FLOAT_FIELDS = {"guidance_scale", "delta", "strength", "ip_adapter_scale"}
_INT_FIELDS = {"seed", "num_inference_steps", "frame_buffer_size", "width", "height"}
_BOOL_FIELDS = {"use_denoising_batch", "add_noise", "filter"}
COMMAND_HELP = (
    "one per line: KEY=VALUE (prompt=..., negative_prompt=..., guidance_scale=1.4, delta=0.8, seed=7, "
    "strength=0.6, t_index_list=20,40, size=320x320, frame_buffer_size=2, cfg_type=full, filter=on, "
    "ip_adapter_scale=0.6, ip_adapter_image=REF.png|none), pause, quit"
)


def parse_command(text: str, config: StreamConfig) -> tuple[str, dict[str, Any]]:
    """One line of text → ``("update", changes)``, ``("pause", {})``, ``("quit", {})`` or ``("none", {})``.

    ``strength`` keeps the current number of steps; ``size=WxH`` sets width and height. Raises ConfigError with the
    key, the value and what is allowed.
    """
    from ..errors import ConfigError

    line = text.strip()
    if not line:
        return "none", {}
    if line.lower() in ("q", "quit", "exit", "stop"):
        return "quit", {}
    if line.lower() == "pause":
        return "pause", {}
    key, sep, value = line.partition("=")
    key, value = key.strip().replace("-", "_"), value.strip()
    if not sep:
        raise ConfigError(f"{line!r} is not a command; {COMMAND_HELP}")
    try:
        if key in _TEXT_FIELDS:
            return "update", {key: value}
        if key == "size":
            width, height = parse_size(value, "size")
            return "update", {"width": width, "height": height}
        if key == "t_index_list":
            return "update", {key: parse_int_list(value, key)}
        if key == "ip_adapter_image":
            return "update", {"reference_image": None if value.lower() == "none" else read_reference_image(value)}
        if key in _INT_FIELDS:
            return "update", {key: int(value)}
        if key in _FLOAT_FIELDS:
            number = float(value)
            if key == "strength":
                steps = t_index_list_for_strength(number, config.denoising_steps, config.num_inference_steps)
                return "update", {"t_index_list": steps}
            return "update", {key: number}
        if key in _BOOL_FIELDS:
            flag = value.lower()
            if flag not in _TRUE | _FALSE:
                raise ConfigError(f"{key}={value!r} must be one of on, off, true, false")
            if key == "filter":
                current = config.filter
                return "update", {"filter": FilterConfig(flag in _TRUE, current.threshold, current.max_skip_frames)}
            return "update", {key: flag in _TRUE}
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{key}={value!r} is not a valid value for {key}") from None
    raise ConfigError(f"unknown setting {key!r}; {COMMAND_HELP}")


def read_reference_image(path: str) -> Any:
    """The RGB pixels ``[H, W, 3]`` of an image file (a reference image); ConfigError when it cannot be read."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from ..errors import ConfigError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as error:
        raise ConfigError(f"ip_adapter_image={path!r} cannot be read as an image: {error}", field="ip_adapter_image",
                          value=path, allowed="a readable image file (PNG, JPEG, WebP …) or none") from error
