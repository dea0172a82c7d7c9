"""Hugging Face hub ids → local snapshot folders, failing fast with a message that says what was tried.

The local cache (``HF_HOME`` / ``HF_HUB_CACHE``) is always tried first. A download is attempted only when
``HF_HUB_OFFLINE`` is not set; it is bounded by the hub client's timeouts, so an unreachable hub gives an error within
seconds, never a hang. Only the files streaming needs are fetched (``allow_patterns``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Seconds to wait for the hub's metadata answer before giving up (the weights themselves may take longer).
METADATA_TIMEOUT = 10.0


def is_hub_id(name: str) -> bool:
    """``org/name`` with the characters the hub allows (and not a checkpoint file name)."""
    return bool(_HUB_ID.match(name)) and not name.endswith((".safetensors", ".ckpt", ".bin", ".pt"))


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, patterns: list[str], revision: str | None = None, what: str = "model") -> Path:
    """The local snapshot folder of ``repo_id`` (files matching ``patterns``): the cache first, then a download.

    Raises :class:`ModelLoadError` naming the id, what was tried and how to fix it.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - any cache miss falls through to the download attempt
        logger.debug("%s %s is not in the local Hugging Face cache: %s", what, repo_id, cached_error)
    rev = f" at revision {revision!r}" if revision else ""
    if hub_offline():
        raise ModelLoadError(
            f"{what} {repo_id!r}{rev} is not in the local Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE is "
            f"set, so it was not downloaded. Download it once with network access (`huggingface-cli download "
            f"{repo_id}`), point HF_HOME at a cache that has it, or pass a local folder or file path instead."
        )
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, etag_timeout=METADATA_TIMEOUT)
        )
    except Exception as error:  # noqa: BLE001 - reported with what was tried
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelLoadError(
            f"{what} {repo_id!r}{rev} is not a local path, not in the Hugging Face cache ({_cache_dir()}), and "
            f"downloading it failed ({type(error).__name__}: {first_line}). Check the id and your network, log in "
            f"with `huggingface-cli login` for gated models, or pass a local folder or file path."
        ) from error


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
