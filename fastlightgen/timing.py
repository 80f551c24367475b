"""Wall-clock seconds of a call on a machine whose speed drifts (a shared host: the same call has measured a
quarter slower from one second to the next here).

The fastest of a few rounds, each repeating the call for about `round_seconds` after one warm-up call: load
from elsewhere only ever adds time, so the minimum is the estimate of the call's own cost, and repeating a
short call within a round keeps a 0.1-s call from being decided by the timer's jitter.
"""
from __future__ import annotations

import math
import time
from typing import Callable


def seconds_per_call(call: Callable[[], object], rounds: int = 5, round_seconds: float = 2.0) -> float:
    start = time.perf_counter()
    call()  # warm-up: pays one-off allocation costs, and sizes the rounds
    calls = max(1, math.ceil(round_seconds / (time.perf_counter() - start)))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best
