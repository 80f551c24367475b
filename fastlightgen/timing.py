"""Wall-clock seconds of calls on a machine whose speed drifts (a shared host: the same call has measured a
quarter slower from one second to the next here).

Calls compared with each other are timed in interleaved rounds, so a slow spell hits each of them alike;
each round repeats a call for about `round_seconds` (a 0.1-s call is not decided by the timer's jitter).
A call's time is its fastest round: load from elsewhere only ever adds time.
"""
from __future__ import annotations

import math
import time
from typing import Callable


def seconds_per_call(*calls: Callable[[], object], rounds: int = 5, round_seconds: float = 2.0) -> list[float]:
    repeats = []
    for call in calls:
        start = time.perf_counter()
        call()  # warm-up: pays one-off allocation costs, and sizes the call's rounds
        repeats.append(max(1, math.ceil(round_seconds / (time.perf_counter() - start))))
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, (call, n) in enumerate(zip(calls, repeats)):
            start = time.perf_counter()
            for _ in range(n):
                call()
            best[i] = min(best[i], (time.perf_counter() - start) / n)
    return best
