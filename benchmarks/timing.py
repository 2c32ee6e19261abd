"""Interleaved timing: rounds in alternating order, two clocks, and rounds until the ratios are resolved.

A shared machine slows whatever runs while the noise lasts. Three things keep that out of the
ratios:

- **CPU time.** On a CPU every call is timed by the process's CPU time (``time.process_time``:
  the seconds the process's threads ran) as well as by wall time. Time spent waiting for a core
  that another process holds counts in wall time but not in CPU time. With one torch thread
  (the default for the ratio tables) the process's CPU time is that thread's. On CUDA the first
  clock is a pair of CUDA events (the GPU's time), the second the host's wall time.
- **Ratios within a round.** Each round times every variant once; each variant's ratio is taken
  against the reference variant *of the same round*, so slow drifts cancel.
- **Alternating order.** Even rounds run the variants in a rotation of table order, odd rounds
  the same rotation reversed (A B C, C B A, B C A, A C B, ...): a linear drift over two rounds
  cancels, and no variant always runs first after the between-round pause.

Rounds continue until the bootstrap 95% interval of every variant's median ratio (on the first
clock) lies within +-``resolution`` of its median, or until a cap (``max_rounds`` or
``max_seconds``); a measurement that hit the cap says by how much it was not resolved.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

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


def per_round_ratios(samples: list[float], reference: list[float]) -> list[float]:
    return [t / r for t, r in zip(samples, reference, strict=True)]


def widest_half_width(samples: dict[str, list[float]], reference: str) -> float:
    """The widest interval half-width (ratio units) over the variants' median per-round ratios."""
    widest = 0.0
    for name, times in samples.items():
        if name != reference:
            widest = max(widest, half_width(*median_interval(per_round_ratios(times, samples[reference]))))
    return widest


def interleaved(functions: dict[str, Callable[[], object]], device: str, reference: str, min_rounds: int,
                max_rounds: int, max_seconds: float, resolution: float = RESOLUTION,
                on_round: Callable[[int, float], None] = lambda k, width: None, timer=None) -> dict:
    """Time every function in rounds until the ratios to ``reference`` are resolved or a cap is hit.

    Returns ``{"clocks": (first, second), "samples": {clock: {name: [seconds per round]}},
    "rounds": n, "stopped": "resolved" | "max_rounds" | "max_seconds", "half_width": widest}``.
    The first clock decides when to stop; ``on_round(k, widest)`` is called after each round from
    ``min_rounds`` on (for progress lines). ``timer``: (clock names, measure) in place of
    ``clocks(device)`` (the tests plant one).
    """
    (first, second), measure = timer or clocks(device)
    names = list(functions)
    samples = {first: {n: [] for n in names}, second: {n: [] for n in names}}
    started, stopped, widest, k = time.perf_counter(), "max_rounds", float("inf"), 0
    for k in range(max_rounds):
        for name in round_order(names, k):
            one, two = measure(functions[name])
            samples[first][name].append(one)
            samples[second][name].append(two)
        if k + 1 >= min_rounds:
            widest = widest_half_width(samples[first], reference)
            on_round(k + 1, widest)
            if widest <= resolution and k + 1 >= MIN_ROUNDS:  # fewer rounds: no 95% interval exists
                stopped = "resolved"
                break
            if k + 1 < max_rounds and time.perf_counter() - started >= max_seconds:
                stopped = "max_seconds"
                break
    return {"clocks": (first, second), "samples": samples, "rounds": k + 1 if names else 0,
            "stopped": stopped, "half_width": widest}


def summarize(timed: dict, reference: str) -> dict[str, dict]:
    """Per variant and clock: median seconds, and the median per-round ratio with its 95% interval."""
    summary = {}
    for name in timed["samples"][timed["clocks"][0]]:
        entry = {}
        for clock in timed["clocks"]:
            times, base = timed["samples"][clock][name], timed["samples"][clock][reference]
            ratio, low, high = median_interval(per_round_ratios(times, base))
            entry[clock] = {"median_s": statistics.median(times), "samples_s": times,
                            "ratio": ratio, "low": low, "high": high}
        summary[name] = entry
    return summary
