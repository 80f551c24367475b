"""Deterministic toy text encoder standing in for Wan's UMT5 (no downloaded weights).

caption -> (TEXT_LEN, TEXT_DIM) context. Each word is a fixed pseudo-random vector with unit
variance per element, derived from SHAKE-256 of the word (stable across processes and
machines, unlike Python's salted hash()), plus an equally derived vector for its position so
word order is visible: token = (word + position) / sqrt(2), which keeps unit variance. Rows
after the last word are zeros, as Wan zero-pads UMT5 output; words beyond TEXT_LEN are
dropped, as a tokenizer truncates. The empty prompt gives all zeros: the null conditioning
for classifier-free guidance.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

TEXT_LEN = 16
TEXT_DIM = 4096  # Wan's UMT5 context width

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(caption: str) -> list[str]:
    """Lower-cased alphanumeric words; punctuation and case do not change the encoding."""
    return _WORD.findall(caption.lower())


@lru_cache(maxsize=4096)
def _hashed_vector(key: str) -> torch.Tensor:
    """(TEXT_DIM,) uniform in [-sqrt(3), sqrt(3)] (unit variance), a pure function of `key`."""
    digest = hashlib.shake_256(f"fastlightgen-toy-text:{key}".encode()).digest(2 * TEXT_DIM)
    u16 = np.frombuffer(digest, dtype="<u2").astype(np.float32)  # explicit byte order: same on every host
    uniform = torch.from_numpy((u16 + 0.5) / 65536.0)
    return math.sqrt(3.0) * (2.0 * uniform - 1.0)


def encode_caption(caption: str) -> torch.Tensor:
    """(TEXT_LEN, TEXT_DIM) float32 context of one caption."""
    context = torch.zeros(TEXT_LEN, TEXT_DIM)
    for position, word in enumerate(tokenize(caption)[:TEXT_LEN]):
        context[position] = (_hashed_vector(f"word:{word}") + _hashed_vector(f"position:{position}")) / math.sqrt(2.0)
    return context


def encode(captions: Sequence[str]) -> torch.Tensor:
    """(B, TEXT_LEN, TEXT_DIM) contexts; "" encodes the null (all-zero) conditioning."""
    if isinstance(captions, str):
        raise TypeError("encode takes a list of captions; use encode_caption for a single string")
    return torch.stack([encode_caption(c) for c in captions])
