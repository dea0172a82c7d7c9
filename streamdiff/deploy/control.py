"""The drain flag of a running application, in Ray's key-value store (readable from any process of the cluster).

Serve stops a replica only after its requests end, and a WebSocket never ends by itself: before an application is
deleted, :func:`set_draining` raises the flag; every replica, at its next routing report, tells its clients
``shutting_down`` (close 1001) and then marks itself drained (:func:`mark_drained`), which :func:`drained_count`
counts. Deploying the application clears both.
"""

from __future__ import annotations

__all__ = ["drained_count", "draining", "mark_drained", "set_draining"]

NAMESPACE = b"streamdiff"


def _flag(app_name: str) -> bytes:
    return f"drain/{app_name}".encode()


def _done(app_name: str, tag: str = "") -> bytes:
    return f"drained/{app_name}/{tag}".encode()


def set_draining(app_name: str, value: bool) -> None:
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    if value:
        _internal_kv_put(_flag(app_name), b"1", overwrite=True, namespace=NAMESPACE)
    else:
        _internal_kv_del(_flag(app_name), namespace=NAMESPACE)
        _internal_kv_del(_done(app_name), del_by_prefix=True, namespace=NAMESPACE)


def draining(app_name: str) -> bool:
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return False
    return _internal_kv_get(_flag(app_name), namespace=NAMESPACE) is not None


def mark_drained(app_name: str, tag: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_done(app_name, tag), b"1", overwrite=True, namespace=NAMESPACE)


def drained_count(app_name: str) -> int:
    from ray.experimental.internal_kv import _internal_kv_list

    return len(_internal_kv_list(_done(app_name), namespace=NAMESPACE))
