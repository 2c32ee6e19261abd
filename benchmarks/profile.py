"""Where the time goes: torch.profiler's self time per op, each variant minus the base model.

The LoRA branch adds a handful of small ops per adapted layer. Their cost is not their FLOPs
(about 1% of the model's) but their number and the output-sized tensors they write: the
reference path's ``B(A x)``, ``* s`` and ``+`` each read and write an (N, out) tensor. The
difference table shows which ops the extra milliseconds are spent in.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from .variants import build_variant
from .workloads import Prefill

PROFILED = ("base", "peft", "reference", "fused", "merged")


def self_times_ms(model, workload: Prefill, device: str, repeats: int = 2) -> tuple[dict[str, float], dict[str, int]]:
    """Self time (ms per call) and call count per op name, averaged over ``repeats`` profiled calls."""
    run = workload.prepare(model)
    run()  # warm-up, outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            run()
    times, calls = defaultdict(float), defaultdict(int)
    for event in prof.key_averages():
        self_us = event.self_device_time_total if torch.device(device).type == "cuda" else event.self_cpu_time_total
        times[event.key] += self_us / 1000 / repeats
        calls[event.key] += event.count // repeats
    return dict(times), dict(calls)


def profile_prefill(base, config, weights: dict, shape: tuple, vocab: int, device: str) -> dict:
    """Per variant: total self time, and the ops whose time or call count differs most from base."""
    workload = Prefill(*shape, vocab, device)
    profiles = {}
    for name in PROFILED:
        model = build_variant(name, base, config, weights)
        profiles[name] = self_times_ms(model, workload, device)
        del model
    base_times, base_calls = profiles["base"]
    report = {"shape": list(shape), "targets": config.target_modules, "r": config.r, "variants": {}}
    for name, (times, calls) in profiles.items():
        rows = []
        for op in set(times) | set(base_times):
            extra_ms = times.get(op, 0.0) - base_times.get(op, 0.0)
            extra_calls = calls.get(op, 0) - base_calls.get(op, 0)
            rows.append({"op": op, "ms": times.get(op, 0.0), "extra_ms": extra_ms, "calls": calls.get(op, 0),
                         "extra_calls": extra_calls})
        rows.sort(key=lambda row: -abs(row["extra_ms"]))
        report["variants"][name] = {"total_ms": sum(times.values()), "top": rows[:8],
                                    "extra_calls": sum(calls.values()) - sum(base_calls.values())}
    return report
