"""The benchmark's statistics and its analytical floor, on planted inputs (nothing here is timed).

- the bootstrap interval of a median: exact on constant data, deterministic, ~95% coverage on a
  planted distribution, [min, max] below 6 rounds;
- verdicts: "met" / "missed" only when the interval says so, "not resolved" otherwise;
- the rounds: alternating order, stop when resolved, stop at the caps (a planted clock);
- the floor: multiply-adds and elements of a tiny GPT-2, counted by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.floor import linear_layers, lora_floor
from benchmarks.stats import MIN_ROUNDS, Target, half_width, median_interval, resolved, verdict
from benchmarks.timing import Steps, interleaved, round_order, summarize
from benchmarks.variants import load_base, lora_config

AT_MOST = Target("t", "at most", 1.01)
EQUAL = Target("t", "equal", 0.01)


# ---- the interval ---------------------------------------------------------------------------------
def test_constant_ratios_have_a_zero_width_interval():
    assert median_interval([1.05] * 12) == (1.05, 1.05, 1.05)


def test_interval_is_deterministic_and_brackets_the_median():
    values = [0.97, 1.02, 1.01, 0.99, 1.04, 1.00, 0.98, 1.03, 1.01, 1.02]
    median, low, high = median_interval(values, seed=3)
    assert median == pytest.approx(1.01)
    assert min(values) <= low <= median <= high <= max(values)
    assert median_interval(values, seed=3) == (median, low, high)


def test_fewer_than_six_rounds_give_min_and_max():
    assert median_interval([1.0, 1.3, 1.1]) == (1.1, 1.0, 1.3)
    assert MIN_ROUNDS == 6 and 1 - 2 * 0.5 ** 5 < 0.95 <= 1 - 2 * 0.5 ** 6  # why six


def test_interval_covers_a_planted_median_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_median, trials, n = 1.0, 300, 25
    covered = 0
    for trial in range(trials):
        values = true_median + rng.normal(0, 0.03, size=n)  # symmetric: median = mean = 1.0
        _, low, high = median_interval(values, resamples=1000, seed=trial)
        covered += low <= true_median <= high
    assert 0.88 <= covered / trials <= 0.995


def test_the_interval_narrows_with_rounds():
    rng = np.random.default_rng(1)
    few = half_width(*median_interval(1 + rng.normal(0, 0.03, size=10)))
    many = half_width(*median_interval(1 + rng.normal(0, 0.03, size=250)))
    assert many < few / 2


def test_resolved_means_within_one_percent_on_the_wider_side():
    assert resolved(1.0, 0.995, 1.009)
    assert not resolved(1.0, 0.995, 1.011)
    assert not resolved(1.0, 0.989, 1.0)


# ---- verdicts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("low, high, expected", [
    (0.98, 1.005, "met"), (0.98, 1.01, "met"),          # at or below the limit, the whole interval
    (1.011, 1.05, "missed"),                            # above it, the whole interval
    (1.00, 1.02, "not resolved"), (0.9, 1.2, "not resolved"),
])
def test_at_most_verdicts(low, high, expected):
    decided, why = verdict(AT_MOST, low, high, rounds=20)
    assert decided == expected
    if expected == "not resolved":
        assert "straddles 1.010" in why


@pytest.mark.parametrize("low, high, expected", [
    (0.995, 1.005, "met"), (0.99, 1.01, "met"),
    (1.02, 1.04, "missed"), (0.95, 0.985, "missed"),
    (0.985, 1.005, "not resolved"), (1.0, 1.02, "not resolved"), (0.97, 1.03, "not resolved"),
])
def test_equal_verdicts(low, high, expected):
    assert verdict(EQUAL, low, high, rounds=20)[0] == expected


def test_not_resolved_says_by_how_much():
    assert verdict(EQUAL, 1.0, 1.025, rounds=20) == ("not resolved", "interval 1.000-1.025 reaches 1.5% past 0.990-1.010")
    decided, why = verdict(AT_MOST, 1.0, 1.03, rounds=20)
    assert why == "interval 1.000-1.030 straddles 1.010 (-1.0% / +2.0%)"


def test_too_few_rounds_decide_nothing():
    assert verdict(AT_MOST, 1.5, 1.6, rounds=5)[0] == "not resolved"   # would be "missed"
    assert verdict(EQUAL, 1.0, 1.0, rounds=2)[0] == "not resolved"       # would be "met"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="empty"):
        verdict(AT_MOST, 1.1, 1.0)
    with pytest.raises(ValueError, match="unknown target kind"):
        verdict(Target("t", "about", 1.0), 1.0, 1.0)
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


# ---- the rounds (a planted clock) -------------------------------------------------------------------
def planted(times: dict[str, list[float]], calls: list[str]):
    """Functions that return their next planted time, and a timer that reads it (cpu = wall)."""
    counters = {name: iter(values * 1000) for name, values in times.items()}

    def function(name):
        def run():
            calls.append(name)
            return next(counters[name])
        return run

    def measure(fn):
        t = fn()
        return t, t
    return {name: function(name) for name in times}, (("cpu", "wall"), measure)


def test_rounds_alternate_their_order():
    orders = [round_order(["a", "b", "c"], k) for k in range(6)]
    assert orders == [["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"], ["a", "c", "b"],
                      ["c", "a", "b"], ["b", "a", "c"]]
    assert sorted(order[0] for order in orders) == ["a", "a", "b", "b", "c", "c"]  # each first equally often
    calls = []
    functions, timer = planted({"a": [1.0], "b": [1.0], "c": [1.0]}, calls)
    interleaved(functions, "cpu", "a", min_rounds=2, max_rounds=2, max_seconds=60, timer=timer, bracket=False)
    assert calls == ["a", "b", "c", "c", "b", "a"]


def test_bracketed_rounds_run_the_reference_around_every_variant():
    calls = []
    functions, timer = planted({"a": [1.0], "b": [1.0], "c": [1.0]}, calls)
    timed = interleaved(functions, "cpu", "a", min_rounds=2, max_rounds=2, max_seconds=60, timer=timer)
    assert timed["bracketed"]
    assert calls == ["a", "b", "a", "c", "a", "a", "c", "a", "b", "a"]


def drifting(costs: dict[str, float], slope: float, calls: list[str]):
    """Functions whose time is their cost times a machine speed that drifts linearly with every call."""
    def function(name):
        def run():
            calls.append(name)
            return costs[name] * (1 + slope * len(calls))
        return run

    def measure(fn):
        t = fn()
        return t, t
    return {name: function(name) for name in costs}, (("cpu", "wall"), measure)


def test_bracketing_cancels_a_linear_drift_that_plain_rounds_do_not():
    costs = {"base": 1.0, "same": 1.0, "x": 1.05}
    functions, timer = drifting(costs, 0.02, [])
    plain = summarize(interleaved(functions, "cpu", "base", min_rounds=8, max_rounds=8, max_seconds=60,
                                  timer=timer, bracket=False), "base")
    functions, timer = drifting(costs, 0.02, [])
    bracketed = summarize(interleaved(functions, "cpu", "base", min_rounds=8, max_rounds=8, max_seconds=60,
                                      timer=timer), "base")
    assert bracketed["same"]["cpu"]["ratio"] == pytest.approx(1.0, abs=1e-12)
    assert bracketed["x"]["cpu"]["ratio"] == pytest.approx(1.05, abs=1e-12)
    assert bracketed["x"]["cpu"]["high"] - bracketed["x"]["cpu"]["low"] == pytest.approx(0.0, abs=1e-12)
    plain_same = plain["same"]["cpu"]
    assert half_width(plain_same["ratio"], plain_same["low"], plain_same["high"]) > 0.01  # drift leaks into plain rounds


def test_steps_run_in_lockstep_and_a_round_is_their_sum():
    calls = []

    def stepped(name, times):
        def start():
            return [(lambda t=t, i=i: calls.append(f"{name}{i}") or t) for i, t in enumerate(times)]
        return Steps(start)

    functions = {"base": stepped("base", [1.0, 2.0, 2.0]), "x": stepped("x", [1.0, 2.2, 2.2])}
    timed = interleaved(functions, "cpu", "base", min_rounds=2, max_rounds=2, max_seconds=60,
                        timer=(("cpu", "wall"), lambda fn: (fn(),) * 2))
    assert not timed["bracketed"]  # steps share state: the reference cannot run twice in a round
    assert timed["lockstep"]
    assert calls[:6] == ["base0", "x0", "x1", "base1", "x2", "base2"]  # step j of each, order alternating
    x = summarize(timed, "base")["x"]["cpu"]
    assert x["samples_s"] == pytest.approx([5.4, 5.4]) and x["ratio"] == pytest.approx(5.4 / 5.0)
    assert x["min_ratio"] == pytest.approx(5.4 / 5.0)


def test_rounds_stop_once_resolved_but_not_before_six():
    functions, timer = planted({"base": [1.0], "x": [1.05]}, [])
    timed = interleaved(functions, "cpu", "base", min_rounds=2, max_rounds=50, max_seconds=60, timer=timer)
    assert (timed["rounds"], timed["stopped"], timed["half_width"]) == (MIN_ROUNDS, "resolved", 0.0)
    summary = summarize(timed, "base")
    assert summary["x"]["cpu"]["ratio"] == pytest.approx(1.05)
    assert summary["x"]["cpu"]["low"] == pytest.approx(1.05) == summary["x"]["wall"]["high"]
    assert summary["base"]["cpu"]["ratio"] == 1.0


def test_noisy_rounds_stop_at_the_cap_and_say_so():
    functions, timer = planted({"base": [1.0], "x": [1.0, 1.3, 0.8, 1.2]}, [])
    timed = interleaved(functions, "cpu", "base", min_rounds=2, max_rounds=12, max_seconds=60, timer=timer)
    assert (timed["rounds"], timed["stopped"]) == (12, "max_rounds") and timed["half_width"] > 0.01
    functions, timer = planted({"base": [1.0], "x": [1.0, 1.3]}, [])
    timed = interleaved(functions, "cpu", "base", min_rounds=7, max_rounds=50, max_seconds=0.0, timer=timer)
    assert (timed["rounds"], timed["stopped"]) == (7, "max_seconds")


def test_ratios_are_medians_of_per_round_ratios():
    functions, timer = planted({"base": [1.0, 2.0, 1.0], "x": [1.1, 2.0, 1.3]}, [])
    timed = interleaved(functions, "cpu", "base", min_rounds=3, max_rounds=3, max_seconds=60, timer=timer,
                        bracket=False)
    x = summarize(timed, "base")["x"]["cpu"]
    assert x["ratio"] == pytest.approx(1.1)          # median of 1.1, 1.0, 1.3 (not 1.3 / 1.0)
    assert x["median_s"] == pytest.approx(1.3)
    assert (x["low"], x["high"]) == pytest.approx((1.0, 1.3))  # below six rounds: min and max
    assert x["min_ratio"] == pytest.approx(1.1 / 1.0)  # the secondary figure: fastest over fastest


def test_copies_made_anew_turn_a_placement_offset_into_noise():
    """A planted A/A pair whose copy runs 4% fast or slow depending on where it was placed: kept for the
    whole run, the offset is the ratio, with a zero-width interval; copied anew every 2 rounds (a new
    placement each time, alternating), the median ratio is back at 1.00 and the interval shows the spread."""
    placements = iter([0.96, 1.04] * 50)

    def copied(factor):
        return {"base": lambda: 1.0, "copy": lambda: factor}

    timer = (("cpu", "wall"), lambda fn: (fn(),) * 2)
    kept = summarize(interleaved(copied(0.96), "cpu", "base", min_rounds=12, max_rounds=12, max_seconds=60,
                                 timer=timer, bracket=False), "base")["copy"]["cpu"]
    assert (kept["ratio"], kept["low"], kept["high"]) == pytest.approx((0.96, 0.96, 0.96))
    calls = []

    def replace():
        calls.append(len(calls))
        return copied(next(placements))

    timed = interleaved(copied(next(placements)), "cpu", "base", min_rounds=12, max_rounds=12, max_seconds=60,
                        timer=timer, bracket=False, replace=replace, replace_every=2)
    assert timed["replaced"] == len(calls) == 5  # before rounds 2, 4, 6, 8 and 10 (none before the first)
    anew = summarize(timed, "base")["copy"]["cpu"]
    assert anew["ratio"] == pytest.approx(1.0) and anew["low"] < 1.0 < anew["high"]
    never = interleaved(copied(0.96), "cpu", "base", min_rounds=6, max_rounds=6, max_seconds=60, timer=timer,
                        bracket=False, replace=replace, replace_every=0)
    assert never["replaced"] == 0 and len(calls) == 5


# ---- the floor, counted by hand ------------------------------------------------------------------------
def test_floor_of_a_tiny_gpt2_matches_a_hand_count():
    model = load_base("tiny", "cpu")  # n_layer 2, n_embd 32, vocab 96
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (2, 32, 96)
    # per block: c_attn 32x96, attn.c_proj 32x32, mlp.c_fc 32x128, mlp.c_proj 128x32; then lm_head 32x96
    assert sorted((i, o) for _, i, o in linear_layers(model)) == sorted(
        [(32, 96), (32, 32), (32, 128), (128, 32)] * 2 + [(32, 96)])
    weights = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 32 * 96           # 27648 multiply-adds per token
    ends = 2 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)) + (32 + 96)  # 1152: in + out summed
    n, batch, context, r = 2 * 8, 2, 8, 4                                     # prefill 2 x 8
    base_macs = n * weights + 2 * 2 * n * context * 32                       # + attention, 2 layers
    lora_macs = 2 * n * r * (32 + 96)                                        # c_attn in 2 layers
    base_elements = weights + n * ends + 2 * 2 * batch * context * 32        # + K and V read, 2 layers
    lora_elements = 2 * (r * (32 + 96) + 2 * n * r)
    floor = lora_floor(model, ("c_attn",), r, [(batch, 8, context)])
    assert floor["macs"] == pytest.approx(lora_macs / base_macs, rel=1e-12)
    assert floor["bytes"] == pytest.approx(lora_elements / base_elements, rel=1e-12)
    train = lora_floor(model, ("c_attn",), r, [(batch, 8, context)], training=True)
    assert train["macs"] == pytest.approx(3 * lora_macs / (2 * n * weights + 3 * 2 * 2 * n * context * 32))
    # decode: the sums over forwards, not an average of fractions
    steps = [(1, 3, 3), (1, 1, 4)]
    decode = lora_floor(model, ("c_attn",), r, steps)
    macs = [(k * weights + 2 * 2 * k * c * 32, 2 * k * r * 128) for _, k, c in steps]
    assert decode["macs"] == pytest.approx(sum(m[1] for m in macs) / sum(m[0] for m in macs))


def test_floor_reads_the_same_shapes_from_a_model_with_lora_layers():
    import minilora

    bare = load_base("tiny", "cpu")
    injected = minilora.inject(load_base("tiny", "cpu"), lora_config(("c_attn", "c_fc"), 4, 0.0, 2.0))
    assert linear_layers(injected) == linear_layers(bare)
    assert lora_floor(injected, ("c_attn", "c_fc"), 4, [(1, 5, 5)]) == lora_floor(bare, ("c_attn", "c_fc"), 4, [(1, 5, 5)])


def test_every_round_reports_progress_with_an_interval_from_six_rounds_on():
    functions, timer = planted({"base": [1.0], "x": [1.0, 1.3]}, [])
    seen = []
    interleaved(functions, "cpu", "base", min_rounds=8, max_rounds=8, max_seconds=60, timer=timer,
                on_round=lambda k, width: seen.append((k, width)))
    assert [k for k, _ in seen] == list(range(1, 9))
    assert all(width == float("inf") for k, width in seen if k < MIN_ROUNDS)
    assert all(0 < width < float("inf") for k, width in seen if k >= MIN_ROUNDS)
