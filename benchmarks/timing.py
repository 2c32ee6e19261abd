"""Interleaved timing: rounds in alternating order, two clocks, and rounds until the ratios are resolved.

A shared machine slows whatever runs while the noise lasts, and even a quiet VM's speed drifts:
its host's other tenants make a call's user CPU time swing by up to 30% in bursts of 0.1-2 s.
These things keep that out of the ratios:

- **CPU time.** On a CPU every call is timed by CPU time (the seconds the threads ran) as well as
  by wall time. Time spent waiting for a core that another process holds counts in wall time but
  not in CPU time. With one torch thread (the default for the ratio tables) the work of a call is
  its calling thread's. On CUDA the first clock is a pair of CUDA events (the GPU's time), the
  second the host's wall time.
- **Ratios within a round.** Each round times every variant once; each variant's ratio is taken
  against the reference variant *of the same round*, so slow drifts cancel.
- **Step lockstep and bracketing (the default).** A workload made of steps (``Steps``:
  decode's forwards, a training step's forward and backward) runs in step lockstep: step j of
  every variant, then step j + 1. A workload of one call is *bracketed*: the reference runs
  before, between and after the other variants (R a R b R c R), and each variant's ratio is to
  the mean of the two reference calls around it, which cancels a drift that is linear over those
  three calls.
- **Segment lockstep (optional; CPU, one torch thread).** Each variant's round runs in a thread
  of its own, and a baton passes between the threads at the model's block boundaries (benchmarks/segments.py): block k of every
  variant, then block k + 1 of every variant, ... including the backward and every step of a
  workload (decode's tokens). Every variant's work then lies in the same windows of a few to
  ~30 ms, far shorter than the bursts, which hit all variants alike. The round's time of a
  variant is the sum of its segments, each timed in its own thread.
- **Alternating order.** Rounds (and each segment or step within them) run the variants in a
  rotation of table order, then that rotation reversed (A B C, C B A, B C A, A C B, ...): a linear
  drift over two cancels, and no variant always runs first after the between-round pause.
- **Re-placement.** Two identical copies of a model run a few % apart for as long as they live
  (where their weights landed in memory); with ``replace`` every variant's model is copied anew every
  ``replace_every`` rounds (``Runner.replacer``), so that offset becomes noise inside the interval.

Which workloads run in segments is the plan's choice (``Plan.segment_workloads``: none by
default). Measured on the 2-core VM (one thread, CPU time, both methods in alternate rounds under
the same load; numbers in the README's method paragraph), segments narrowed every interval 2-3x
in the same seconds, but at prefill they raised PEFT's and the reference's ratios by 3-7% and at
decode the LoRA paths' by up to ~1%: each block starts with caches emptied by the other variants'
blocks, which a model running alone does not pay (plan.SEGMENTS_NOTE).

Rounds continue until the bootstrap 95% interval of every variant's median ratio (on the first
clock) lies within +-``resolution`` of its median, or until a cap (``max_rounds`` or
``max_seconds``); a measurement that hit the cap says by how much it was not resolved.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .segments import Threads, segment_round
from .stats import MIN_ROUNDS, RESOLUTION, half_width, median_interval


def clocks(device: str) -> tuple[tuple[str, str], Callable[[Callable[[], object]], tuple[float, float]]]:
    """(names of the two clocks, a function that runs ``fn`` once and returns its two times in seconds).

    CPU: ("cpu", "wall") = process CPU time and perf_counter. CUDA: ("cuda", "wall") = CUDA events
    around the call (synchronized after) and the host's wall time for the same call.
    """
    if torch.device(device).type == "cuda":
        def cuda_time(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            wall = time.perf_counter()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0, time.perf_counter() - wall
        return ("cuda", "wall"), cuda_time

    def cpu_time(fn):
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        return time.process_time() - cpu, time.perf_counter() - wall
    return ("cpu", "wall"), cpu_time


def round_order(names: list[str], k: int) -> list[str]:
    """Round k's order: a rotation of table order on even rounds, that rotation reversed on odd ones.

    Rounds 2j and 2j + 1 start at variant j mod n and run there and back (A B C, C B A, B C A,
    A C B, ...): a linear drift within the pair cancels, and every variant is first equally often
    (the first call of a round comes after the between-round bookkeeping).
    """
    shift = (k // 2) % max(len(names), 1)
    rotated = list(names[shift:]) + list(names[:shift])
    return rotated if k % 2 == 0 else rotated[::-1]


class Steps:
    """A variant's work in one round as a list of steps (``start()`` returns the round's step
    functions, which may share state, e.g. a KV cache). The steps of all variants are timed in
    lockstep, and the variant's time for the round is their sum."""

    def __init__(self, start: Callable[[], list[Callable[[], object]]]):
        self.start = start


def _round_steps(function) -> list[Callable[[], object]]:
    return function.start() if isinstance(function, Steps) else [function]


def run_once(function: Callable[[], object] | Steps) -> None:
    """One round's worth of ``function``, untimed (all its steps, in order)."""
    for step in _round_steps(function):
        step()


def per_round_ratios(samples: list[float], reference: list[float]) -> list[float]:
    return [t / r for t, r in zip(samples, reference, strict=True)]


def widest_half_width(samples: dict[str, list[float]], paired: dict[str, list[float]], reference: str) -> float:
    """The widest interval half-width (ratio units) over the variants' median per-round ratios;
    ``paired[name]``: the reference's time each round's ratio of ``name`` is taken to."""
    widest = 0.0
    for name, times in samples.items():
        if name != reference:
            widest = max(widest, half_width(*median_interval(per_round_ratios(times, paired[name]))))
    return widest


def one_round(functions: dict, reference: str, k: int, measure, bracket: bool) -> tuple[dict, dict]:
    """Run round ``k``: ({name: (clock one, clock two) totals}, {name: the reference's (one, two) that
    name's ratio is taken to}). Workloads of several steps run in lockstep; a single-call round is
    bracketed by the reference when ``bracket`` (see the module docstring)."""
    names = list(functions)
    steps = {name: _round_steps(functions[name]) for name in names}
    totals = {name: [0.0, 0.0] for name in names}
    single = all(len(s) == 1 for s in steps.values())
    if bracket and single and len(names) > 1:
        others = round_order([n for n in names if n != reference], k)
        around = [measure(steps[reference][0])]                    # R a R b R ... R
        for name in others:
            totals[name] = list(measure(steps[name][0]))
            around.append(measure(steps[reference][0]))
        paired = {name: [(around[i][c] + around[i + 1][c]) / 2 for c in (0, 1)] for i, name in enumerate(others)}
        totals[reference] = [sum(t[c] for t in around) / len(around) for c in (0, 1)]
        paired[reference] = totals[reference]
        return totals, paired
    for j in range(max(len(s) for s in steps.values())):
        for name in round_order(names, k * max(len(s) for s in steps.values()) + j):
            if j < len(steps[name]):
                one, two = measure(steps[name][j])
                totals[name][0] += one
                totals[name][1] += two
    return totals, {name: totals[reference] for name in names}


def segmented_round(functions: dict, k: int, clock, threads=None) -> tuple[dict, dict]:
    """Run round ``k`` in segment lockstep (benchmarks/segments.py): ({name: (cpu, wall) totals, the
    sums of its segments}, {name: the segment count}). Segment j runs the variants in
    ``round_order(names, k * 1000 + j)``."""
    names = list(functions)
    segments = segment_round({name: _round_steps(functions[name]) for name in names},
                             lambda j: round_order(names, k * 1000 + j), clock, threads)
    totals = {name: [sum(s[0] for s in segs), sum(s[1] for s in segs)] for name, segs in segments.items()}
    return totals, {name: len(segs) for name, segs in segments.items()}


def interleaved(functions: dict[str, Callable[[], object] | Steps], device: str, reference: str, min_rounds: int,
                max_rounds: int, max_seconds: float, resolution: float = RESOLUTION,
                on_round: Callable[[int, float], None] = lambda k, width: None, timer=None,
                bracket: bool = True, segments: bool = False, clock=None,
                replace: Callable[[], dict] | None = None, replace_every: int = 0) -> dict:
    """Time every function in rounds until the ratios to ``reference`` are resolved or a cap is hit.

    ``functions``: a callable (one call per round) or ``Steps`` per variant. Returns
    ``{"clocks": (first, second), "samples": {clock: {name: [seconds per round]}}, "paired": {clock:
    {name: [the reference's seconds each ratio is taken to]}}, "rounds": n, "stopped": "resolved" |
    "max_rounds" | "max_seconds", "half_width": widest, "bracketed": bool, "lockstep": bool}``. The first clock decides
    when to stop; ``on_round(k, widest)`` is called after every round (for progress lines; widest is
    inf until an interval exists). ``timer``: (clock names, measure) in place of ``clocks(device)`` (the tests plant one).
    ``segments``: time in segment lockstep (CPU only; ``clock``: the segment clock, the tests plant one);
    then the result also has ``"segments"``: {name: segments per round}, and nothing is bracketed.
    ``replace``: called before every ``replace_every``-th round (not with segments), it returns the
    functions to time from then on (``re-placement``: every variant's model copied anew; see
    ``Runner.replacer``); the result's ``"replaced"`` counts the calls.
    """
    (first, second), measure = timer or clocks(device)
    names = list(functions)
    samples = {first: {n: [] for n in names}, second: {n: [] for n in names}}
    paired = {first: {n: [] for n in names}, second: {n: [] for n in names}}
    bracketed = bracket and not segments and len(names) > 1 and not any(isinstance(f, Steps) for f in functions.values())
    started, stopped, widest, k, counts, replaced = time.perf_counter(), "max_rounds", float("inf"), 0, None, 0
    with Threads(names if segments else [], clock) as threads:
        for k in range(max_rounds):
            if replace is not None and replace_every > 0 and not segments and k > 0 and k % replace_every == 0:
                functions, replaced = replace(), replaced + 1  # new placements (untimed, warmed up)
            if segments:
                totals, counts = segmented_round(functions, k, None, threads)
                compared_to = {name: totals[reference] for name in names}
            else:
                totals, compared_to = one_round(functions, reference, k, measure, bracketed)
            for name in names:
                for c, name_of_clock in enumerate((first, second)):
                    samples[name_of_clock][name].append(totals[name][c])
                    paired[name_of_clock][name].append(compared_to[name][c])
            if k + 1 >= min(min_rounds, MIN_ROUNDS):  # fewer rounds: no 95% interval exists
                widest = widest_half_width(samples[first], paired[first], reference)
            on_round(k + 1, widest)
            if k + 1 >= min_rounds:
                if widest <= resolution and k + 1 >= MIN_ROUNDS:
                    stopped = "resolved"
                    break
                if k + 1 < max_rounds and time.perf_counter() - started >= max_seconds:
                    stopped = "max_seconds"
                    break
    return {"clocks": (first, second), "samples": samples, "paired": paired, "rounds": k + 1 if names else 0,
            "stopped": stopped, "half_width": widest, "bracketed": bracketed,
            "lockstep": "segments" if segments else any(isinstance(f, Steps) for f in functions.values()),
            "replaced": replaced, **({"segments": counts} if segments else {})}


def summarize(timed: dict, reference: str) -> dict[str, dict]:
    """Per variant and clock: median seconds, and the median per-round ratio with its 95% interval.

    Also ``min_ratio``, the variant's fastest round over the reference's fastest: a secondary
    figure, robust to rounds slowed by noise but with no interval (verdicts never use it).
    """
    summary = {}
    for name in timed["samples"][timed["clocks"][0]]:
        entry = {}
        for clock in timed["clocks"]:
            times = timed["samples"][clock][name]
            compared_to = timed.get("paired", timed["samples"])[clock][name]
            ratio, low, high = median_interval(per_round_ratios(times, compared_to))
            entry[clock] = {"median_s": statistics.median(times), "samples_s": times, "paired_s": compared_to,
                            "ratio": ratio, "low": low, "high": high, "min_ratio": min(times) / min(compared_to)}
        summary[name] = entry
    return summary
