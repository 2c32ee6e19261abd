"""Interleaved timing: round-robin over the variants, medians, and ratios taken round by round.

A noisy machine slows every variant that runs while the noise lasts. Timing the variants one
after another inside each round, and dividing by the reference variant *of the same round*,
cancels slow drifts; the median over rounds drops the rounds a burst of noise hit. The
interquartile range of the per-round ratios is reported as the noise of each ratio.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    """A function that runs ``fn`` once and returns its seconds: CUDA events on GPUs, else perf_counter."""
    if torch.device(device).type == "cuda":
        def cuda_time(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        return cuda_time

    def cpu_time(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return cpu_time


def interleaved(functions: dict[str, Callable[[], object]], device: str, warmup: int, min_rounds: int,
                max_rounds: int, seconds: float, round_estimate_s: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each function, over interleaved rounds.

    Warm-up: ``warmup`` untimed calls of each. Rounds: as many as fit in ``seconds`` judged from
    the warm-up (or ``round_estimate_s`` without one), clamped to [min_rounds, max_rounds].
    Round k starts at variant k mod n, so no variant always runs first (after a pause) or last.
    """
    measure = timer(device)
    names = list(functions)
    warm = {name: 0.0 for name in names}
    for _ in range(warmup):
        for name in names:
            warm[name] = measure(functions[name])
    round_time = max(sum(warm.values()) if warmup else round_estimate_s, 1e-9)
    rounds = int(min(max_rounds, max(min_rounds, seconds // round_time)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            samples[name].append(measure(functions[name]))
    return samples


def summarize(samples: dict[str, list[float]], reference: str) -> dict[str, dict]:
    """Median seconds, and the median and interquartile range of per-round ratios to ``reference``."""
    summary = {}
    for name, times in samples.items():
        ratios = [t / r for t, r in zip(times, samples[reference])]
        summary[name] = {
            "median_s": statistics.median(times),
            "samples_s": times,
            "ratio": statistics.median(ratios),
            "ratio_iqr": _iqr(ratios),
        }
    return summary


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return quartiles[2] - quartiles[0]
