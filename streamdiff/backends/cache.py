"""The engine cache: one folder per built artifact, written atomically, locked while built, validated on load.

Layout under the cache root (``engines/`` by default)::

    engines/
      unet-onnx-3f2a…/            one entry: named by EngineKey.name (component, backend, key digest)
        manifest.json             the full key, every file's size and sha256, build time and duration
        model.onnx                the artifact(s)
      .locks/unet-onnx-3f2a….lock an OS file lock (fcntl) held while that entry is built
      .tmp-unet-onnx-3f2a…-<pid>  a build in progress; renamed to the entry when complete

An entry counts only if its manifest names the same key and every listed file has the recorded size and hash; a
truncated or corrupted entry is removed with a warning and rebuilt, never loaded. Builders of the same key serialise
on the lock, and the second one finds the first one's entry. A builder killed mid-write leaves only a ``.tmp-``
folder, which the next holder of the lock deletes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import EngineBuildError
from .keys import EngineKey, default_engine_dir

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_TMP_PREFIX = ".tmp-"
_LOCKS = ".locks"


@dataclass(frozen=True)
class CacheEntry:
    """A validated entry: its folder and manifest. ``artifact`` is the main file's path."""

    path: Path
    manifest: dict[str, Any]

    @property
    def artifact(self) -> Path:
        return self.path / self.manifest["artifact"]

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.manifest["files"].values())

    @property
    def created(self) -> float:
        return float(self.manifest["created"])

    @property
    def key(self) -> dict[str, Any]:
        return self.manifest["key"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive OS lock on ``path`` (``fcntl.flock``), released when the holder exits or dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is building %s", what)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class EngineCache:
    """Built engines under ``root``. Use :meth:`get_or_build`; :meth:`entries` and :meth:`clear` manage the folder."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_engine_dir()

    def entry_path(self, key: EngineKey) -> Path:
        return self.root / key.name

    # -- reading ------------------------------------------------------------------------------------------------

    def load(self, key: EngineKey, warn: bool = True) -> CacheEntry | None:
        """The valid entry of ``key``, or None (with a warning when an invalid entry is in the way).

        An invalid entry is never loaded; the next build of ``key`` replaces it, under the lock.
        """
        path = self.entry_path(key)
        if not path.exists():
            return None
        problem = self._problem(path, key)
        if problem is None:
            return CacheEntry(path, json.loads((path / MANIFEST).read_text()))
        if warn:
            logger.warning("engine cache entry %s is invalid (%s); it will be rebuilt", path, problem)
        return None

    def _problem(self, path: Path, key: EngineKey | None) -> str | None:
        """Why the entry at ``path`` must not be loaded, or None if it is valid."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as error:
            return f"unreadable manifest: {type(error).__name__}"
        if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
            return "unknown manifest version"
        if key is not None and (manifest.get("digest") != key.digest() or manifest.get("key") != key.to_dict()):
            return "manifest does not match the requested key"
        files = manifest.get("files")
        if not isinstance(files, dict) or manifest.get("artifact") not in files:
            return "manifest lists no artifact"
        for name, info in files.items():
            file = path / name
            try:
                size = file.stat().st_size
            except OSError:
                return f"{name} is missing"
            if size != info.get("size"):
                return f"{name} has {size} bytes, the manifest says {info.get('size')}"
            if file_sha256(file) != info.get("sha256"):
                return f"{name} does not match its sha256"
        return None

    def entries(self) -> list[tuple[Path, dict[str, Any] | None]]:
        """Every entry folder with its manifest (None when unreadable), oldest first. Not validated (fast)."""
        if not self.root.is_dir():
            return []
        out: list[tuple[Path, dict[str, Any] | None]] = []
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                manifest = json.loads((path / MANIFEST).read_text())
            except (OSError, ValueError):
                manifest = None
            out.append((path, manifest))
        return sorted(out, key=lambda item: (item[1] or {}).get("created", 0.0))

    def verify(self, path: Path) -> str | None:
        """Why the entry folder ``path`` is invalid (size/hash check of every file), or None."""
        return self._problem(path, None)

    # -- writing ------------------------------------------------------------------------------------------------

    def get_or_build(
        self,
        key: EngineKey,
        build: Callable[[Path], str],
        *,
        description: str = "",
        info: dict[str, Any] | None = None,
    ) -> CacheEntry:
        """The entry of ``key``; built first if missing or invalid.

        ``build(folder)`` writes the artifact(s) into an empty temporary folder and returns the main file's name.
        It runs under the entry's lock, so concurrent callers build once. ``info`` goes into the manifest.
        """
        what = description or key.name
        entry = self.load(key)
        if entry is not None:
            logger.debug("engine cache hit: %s", entry.path)
            return entry
        with file_lock(self.root / _LOCKS / f"{key.name}.lock", what):
            entry = self.load(key, warn=False)  # another process may have built it while we waited
            if entry is not None:
                logger.info("engine %s was built by another process; reusing %s", what, entry.path)
                return entry
            self._remove_stale_builds(key)
            logger.warning("engine %s is not built yet: building it now (once; kept in %s)", what, self.root)
            return self._build(key, build, info or {})

    def _build(self, key: EngineKey, build: Callable[[Path], str], info: dict[str, Any]) -> CacheEntry:
        final = self.entry_path(key)
        tmp = self.root / f"{_TMP_PREFIX}{key.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        started = time.time()
        try:
            artifact = build(tmp)
            if not (tmp / artifact).is_file():
                raise EngineBuildError(f"the builder of {key.name} did not write its artifact {artifact!r}")
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
                files[str(file.relative_to(tmp))] = {"size": file.stat().st_size, "sha256": file_sha256(file)}
            manifest = {
                "version": MANIFEST_VERSION,
                "digest": key.digest(),
                "key": key.to_dict(),
                "artifact": artifact,
                "files": files,
                "created": time.time(),
                "build_seconds": round(time.time() - started, 3),
                "info": info,
            }
            manifest_tmp = tmp / f"{MANIFEST}.partial"
            manifest_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            with open(manifest_tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(manifest_tmp, tmp / MANIFEST)
            _fsync_dir(tmp)
            if final.exists():
                self._remove(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built engine %s in %.1f s (%s)", key.name, time.time() - started, final)
        return CacheEntry(final, manifest)

    def _remove_stale_builds(self, key: EngineKey) -> None:
        """Delete half-written folders of ``key`` left by killed builders (we hold the lock, so none is live)."""
        for stale in self.root.glob(f"{_TMP_PREFIX}{key.name}-*"):
            logger.warning("removing an unfinished engine build left by a stopped process: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def _remove(self, path: Path) -> None:
        trash = path.with_name(f"{_TMP_PREFIX}trash-{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, trash)  # the entry disappears atomically, then is deleted
        except OSError:
            trash = path
        shutil.rmtree(trash, ignore_errors=True)

    def clear(self, predicate: Callable[[dict[str, Any] | None], bool] | None = None) -> int:
        """Delete entries (all, or those whose manifest satisfies ``predicate``) and leftovers. Returns the count."""
        removed = 0
        for path, manifest in self.entries():
            if predicate is None or predicate(manifest):
                self._remove(path)
                removed += 1
        if predicate is None and self.root.is_dir():
            for leftover in self.root.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        return removed
