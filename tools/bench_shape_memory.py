"""RSS of one multi-stream tiny-model engine while streams cycle through 60 valid sizes (one stream at a time).

    python tools/bench_shape_memory.py openvino 8       # EngineConfig.max_shapes=8 (the default)
    python tools/bench_shape_memory.py openvino 1000    # effectively unbounded

Figures: docs/PERF.md, "Isolation under attack" (memory bounded by configuration).
"""

from __future__ import annotations

import resource
import sys
import tempfile

import numpy as np
from streamdiff import StreamConfig, StreamEngine
from streamdiff.backends.keys import EngineOptions
from streamdiff.engine import EngineConfig
from streamdiff.models import load_model

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

backend, max_shapes = sys.argv[1], int(sys.argv[2])
engine = StreamEngine(load_model("tiny"), EngineConfig(max_streams=4, max_batch_rows=8, max_shapes=max_shapes),
                      backend=backend, engine_options=EngineOptions(engine_dir=tempfile.mkdtemp(prefix="shape-memory-")))
sides = list(range(64, 1025, 32))
sizes = list(dict.fromkeys((sides[i % 31], sides[(i * 7 + 3 + i // 31) % 31]) for i in range(62)))[:60]
def run(w, h):
    s = engine.open_stream(StreamConfig(width=w, height=h, t_index_list=(32, 45)))
    frame = np.random.RandomState(0).randint(0, 255, (h, w, 3), dtype=np.uint8)
    for _ in range(2):
        engine.step({s: frame})
    s.close()
    engine.step({})
run(256, 256)
start = rss_mb()
marks = []
for i, (w, h) in enumerate(sizes):
    run(w, h)
    if i % 10 == 9:
        marks.append(round(rss_mb()))
for _ in range(3):
    run(256, 256)
end = rss_mb()
for w in range(64, 64 + 32 * 8, 32):
    run(w, 64)
small = rss_mb()
unet = engine.unet
imports = getattr(getattr(unet, "model", None), "imports", None) or getattr(getattr(unet, "session", None), "shrinks", None)
print(f"{backend} max_shapes={max_shapes}: {len(sizes)} sizes; RSS after 256x256 {start:.0f} MB, every 10 sizes {marks}, "
      f"after the cycle and 3 more 256x256 streams {end:.0f} MB, after 8 small sizes (64..288 x 64) {small:.0f} MB; peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB; "
      f"U-Net imports/shrinks {imports}")
