"""What a call costs: its wall-clock seconds on a machine whose speed drifts (a shared host: the same call has
measured a quarter slower from one second to the next here), and its floating-point operations, which do not
drift.

Calls compared with each other are timed in interleaved rounds, so a slow spell hits each of them alike;
each round repeats a call for about `round_seconds` (a 0.1-s call is not decided by the timer's jitter).
A call's time is its fastest round: load from elsewhere only ever adds time. Ten rounds, because one quiet
spell must fall in a round of each call: in 15 alternating rounds of the toy teacher (one call, 3.5-6.7 s)
and student (2-s rounds, 0.10-0.19 s a call) the ratio of a round ranged from 28x to 42x, and the best of
the first ten rounds gave 36.1x, against 36.2x in FLOPs.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def seconds_per_call(*calls: Callable[[], object], rounds: int = 10, round_seconds: float = 2.0) -> list[float]:
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


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the CPU one that scaled_dot_product_attention runs here
_UNCOUNTED = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def flops_per_call(call: Callable[[], object]) -> int:
    """Floating-point operations of one call (matmuls, convolutions and attention; elementwise work is not
    counted): a cost that is the same on every machine and in every run."""
    with FlopCounterMode(display=False, custom_mapping=_UNCOUNTED) as counter:
        call()
    return counter.get_total_flops()
