"""The run: build the variants of each case, validate them, time them, measure memory, profile."""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from . import memory
from .plan import Plan
from .timing import interleaved, summarize
from .variants import (TOLERANCE, adapter_weights, build_variant, load_base, lora_config,
                       relative_difference)
from .workloads import Decode, Prefill, TrainStep


def make_workload(name: str, params: dict, vocab: int, device: str):
    if name == "prefill":
        return Prefill(*params["shape"], vocab, device)
    if name == "decode":
        return Decode(params["prompt"], params["tokens"], vocab, device)
    if name == "train":
        return TrainStep(*params["shape"], vocab, device, params["dropout"])
    raise ValueError(f"unknown workload {name!r}")


def _load_average() -> list[str]:
    """The 1, 5 and 15 minute load averages: above the core count, the timings were shared."""
    try:
        with open("/proc/loadavg") as loadavg:
            return loadavg.read().split()[:3]
    except OSError:
        return ["?"]


def environment(device: str) -> dict:
    import peft
    import transformers

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "threads": torch.get_num_threads(), "python": sys.version.split()[0], "device": device}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            machine["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine["load_average_at_start"] = _load_average()
    if torch.device(device).type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    elif torch.cuda.is_available():
        machine["gpu"] = f"{torch.cuda.get_device_name(0)} (not used)"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    return {"machine": machine, "versions": versions}


def lora_flop_fraction(model, targets: tuple, r: int, seq: int) -> float:
    """Extra multiply-adds of the LoRA branches over the base model's, per token (the FLOP floor).

    Per token the base does one multiply-add per weight of every matmul (blocks and LM head) and
    about 2 * seq * d for attention (scores and the weighted sum) per layer; LoRA adds r * (in + out)
    per adapted layer.
    """
    from transformers.pytorch_utils import Conv1D

    import minilora
    base_macs, lora_macs = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, (Conv1D, torch.nn.Linear)):
            fan_in, fan_out = minilora.layer.in_out_features(module)
            base_macs += fan_in * fan_out
            if name.split(".")[-1] in targets:
                lora_macs += r * (fan_in + fan_out)
    config = model.config
    base_macs += config.n_layer * 2 * seq * config.n_embd
    return lora_macs / base_macs


class Runner:
    """Runs a Plan on one device; ``progress`` gets one line per step."""

    def __init__(self, plan: Plan, device: str, progress: Callable[[str], None] = lambda line: None):
        self.plan, self.device, self.progress = plan, device, progress
        self.started = time.perf_counter()
        self.results = {**environment(device), "plan": plan.to_json(), "tolerance_float32": TOLERANCE,
                        "measurements": [], "memory": [], "failures": [], "compile_s": {}, "profile": None}

    def log(self, line: str) -> None:
        self.progress(f"[{time.perf_counter() - self.started:6.1f}s] {line}")

    def run(self) -> dict:
        plan = self.plan
        torch.manual_seed(plan.seed)
        self.base = load_base(plan.model, self.device)
        self.vocab = self.base.config.vocab_size
        for targets, r in plan.cases():
            self.inference_case(targets, r)
            for dropout in plan.dropouts:
                self.training_case(targets, r, dropout)
        if plan.memory:
            self.memory_runs()
        if plan.profile:
            from .profile import profile_prefill
            self.log("profiling prefill (where the time goes)")
            targets, r = plan.main_case
            config = lora_config(tuple(targets), r, 0.0, plan.lora_alpha_per_r)
            self.results["profile"] = profile_prefill(self.base, config, adapter_weights(self.base, config, plan.seed),
                                                      max(plan.prefill_shapes, key=lambda s: s[0] * s[1]),
                                                      self.vocab, self.device)
        self.results["total_s"] = time.perf_counter() - self.started
        self.results["machine"]["load_average_at_end"] = _load_average()
        return self.results

    # ----------------------------------------------------------------------------------------
    def is_main(self, targets: tuple, r: int) -> bool:
        return (tuple(targets), r) == (tuple(self.plan.main_case[0]), self.plan.main_case[1])

    def compiled_here(self, targets: tuple, r: int, workload) -> bool:
        """Where torch.compile is timed: see Plan.compiled_where."""
        if self.plan.compiled_where == "all":
            return True
        largest = max(self.plan.prefill_shapes, key=lambda s: s[0] * s[1])
        return self.is_main(targets, r) and (
            (workload.name == "prefill" and tuple(workload.shape) == tuple(largest))
            or (workload.name == "decode" and self.plan.compiled_decode)
            or (workload.name == "train" and self.plan.compiled_train and not workload.dropout))

    def inference_case(self, targets: tuple, r: int) -> None:
        plan = self.plan
        config = lora_config(targets, r, 0.0, plan.lora_alpha_per_r)
        weights = adapter_weights(self.base, config, plan.seed)
        main = self.is_main(targets, r)
        names = [n for n in plan.inference_variants if main or n in plan.other_case_variants]
        models = {name: build_variant(name, self.base, config, weights) for name in names}
        shapes = plan.prefill_shapes if main else [max(plan.prefill_shapes, key=lambda s: s[0] * s[1])]
        workloads = [Prefill(b, s, self.vocab, self.device) for b, s in shapes]
        workloads.append(Decode(plan.decode_prompt, plan.decode_tokens, self.vocab, self.device))
        for workload in workloads:
            here = {n: m for n, m in models.items() if n != "compiled" or self.compiled_here(targets, r, workload)}
            self.measure(here, workload, targets, r, None, ratio_to="base")
        del models

    def training_case(self, targets: tuple, r: int, dropout: float) -> None:
        plan = self.plan
        config = lora_config(targets, r, dropout, plan.lora_alpha_per_r)
        weights = adapter_weights(self.base, config, plan.seed)
        workload = TrainStep(*plan.train_shape, self.vocab, self.device, dropout)
        names = [n for n in plan.training_variants if (n != "compiled" or self.compiled_here(targets, r, workload))
                 and (self.is_main(targets, r) or n in plan.other_case_variants)]
        models = {name: build_variant(name, self.base, config, weights) for name in names}
        self.measure(models, workload, targets, r, dropout, ratio_to="peft")
        del models

    def measure(self, models: dict, workload, targets: tuple, r: int, dropout, ratio_to: str) -> None:
        """Validate every variant against the reference path, then time the valid ones together."""
        plan = self.plan
        label = f"{workload.name} {workload.shape} targets={','.join(targets)} r={r}" + (
            f" dropout={dropout}" if dropout is not None else "")
        self.log(f"{label}: validating {len(models)} variants")
        checked, check_s, expected = {}, {}, None
        for name in sorted(models, key=lambda n: n != "reference"):  # the reference first: the expected values
            if name != "reference" and expected is None:
                self.fail(label, "reference", "the reference path failed: nothing can be validated or timed")
                return
            model = models[name]
            started = time.perf_counter()
            try:
                got = workload.check(model)
                expected = got if name == "reference" else expected
            except Exception as error:  # a variant that cannot run here is reported, not fatal
                self.fail(label, name, error)
                continue
            check_s[name] = time.perf_counter() - started
            if name == "compiled":
                self.results["compile_s"][label] = check_s[name]
                check_s[name] = check_s.get("reference", check_s[name])
            if name == "base":
                checked[name] = None  # the base model has no adapter: nothing to compare
            elif name == "compiled" and workload.name == "train" and dropout:
                checked[name] = "skipped: inductor draws its own dropout masks"
            else:
                difference = relative_difference(got, expected)
                if difference > TOLERANCE:
                    self.fail(label, name, f"output differs from the reference by {difference:.3g} "
                                           f"(relative) > {TOLERANCE:g}; not timed")
                    continue
                checked[name] = difference
        if ratio_to not in checked:
            self.fail(label, ratio_to, "the ratio reference failed; nothing timed")
            return
        functions = {name: workload.prepare(models[name]) for name in models if name in checked}  # table order
        self.log(f"{label}: timing {', '.join(functions)}")
        seconds = plan.main_case_seconds if self.is_main(targets, r) else plan.seconds_per_measurement
        samples = interleaved(functions, self.device, plan.warmup, plan.min_rounds, plan.max_rounds, seconds,
                              round_estimate_s=sum(check_s[name] for name in functions))
        summary = summarize(samples, ratio_to)
        floor = lora_flop_fraction(self.base, targets, r, workload.shape[1])
        for name, stats in summary.items():
            self.results["measurements"].append({
                "workload": workload.name, "shape": list(workload.shape), "targets": list(targets), "r": r,
                "dropout": dropout, "variant": name, "ratio_to": ratio_to, "rounds": len(stats["samples_s"]),
                "validation_max_rel_diff": checked[name], "flop_floor": floor, **stats,
            })
        line = "  ".join(f"{name} {stats['ratio']:.3f}" for name, stats in summary.items())
        self.log(f"{label}: x{ratio_to}: {line}")

    def fail(self, label: str, variant: str, error) -> None:
        message = error if isinstance(error, str) else \
            f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if not isinstance(error, str):
            self.results.setdefault("tracebacks", []).append("".join(traceback.format_exception(error))[-4000:])
        self.results["failures"].append({"measurement": label, "variant": variant, "error": message})
        self.log(f"{label}: {variant} FAILED: {message}")

    # ----------------------------------------------------------------------------------------
    def memory_runs(self) -> None:
        """Peak memory of the main case's variants, each in its own process (two at a time)."""
        plan = self.plan
        targets, r = plan.main_case
        common = {"model": plan.model, "device": self.device, "targets": list(targets), "r": r,
                  "alpha_per_r": plan.lora_alpha_per_r, "seed": plan.seed, "threads": plan.threads}
        largest = max(plan.prefill_shapes, key=lambda s: s[0] * s[1])
        specs = [{**common, "variant": v, "workload": "prefill", "shape": list(largest), "dropout": 0.0}
                 for v in plan.inference_variants if v != "compiled"]
        specs += [{**common, "variant": v, "workload": "train", "shape": list(plan.train_shape), "dropout": d}
                  for d in plan.dropouts for v in plan.training_variants if v != "compiled"]
        self.log(f"memory: {len(specs)} variants, one process each")
        on_cuda = torch.device(self.device).type == "cuda"
        if on_cuda:  # in process: CUDA counts only this process's allocations anyway
            measured = [memory.child_main(spec) for spec in specs]
        else:
            with ThreadPoolExecutor(max_workers=2) as pool:
                measured = list(pool.map(memory.in_child, specs))
        for spec, result in zip(specs, measured):
            self.results["memory"].append({**spec, **result})
            if result.get("error"):
                self.fail(f"memory {spec['workload']}", spec["variant"], result["error"])
