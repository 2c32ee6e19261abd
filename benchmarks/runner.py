"""The run: build the variants of each case, validate them, time them, measure memory, profile."""

from __future__ import annotations

import copy
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
from .floor import lora_floor
from .segments import Boundaries
from .timing import interleaved, run_once, summarize
from .variants import (TOLERANCE, adapter_weights, build_variant, load_base, lora_config,
                       relative_difference)
from .workloads import Decode, Generate, Prefill, TrainStep


def make_workload(name: str, params: dict, vocab: int, device: str):
    if name == "prefill":
        return Prefill(*params["shape"], vocab, device)
    if name == "decode":
        return Decode(params["prompt"], params["tokens"], vocab, device)
    if name == "generate":
        return Generate(params["prompt"], params["tokens"], vocab, device)
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
    machine["environment"] = {k: v for k, v in os.environ.items()  # what changes torch's allocator or threads
                              if k.startswith(("THP_MEM_ALLOC", "MALLOC_", "OMP_", "MKL_", "GLIBC_TUNABLES"))}
    if torch.device(device).type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    elif torch.cuda.is_available():
        machine["gpu"] = f"{torch.cuda.get_device_name(0)} (not used)"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    return {"machine": machine, "versions": versions}


class Runner:
    """Runs a Plan on one device; ``progress`` gets one line per step."""

    def __init__(self, plan: Plan, device: str, progress: Callable[[str], None] = lambda line: None):
        self.plan, self.device, self.progress = plan, device, progress
        self.started = time.perf_counter()
        self.results = {**environment(device), "plan": {**plan.to_json(), "notes": plan.run_notes()},
                        "tolerance_float32": TOLERANCE,
                        "measurements": [], "memory": [], "failures": [], "compile_s": {}, "profile": None}

    def log(self, line: str) -> None:
        self.progress(f"[{time.perf_counter() - self.started:6.1f}s] {line}")

    def run(self) -> dict:
        plan = self.plan
        torch.manual_seed(plan.seed)
        self.base = load_base(plan.model, self.device)
        self.vocab = self.base.config.vocab_size
        default_threads = torch.get_num_threads()
        one_thread = plan.threads or default_threads
        self.results["machine"]["threads"] = one_thread
        try:
            self.threads = one_thread
            torch.set_num_threads(one_thread)
            for targets, r in plan.cases():
                self.inference_case(targets, r)
                if self.is_main(targets, r):
                    for dropout in plan.dropouts:
                        self.training_case(targets, r, dropout)
            for n in plan.mixed_adapters:
                self.mixed_case(n)
            if plan.layer_call:
                from .profile import layer_call_overhead
                self.log("timing one tiny layer call each way (the per-call overhead)")
                try:
                    self.results["layer_call"] = layer_call_overhead(self.device)
                except Exception as error:  # e.g. a way that gives another output: reported, not timed
                    self.fail("layer call", "-", error)
            if plan.memory:
                self.memory_runs()
            if plan.profile:
                from .profile import profile_prefill
                self.log("profiling prefill (where the time goes)")
                targets, r = plan.main_case
                config = lora_config(tuple(targets), r, 0.0, plan.lora_alpha_per_r)
                self.results["profile"] = profile_prefill(self.base, config,
                                                          adapter_weights(self.base, config, plan.seed),
                                                          plan.prefill_shapes[0], self.vocab, self.device)
                from .floor import linear_layers
                from .profile import profile_layouts
                shapes = list(dict.fromkeys((i, o) for name, i, o in linear_layers(self.base)
                                            if name.split(".")[-1] in targets))
                self.log(f"profiling the concatenated weight's layout on {len(shapes)} layer shapes")
                self.results["layouts"] = profile_layouts(shapes, r, self.device,
                                                          max_seconds=plan.other_max_seconds / 3)
        finally:
            torch.set_num_threads(default_threads)
        self.results["total_s"] = time.perf_counter() - self.started
        self.results["machine"]["load_average_at_end"] = _load_average()
        return self.results

    # ----------------------------------------------------------------------------------------
    def is_main(self, targets: tuple, r: int) -> bool:
        return (tuple(targets), r) == (tuple(self.plan.main_case[0]), self.plan.main_case[1])

    def compiled_here(self, targets: tuple, r: int, workload, table: str) -> bool:
        """torch.compile is timed on the main case's one-thread table: prefill, and decode / training
        only when the plan asks (Plan.compiled_decode, Plan.compiled_train)."""
        if table != "one thread" or not self.is_main(targets, r):
            return False
        return (workload.name == "prefill" or (workload.name == "decode" and self.plan.compiled_decode)
                or (workload.name == "train" and self.plan.compiled_train and not workload.dropout))

    def inference_case(self, targets: tuple, r: int, table: str = "one thread") -> None:
        plan = self.plan
        config = lora_config(targets, r, 0.0, plan.lora_alpha_per_r)
        weights = adapter_weights(self.base, config, plan.seed)
        main = self.is_main(targets, r) and table == "one thread"
        names = [n for n in plan.inference_variants if (main or n in plan.other_case_variants)
                 and (n != "compiled" or self.is_main(targets, r) and table == "one thread")]
        models = {name: build_variant(name, self.base, config, weights) for name in names}
        shapes = (plan.prefill_shapes if main else plan.prefill_shapes[:1]) if plan.prefill else ()
        workloads = [Prefill(b, s, self.vocab, self.device) for b, s in shapes]
        if plan.decode:
            workloads.append(Decode(plan.decode_prompt, plan.decode_tokens, self.vocab, self.device))
        if plan.generate and main:
            workloads.append(Generate(plan.decode_prompt, plan.decode_tokens, self.vocab, self.device))
        for workload in workloads:
            here = {n: m for n, m in models.items() if n != "compiled" or self.compiled_here(targets, r, workload, table)}
            checked = self.measure(here, workload, targets, r, None, ratio_to="base", table=table)
            if main and (workload.name == "decode" or workload.name == "prefill" and workload is workloads[0]):
                self.all_cores(models, checked, workload, targets, r)  # the first prefill shape, the decode loop
        del models

    def all_cores(self, models: dict, checked: dict, workload, targets: tuple, r: int) -> None:
        """The same measurement again with every core (CPU only), on the validated models (fewer variants,
        at least 3 rounds: on cores shared with other work, threads wait for each other at every op
        and a call can take 10x its one-thread time, so this table may stop at its cap unresolved)."""
        cores, one_thread = os.cpu_count() or 1, self.threads
        if not self.plan.all_cores or torch.device(self.device).type != "cpu" or cores <= one_thread \
                or "base" not in checked:
            return
        names = [n for n in models if n in checked and n in self.plan.all_cores_variants]
        label = f"{workload.name} {workload.shape} targets={','.join(targets)} r={r} [all cores]"
        self.threads = cores
        torch.set_num_threads(cores)
        try:
            self.time_and_record({n: workload.prepare(models[n]) for n in names}, checked, label, "base",
                                 lora_floor(self.base, targets, r, workload.forwards()), {
                                     "table": "all cores", "workload": workload.name, "shape": list(workload.shape),
                                     "targets": list(targets), "r": r, "dropout": None},
                                 self.plan.other_max_seconds, min_rounds=min(3, self.plan.min_rounds),
                                 models=[models[n] for n in names])
        finally:
            self.threads = one_thread
            torch.set_num_threads(one_thread)

    def training_case(self, targets: tuple, r: int, dropout: float) -> None:
        plan = self.plan
        config = lora_config(targets, r, dropout, plan.lora_alpha_per_r)
        weights = adapter_weights(self.base, config, plan.seed)
        workload = TrainStep(*plan.train_shape, self.vocab, self.device, dropout)
        names = [n for n in plan.training_variants
                 if n != "compiled" or self.compiled_here(targets, r, workload, "one thread")]
        models = {name: build_variant(name, self.base, config, weights) for name in names}
        self.measure(models, workload, targets, r, dropout, ratio_to="peft")
        del models

    def validate(self, models: dict, workload, label: str, dropout) -> dict:
        """{variant: max relative difference to the reference path (None for the base models)}, the
        variants that failed left out (and reported). Also warms every variant up."""
        checked, expected = {}, None
        for name in sorted(models, key=lambda n: n != "reference"):  # the reference first: the expected values
            if name != "reference" and expected is None:
                self.fail(label, "reference", "the reference path failed: nothing can be validated or timed")
                return {}
            started = time.perf_counter()
            try:
                got = workload.check(models[name])
                expected = got if name == "reference" else expected
            except Exception as error:  # a variant that cannot run here is reported, not fatal
                self.fail(label, name, error)
                continue
            if name == "compiled":
                self.results["compile_s"][label] = time.perf_counter() - started
            if name in ("base", "base-copy"):
                checked[name] = None  # no adapter: nothing to compare
            elif name == "compiled" and workload.name == "train" and dropout:
                checked[name] = "skipped: inductor draws its own dropout masks"
            else:
                difference = self.validated(label, name, got, expected, "the reference")
                if difference is None:
                    continue
                checked[name] = difference
        return checked

    def measure(self, models: dict, workload, targets: tuple, r: int, dropout, ratio_to: str,
                table: str = "one thread") -> dict:
        """Validate every variant against the reference path, then time the valid ones together;
        returns {variant: its validation result} for the variants that passed."""
        label = f"{workload.name} {workload.shape} targets={','.join(targets)} r={r}" + (
            f" dropout={dropout}" if dropout is not None else "") + f" [{table}]"
        self.log(f"{label}: validating {len(models)} variants")
        checked = self.validate(models, workload, label, dropout)
        if ratio_to not in checked:
            if checked:
                self.fail(label, ratio_to, "the ratio reference failed; nothing timed")
            return checked
        functions = {name: workload.prepare(models[name]) for name in models if name in checked}  # table order
        lora = lora_floor(self.base, targets, r, workload.forwards(), training=workload.name == "train")
        main = self.is_main(targets, r) and table == "one thread"
        replace = self.replacer(models, functions, workload) \
            if table == "one thread" and workload.name != "train" and self.plan.replace_every else None
        self.time_and_record(functions, checked, label, ratio_to, lora, {
            "table": table, "workload": workload.name, "shape": list(workload.shape), "targets": list(targets),
            "r": r, "dropout": dropout}, self.seconds_for(workload.name, main),
            models=[models[name] for name in functions], replace=replace)
        return checked

    @staticmethod
    def replacer(models: dict, functions: dict, workload) -> Callable[[], dict]:
        """A function that copies every timed model anew (``copy.deepcopy``: new memory for every weight;
        the old copy is freed) and returns their workload functions, each run once untimed (a fused layer
        rebuilds its concatenated buffer then). A deep copy computes what the validated model computed,
        bit for bit. The compiled variant keeps its model: a copy would compile again."""
        def replace() -> dict:
            fresh = {}
            for name, function in functions.items():
                if name == "compiled":
                    fresh[name] = function
                    continue
                models[name] = copy.deepcopy(models[name])
                fresh[name] = workload.prepare(models[name])
                run_once(fresh[name])
            functions.update(fresh)
            return dict(fresh)
        return replace

    def seconds_for(self, workload: str, main: bool) -> float:
        """The cap on seconds of rounds for one measurement."""
        plan = self.plan
        if not main:
            return plan.other_max_seconds
        if workload == "train" and plan.train_max_seconds is not None:
            return plan.train_max_seconds
        return plan.max_seconds

    def time_and_record(self, functions: dict, checked: dict, label: str, ratio_to: str, lora: dict,
                        fields: dict, seconds: float, tokens: int | None = None, min_rounds: int | None = None,
                        models: list | None = None, replace: Callable[[], dict] | None = None) -> None:
        """Time the validated functions in interleaved rounds and add one measurement per variant.

        On a CPU with one torch thread, ``plan.segments`` and a workload in ``plan.segment_workloads``
        (none by default: plan.SEGMENTS_NOTE says why), the rounds run in segment lockstep
        (benchmarks/segments.py) with block hooks on ``models``, removed afterwards; otherwise (CUDA,
        the all-cores table) bracketed or in step lockstep. With several torch threads each variant's
        thread would have its own OpenMP team, whose idle spinning would land in the next segment's
        process CPU time."""
        plan = self.plan
        segmented = plan.segments and torch.device(self.device).type == "cpu" and self.threads == 1 \
            and fields["workload"] in plan.segment_workloads
        self.log(f"{label}: timing {', '.join(functions)}" + (" (segment lockstep)" if segmented else ""))
        with Boundaries(models if segmented and models else []):
            timed = interleaved(functions, self.device, ratio_to, min_rounds or plan.min_rounds, plan.max_rounds,
                                seconds, plan.resolution, bracket=plan.bracket, segments=segmented,
                                on_round=lambda k, width: self.round_line(label, k, width),
                                replace=None if segmented else replace, replace_every=plan.replace_every)
        summary = summarize(timed, ratio_to)
        for name, clocks in summary.items():
            no_adapter = name in ("base", "base-copy", "merged", "peft-merged")
            self.results["measurements"].append({
                **fields, "threads": self.threads, "variant": name, "ratio_to": ratio_to,
                "rounds": timed["rounds"], "stopped": timed["stopped"], "half_width": timed["half_width"],
                "bracketed": timed["bracketed"], "lockstep": timed["lockstep"], "replaced": timed["replaced"],
                **({"segments": timed["segments"][name]} if "segments" in timed else {}),
                "clock": timed["clocks"][0], "clocks": clocks, "validation_max_rel_diff": checked[name],
                "floor": {"macs": 0.0, "bytes": 0.0} if no_adapter else lora,
                **({"tokens": tokens} if tokens else {}),
            })
        first = timed["clocks"][0]
        line = "  ".join(f"{name} {c[first]['ratio']:.3f}" for name, c in summary.items())
        self.log(f"{label}: {timed['rounds']} rounds ({timed['stopped']}), {first} time x{ratio_to}: {line}")

    def round_line(self, label: str, k: int, width: float) -> None:
        """The progress line after round k: every round, at most one line per 5 s (short rounds)."""
        now = time.perf_counter()
        if k == self.plan.min_rounds or now - getattr(self, "_last_line", 0.0) >= 5.0:
            self._last_line = now
            self.log(f"{label}: round {k}, " + (f"widest interval +-{width * 100:.1f}%" if width != float("inf")
                                                 else "no interval yet"))

    def mixed_case(self, n: int) -> None:
        """A batch whose row i runs adapter i mod n: PEFT's adapter_names, minilora's, the gathered form,
        against one merged adapter on the same batch. Every variant is checked row by row first."""
        from . import mixed

        plan = self.plan
        targets, r = plan.main_case
        config = lora_config(tuple(targets), r, 0.0, plan.lora_alpha_per_r)
        names = [mixed.adapter_name(i % n) for i in range(plan.mixed_batch)]
        source = mixed.minilora_with_adapters(self.base, config, n, plan.seed)
        builders = {
            "merged": lambda: mixed.merged_single(source),
            "peft-mixed": lambda: mixed.peft_with_adapters(self.base, config, source, n),
            "minilora-mixed": lambda: copy.deepcopy(source),
            "gathered": lambda: mixed.gathered_model(copy.deepcopy(source), [mixed.adapter_name(i) for i in range(n)]),
        }
        table = f"mixed batch, {n} adapter{'s' if n > 1 else ''}"
        workloads = [mixed.MixedPrefill(plan.mixed_batch, plan.mixed_seq, self.vocab, self.device),
                     mixed.MixedDecode(plan.mixed_batch, plan.decode_prompt, plan.mixed_tokens, self.vocab, self.device)]
        models = {}
        for name in plan.mixed_variants:
            try:
                models[name] = builders[name]()
            except Exception as error:
                self.fail(table, name, error)
        for workload in workloads:
            label = f"{workload.name} {workload.shape} [{table}]"
            self.log(f"{label}: validating {len(models)} variants row by row")
            expected = mixed.rows_alone(workload, copy.deepcopy(source), names)
            checked, functions = {}, {}
            for name, model in models.items():
                forward = mixed.forward_function(name, model, names)
                try:
                    got = workload.run(forward)
                except Exception as error:  # e.g. a minilora without adapter_names
                    self.fail(label, name, error)
                    continue
                if name == "merged" and n > 1:
                    checked[name] = "one adapter (the cost floor)"
                elif name == "minilora-mixed" and n > 1 and mixed.ignores_adapter_names(workload, model, got):
                    self.skip(label, name, "this minilora has no mixed-batch forward (adapter_names was ignored)")
                    continue
                else:
                    difference = self.validated(label, name, got, expected, "each row run alone")
                    if difference is None:
                        continue
                    checked[name] = difference
                functions[name] = (lambda workload, forward: lambda: workload.run(forward))(workload, forward)
            if "merged" not in checked:
                self.fail(label, "merged", "the ratio reference failed; nothing timed")
                continue
            lora = lora_floor(self.base, targets, r, workload.forwards(), adapters=n)
            self.time_and_record(functions, checked, label, "merged", lora, {
                "table": table, "workload": workload.name, "shape": list(workload.shape), "targets": list(targets),
                "r": r, "dropout": None, "adapters": n}, plan.other_max_seconds, tokens=workload.tokens(),
                min_rounds=plan.mixed_min_rounds, models=[models[name] for name in functions])
        del models

    def validated(self, label: str, variant: str, got, expected, against: str) -> float | None:
        """The relative difference of ``got`` from ``expected``, or None (and a failure row: not timed)
        when it is above TOLERANCE."""
        difference = relative_difference(got, expected)
        if not difference <= TOLERANCE:  # (NaN too)
            self.fail(label, variant, f"differs from {against} by {difference:.3g} (relative) > {TOLERANCE:g}; "
                                      "not timed")
            return None
        return difference

    def skip(self, label: str, variant: str, why: str) -> None:
        """A variant that does not apply here: said on the page, not a failure."""
        self.results.setdefault("skipped", []).append({"measurement": label, "variant": variant, "why": why})
        self.log(f"{label}: {variant} skipped: {why}")

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
                 for v in plan.inference_variants if v in ("base", "peft", "reference", "fused")]
        specs += [{**common, "variant": v, "workload": "train", "shape": list(plan.train_shape), "dropout": d}
                  for d in plan.dropouts for v in plan.training_variants if v not in ("compiled", "peft-copy")]
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
