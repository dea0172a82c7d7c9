"""Message generators for fuzzing the protocol: Hypothesis strategies for near-valid JSON and frames, and cheap
random.Random mutators that multiply them (used by the sans-I/O fuzz in test_protocol.py and against the live server
in test_fuzz_live.py)."""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from server_helpers import pattern, save

from streamdiff.protocol.client import ClientConnection
from streamdiff.protocol.settings import SETTING_FIELDS

HELLO = {"type": "hello", "version": 1}

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-5, 2000),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
_json = st.recursive(_json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=6)
_setting_values = {
    "width": st.sampled_from([8, 64, 256, 512, 520, 1024, 2048]), "height": st.sampled_from([64, 100, 512]),
    "t_index_list": st.lists(st.integers(-1, 60), max_size=6), "num_inference_steps": st.integers(0, 120),
    "strength": st.floats(-0.5, 1.5), "steps": st.integers(-1, 8), "frame_buffer_size": st.integers(0, 3),
    "cfg_type": st.sampled_from(["none", "self", "full", "initialize", "SELF", "bogus"]),
    "prompt": st.text(max_size=30), "negative_prompt": st.text(max_size=10), "guidance_scale": st.floats(-1, 60),
    "delta": st.floats(-1, 12), "seed": st.integers(-1, 2**64),
    "filter": st.fixed_dictionaries({}, optional={"enabled": st.booleans(), "threshold": st.floats(-0.5, 1.5),
                                                  "max_skip_frames": st.integers(-2, 20)}),
    "output": st.fixed_dictionaries({}, optional={"format": st.sampled_from(["jpeg", "webp", "png"]),
                                                  "quality": st.integers(-1, 101)}),
}
_settings_objects = st.dictionaries(st.sampled_from(sorted(SETTING_FIELDS) + ["junk"]), _json, max_size=4) | \
    st.fixed_dictionaries({}, optional=_setting_values)


@st.composite
def _structured(draw: st.DrawFn) -> str:
    """Messages that are nearly right: mostly the right fields, sometimes one wrong or extra."""
    kind = draw(st.sampled_from(["update"] * 6 + ["hello"] * 2 + ["ready", "", 1, None]))
    message: dict[str, Any] = {"type": kind}
    if kind == "hello" or draw(st.integers(0, 5)) == 0:
        message["version"] = draw(st.sampled_from([1, 1, 1, 2, "1", None]))
    if draw(st.integers(0, 9)) > 0:
        message["settings"] = draw(st.fixed_dictionaries({}, optional=_setting_values)) if draw(
            st.integers(0, 3)) else draw(_settings_objects | _json)
    if draw(st.booleans()):
        message["request_id"] = draw(st.integers(0, 100) | _json_scalars)
    if draw(st.integers(0, 9)) == 0:
        message[draw(st.text(max_size=6))] = draw(_json)
    if draw(st.integers(0, 9)) == 0:
        message["token"] = draw(st.sampled_from(["tok", "wrong", 1]))
    return json.dumps(message)


@st.composite
def _mutated_text(draw: st.DrawFn) -> str:
    text = list(draw(_structured()))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.characters(codec="utf-8"))
        if op == "insert":
            text.insert(pos, char)
        elif text and op == "delete":
            del text[min(pos, len(text) - 1)]
        elif text:
            text[min(pos, len(text) - 1)] = char
    return "".join(text)


_texts = st.one_of(st.text(max_size=60), _json.map(json.dumps), _structured(), _mutated_text())

def _declaring(width: int, height: int) -> bytes:
    """A well-formed baseline JPEG whose frame header declares ``width`` x ``height`` (too many pixels to decode)."""
    body = bytearray(save(pattern(24, 16, 5), "JPEG"))
    sof = body.index(b"\xff\xc0")
    body[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(body)


_SEED_BODIES = [save(pattern(24, 16, 1), "JPEG"), save(pattern(24, 16, 2), "WEBP"),
                save(pattern(24, 16, 3), "WEBP", lossless=True), save(pattern(24, 16, 4), "PNG"),
                b"\xff\xd8\xff\xc0\x00\x11\x08\xea\x60\xea\x60\x03" + b"\0" * 30, _declaring(60000, 60000)]


@st.composite
def _binary(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "header+random", "frame", "mutated", "mutated"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    header = ClientConnection().frame(b"", frame_id=draw(st.integers(0, 2**32 - 1)),
                                      client_ts=draw(st.floats(allow_nan=False, allow_infinity=False)))
    if kind == "header+random":
        return header + draw(st.binary(max_size=64))
    data = bytearray(header + draw(st.sampled_from(_SEED_BODIES)))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(data) - 1))
            op = draw(st.sampled_from(["flip", "cut", "insert"]))
            if op == "flip":
                data[pos] ^= draw(st.integers(1, 255))
            elif op == "cut":
                del data[pos:]
            else:
                data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
            if not data:
                break
    return bytes(data)


# Volume comes cheap: each example is a few Hypothesis-made messages plus mutations of them and of seed messages,
# made by a random.Random seeded by Hypothesis (so runs are reproducible and a failure replays).
_BATCH = 16
_FUZZ = settings(max_examples=700, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_SEED_TEXTS = [json.dumps(m) for m in [
    HELLO,
    {**HELLO, "token": "tok", "settings": {"width": 256, "height": 256, "prompt": "a cat", "strength": 0.5}},
    {**HELLO, "client": "fuzz/1", "view_token": "A" * 16,
     "settings": {"filter": {"enabled": True}, "output": {"format": "webp", "quality": 50}}},
    {"type": "update", "request_id": 1, "settings": {"prompt": "ink", "guidance_scale": 1.5, "seed": 3}},
    {"type": "update", "settings": {"t_index_list": [10, 20, 30], "num_inference_steps": 50}},
    {"type": "update", "request_id": "r", "settings": {"steps": 3, "delta": 0.5, "negative_prompt": "blur"}},
    {"type": "update", "settings": {"cfg_type": "self", "frame_buffer_size": 1, "width": 512, "steps": 2}},
    {"type": "update", "request_id": 9, "settings": {"width": 2048}},  # valid for streamdiff, over the caps
    {"type": "update", "settings": {"cfg_type": "full", "steps": 6}},
    {"type": "update", "settings": {"width": 384, "cfg_type": "initialize",
                                    "filter": {"threshold": 0.9, "max_skip_frames": 3}}},
]]
_POOL: list[Any] = [None, True, False, 0, -1, 1, 2, 7, 2048, 2**31, 2**64, 10**30, 0.5, -0.0, 1e308, 1e-300, "", "x", "self",
                    "full", "jpeg", "\ud800", "A" * 300, [], [1, 2], [[]], [0, 49], {}, {"a": 1}, {"enabled": 1}]
_KEYS = ["type", "version", "token", "settings", "request_id", "client", "view_token", "junk", *SETTING_FIELDS,
         "enabled", "threshold", "format", "quality"]
_CHARS = '{}[]",:\\ -.0123456789eEtrufalsn\x00\x7f\u00e9\u20ac\U0001f600'


def _mutate_text(rng: random.Random, text: str) -> str:
    if rng.random() < 0.35:  # character level
        chars = list(text)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randint(0, len(chars))
            op = rng.randrange(3)
            if op == 0 or not chars:
                chars.insert(pos, rng.choice(_CHARS))
            elif op == 1:
                del chars[min(pos, len(chars) - 1)]
            else:
                chars[min(pos, len(chars) - 1)] = rng.choice(_CHARS)
        return "".join(chars)
    try:
        root = json.loads(text)
    except ValueError:
        return text[::-1]
    for _ in range(rng.randint(1, 3)):  # structure level: replace, delete or add somewhere inside
        node = root
        while isinstance(node, dict) and node and rng.random() < 0.5:
            child = node[rng.choice(list(node))]
            if not isinstance(child, dict):
                break
            node = child
        if not isinstance(node, dict):
            continue
        op = rng.randrange(3)
        if op == 0 and node:
            node[rng.choice(list(node))] = copy.deepcopy(rng.choice(_POOL))
        elif op == 1 and node:
            del node[rng.choice(list(node))]
        else:
            node[rng.choice(_KEYS)] = copy.deepcopy(rng.choice(_POOL))
    out = json.dumps(root, ensure_ascii=rng.random() < 0.5)
    return out.replace("1e+308", "Infinity") if rng.random() < 0.1 else out


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not out:
            break
        op = rng.randrange(6)
        pos = rng.randrange(len(out))
        if op == 0:
            out[pos] ^= rng.randint(1, 255)
        elif op == 1:
            del out[pos:]
        elif op == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:  # rewrite a header field
            at = rng.choice([0, 4, 5, 8, 12, 20, 22, 24, 26, 28])
            out[at:at + 2] = rng.randbytes(2)
        elif op == 4:
            out[12:20] = struct.pack(">d", rng.choice([math.nan, math.inf, -1.0, 1e300]))
        else:
            out += rng.randbytes(rng.randint(1, 32))
    return bytes(out)


_VALID_FRAMES = [ClientConnection().frame(body, frame_id=i, client_ts=10.0 * i) for i, body in enumerate(_SEED_BODIES)]


@st.composite
def _text_batches(draw: st.DrawFn) -> list[str]:
    made = draw(st.lists(_texts, min_size=1, max_size=3))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    batch = list(made)
    while len(batch) < _BATCH:
        batch.append(_mutate_text(rng, rng.choice(made + _SEED_TEXTS)) if rng.random() < 0.85
                     else rng.choice(_SEED_TEXTS))
    return batch


@st.composite
def _binary_batches(draw: st.DrawFn) -> list[bytes]:
    made = draw(st.lists(_binary(), min_size=1, max_size=3))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    batch = list(made)
    while len(batch) < _BATCH:
        pick = rng.random()
        if pick < 0.15:
            batch.append(rng.choice(_VALID_FRAMES))
        elif pick < 0.25:
            batch.append(rng.randbytes(rng.randint(0, 48)))
        else:
            batch.append(_mutate_bytes(rng, rng.choice(made + _VALID_FRAMES)))
    return batch
