"""Building CLIP tokenizers offline (no hub): the byte-level alphabet their vocabularies start from."""

from __future__ import annotations

import json
from pathlib import Path


def clip_byte_alphabet() -> list[str]:
    """GPT-2 / CLIP's byte-level alphabet: one printable character per byte value, in CLIP's vocabulary order
    (the printable bytes first, then the others mapped to code points from 256 up)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def byte_clip_tokenizer(directory, max_length: int = 16):
    """Write and load a CLIPTokenizer over single byte-characters, no merges (256 + 256 end-of-word + 2 special
    tokens = 514): the tiny pipelines of the tests and benchmarks, built offline."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = clip_byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)
