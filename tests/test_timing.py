"""seconds_per_call: the fastest round, not the mean, and short calls repeated to fill a round."""
import time

from fastlightgen.timing import seconds_per_call


def sleeper(durations):
    calls = []

    def call():
        time.sleep(durations[min(len(calls), len(durations) - 1)])
        calls.append(1)
    return call, calls


def test_a_burst_of_load_does_not_decide_the_time():
    call, calls = sleeper([0.06, 0.06, 0.06, 0.01])  # warm-up and two slow rounds, then the call's own cost
    seconds = seconds_per_call(call, rounds=4, round_seconds=0.0)
    assert len(calls) == 5 and 0.01 <= seconds < 0.03


def test_a_short_call_is_repeated_to_fill_each_round():
    call, calls = sleeper([0.01])
    seconds = seconds_per_call(call, rounds=3, round_seconds=0.1)
    assert 5 <= (len(calls) - 1) / 3 <= 10 and 0.01 <= seconds < 0.03
