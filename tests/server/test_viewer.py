"""streamdiff.protocol.viewer: the view-only connection."""

from __future__ import annotations

import json

from server_helpers import closed_with

from streamdiff.protocol.settings import StreamSettings
from streamdiff.protocol.viewer import ViewerConnection
from streamdiff.protocol.wire import ErrorCode


def test_viewer_connection() -> None:
    viewer = ViewerConnection()
    [send] = viewer.accept("s-1", StreamSettings())
    assert json.loads(send.data) == {"type": "viewing", "version": 1, "stream_id": "s-1", "width": 512, "height": 512}
    error = closed_with(viewer.receive_text("hi"), ErrorCode.VIEW_ONLY, 1003)
    assert error["message"] == "this is a view-only connection; it accepts no messages"
    assert viewer.receive_bytes(b"x") == []
    closed_with(ViewerConnection().close(ErrorCode.UNKNOWN_VIEW_TOKEN, "no stream has this view token"),
                 ErrorCode.UNKNOWN_VIEW_TOKEN, 1008)
    closed_with(ViewerConnection().close(ErrorCode.STREAM_ENDED, "the stream ended"), ErrorCode.STREAM_ENDED, 1000)
