"""Which settings made an output: the protocol's ``settings_version`` of an engine output, sans I/O.

The protocol counts a stream's settings by its acks (``ready`` has 0, each ``ack`` one more, modulo 2**16; see
docs/protocol.md, "Settings versions"). The engine counts them by its own ``Stream.update`` calls, and an update
that changes nothing the engine runs (``output``, ``{}``) makes none. A session records, per ack, the engine version
its settings run as (:meth:`SettingsVersions.acked`), and asks which ack an output's engine version belongs to
(:meth:`SettingsVersions.of`): the newest ack whose engine settings are those the output was finished with. It
encodes the output with that ack's ``output`` settings, so that everything about an output is that ack's.
"""

from __future__ import annotations

from collections import deque

from .settings import StreamSettings

__all__ = ["SettingsVersions"]

MAX_PENDING = 1024  # engine versions acked but not yet seen in an output (10 updates a second: 100 s of them)


class SettingsVersions:
    """The acks' settings by engine version, from ``ready``'s (both versions 0) on. Outputs are looked up in the
    order the engine made them (engine versions never decrease), so the acks before an output's are dropped."""

    def __init__(self, settings: StreamSettings) -> None:
        # (engine version, settings version, settings), oldest first; engine versions strictly increase
        self._acks: deque[tuple[int, int, StreamSettings]] = deque([(0, 0, settings)])

    def acked(self, engine_version: int, settings_version: int, settings: StreamSettings) -> None:
        """An ack with ``settings_version`` was sent for ``settings``, which the engine runs as ``engine_version``
        (what ``Stream.update`` returned, or ``Stream.version`` when the update changed nothing the engine runs)."""
        if self._acks[-1][0] == engine_version:
            self._acks[-1] = (engine_version, settings_version, settings)
            return
        self._acks.append((engine_version, settings_version, settings))
        if len(self._acks) > MAX_PENDING:  # no output for that long: the oldest can no longer be asked for
            self._acks.popleft()

    def of(self, engine_version: int) -> tuple[int, StreamSettings]:
        """The settings version and settings of an output the engine finished with ``engine_version``: the newest
        ack so far whose settings the engine runs as that version (later acks' settings are not in the output)."""
        while len(self._acks) > 1 and self._acks[1][0] <= engine_version:
            self._acks.popleft()
        _, version, settings = self._acks[0]
        return version, settings
