"""Building CLIP tokenizers offline (no hub): the byte-level alphabet their vocabularies start from."""

from __future__ import annotations


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
