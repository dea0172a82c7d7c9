"""A small hand-written CLIP byte-level BPE vocabulary, so a tokenizer can be built with no download.

The vocabulary has the 256 byte-unicode characters, the same with the end-of-word marker ``</w>``, merges for
common lowercase letter pairs and a few frequent words, and CLIP's two special tokens. It tokenizes any text
(unknown pieces fall back to single bytes); it is not CLIP's vocabulary, so only the built-in random model uses it.
"""

from __future__ import annotations

import json
from pathlib import Path

_WORDS = (
    "a the of and in on with portrait photo painting watercolor style oil sketch anime city night "
    "light dark face man woman cat dog tree sky sea art cyberpunk neon"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) for the built-in tokenizer."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(left + right, len(vocab))
            pieces = [left + right] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tokenizer_files(folder: Path) -> None:
    """Write ``vocab.json``, ``merges.txt`` and a tokenizer config loadable with ``CLIPTokenizer.from_pretrained``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
