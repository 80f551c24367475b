"""What a call costs: its wall-clock seconds, on a machine whose speed may drift, and its floating-point
operations, which do not drift.

Calls compared with each other are timed in interleaved rounds, so a slow spell hits each of them alike;
each round repeats a call for about `round_seconds`, so a short call is not decided by the timer's jitter.
A call's time is its fastest round: load from elsewhere only ever adds time. Ten rounds by default, so that
a quiet spell falls in a round of each call (research/README.md, "How the costs are measured", has the spread this guards
against). On a GPU, pass the `device`: a round ends when the device has finished the work it was given, not
when the calls have queued it.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def seconds_per_call(*calls: Callable[[], object], rounds: int = 10, round_seconds: float = 2.0,
                     device: torch.device | None = None) -> list[float]:
    def timed(call: Callable[[], object], n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            call()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    # warm-up: pays one-off allocation costs (and kernel selection), and sizes the call's rounds
    repeats = [max(1, math.ceil(round_seconds / timed(call, 1))) for call in calls]
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, (call, n) in enumerate(zip(calls, repeats)):
            best[i] = min(best[i], timed(call, n) / n)
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
