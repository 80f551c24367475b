"""seconds_per_call: the fastest round, not the mean; short calls repeated to fill a round; calls interleaved.
flops_per_call: matmuls and the CPU attention kernel both counted."""
import time

import torch

from research.timing import flops_per_call, seconds_per_call


def sleeper(durations, log, name):
    calls = []

    def call():
        time.sleep(durations[min(len(calls), len(durations) - 1)])
        calls.append(1)
        log.append(name)
    return call, calls


def test_a_burst_of_load_does_not_decide_the_time():
    call, calls = sleeper([0.06, 0.06, 0.06, 0.01], [], "a")  # warm-up and two slow rounds, then its own cost
    [seconds] = seconds_per_call(call, rounds=4, round_seconds=0.0)
    assert len(calls) == 5 and 0.01 <= seconds < 0.03


def test_a_short_call_is_repeated_to_fill_each_round():
    call, calls = sleeper([0.01], [], "a")
    [seconds] = seconds_per_call(call, rounds=3, round_seconds=0.1)
    assert 5 <= (len(calls) - 1) / 3 <= 10 and 0.01 <= seconds < 0.03


def test_compared_calls_are_timed_in_alternating_rounds():
    log = []
    slow, _ = sleeper([0.02], log, "slow")
    fast, _ = sleeper([0.005], log, "fast")
    t_slow, t_fast = seconds_per_call(slow, fast, rounds=3, round_seconds=0.0)
    assert log == ["slow", "fast"] * 4 and t_slow > t_fast


def test_flops_count_matmuls_and_cpu_attention():
    linear = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(5, 32)
    assert flops_per_call(lambda: linear(x)) == 2 * 5 * 32 * 16
    q = torch.randn(1, 4, 64, 32)  # batch, heads, tokens, head dim: QK^T and AV are each 2 * 64 * 64 * 32 per head
    attention = flops_per_call(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert attention == 4 * 2 * (2 * 64 * 64 * 32)
