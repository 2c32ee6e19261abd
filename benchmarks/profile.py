"""Where the time goes: torch.profiler's self time of the LoRA branch's ops, per variant.

The LoRA branch adds a handful of small ops per adapted layer. Their cost is not their FLOPs
(about 1% of the model's) but their number and the output-sized tensors they write: the
reference path's ``B(A x)``, ``* s`` and ``+`` each read and write an (N, out) tensor. The
table shows the time of the LoRA matmuls and of the extra elementwise ops, against the rest.
(The big matmuls' own times move by a few percent from call to call on a shared machine, so
"variant total minus base total" would be mostly noise; the ops are attributed instead.)
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from .variants import build_variant
from .workloads import Prefill

PROFILED = ("base", "peft", "reference", "fused", "fused-addmm", "merged")


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")
ELEMENTWISE = ("aten::add", "aten::mul", "aten::add_", "aten::mul_", "aten::copy_", "aten::to", "aten::_to_copy")


def profile_ops(model, workload: Prefill, device: str, r: int, repeats: int = 2) -> dict:
    """Self time (ms per call of the workload) per op, and the part spent in LoRA-sized matmuls.

    A matmul belongs to the LoRA branch when one of its operands has a dimension equal to r (no
    GPT-2 matmul has one for r in {8, 64}: its dimensions are 768, 2304, 3072, 50257 and the
    token count).
    """
    run = workload.prepare(model)
    run()  # warm-up, outside the profile
    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(repeats):
            run()
    times, calls = defaultdict(float), defaultdict(int)
    lora_ms, lora_calls = 0.0, 0
    for event in prof.key_averages(group_by_input_shape=True):
        self_ms = (event.self_device_time_total if on_cuda else event.self_cpu_time_total) / 1000 / repeats
        times[event.key] += self_ms
        calls[event.key] += event.count // repeats
        if event.key in MATMULS and any(r in shape for shape in event.input_shapes if shape):
            lora_ms += self_ms
            lora_calls += event.count // repeats
    return {"times": dict(times), "calls": dict(calls), "lora_matmul_ms": lora_ms, "lora_matmul_calls": lora_calls}


def profile_prefill(base, config, weights: dict, shape: tuple, vocab: int, device: str) -> dict:
    """Per variant: total op self time, LoRA matmuls, and the extra elementwise ops vs base.

    The extra elementwise time is estimated as (extra calls) x (that op's mean time per call in
    this variant): the reference path's ``* s`` and ``+`` on (N, out) tensors, for instance.
    """
    workload = Prefill(*shape, vocab, device)
    profiles = {}
    for name in PROFILED:
        model = build_variant(name, base, config, weights)
        profiles[name] = profile_ops(model, workload, device, config.r)
        del model
    base_profile = profiles["base"]
    report = {"shape": list(shape), "targets": config.target_modules, "r": config.r, "variants": {}}
    for name, data in profiles.items():
        times, calls = data["times"], data["calls"]
        extra_elementwise = []
        for op in ELEMENTWISE:
            extra = calls.get(op, 0) - base_profile["calls"].get(op, 0)
            if extra > 0 and calls.get(op):
                extra_elementwise.append({"op": op, "extra_calls": extra,
                                          "extra_ms": extra * times[op] / calls[op]})
        lora_ms = data["lora_matmul_ms"] + sum(row["extra_ms"] for row in extra_elementwise)
        total = sum(times.values())
        report["variants"][name] = {
            "total_ms": total, "lora_matmul_ms": data["lora_matmul_ms"], "lora_matmul_calls": data["lora_matmul_calls"],
            "extra_elementwise": extra_elementwise, "lora_ms": lora_ms,
            "lora_share": lora_ms / max(total - lora_ms, 1e-9),
            "extra_calls": sum(calls.values()) - sum(base_profile["calls"].values()),
        }
    return report


# ------------------------------------------------------------------------------------------------
# Why the concatenated weight's layout matters (one layer, raw tensors)
# ------------------------------------------------------------------------------------------------
def layout_forms(fan_in: int, fan_out: int, r: int, rows: int, device: str, seed: int = 0) -> dict:
    """The ways to compute one Conv1D layer's ``x W0 + b + s (x A^T) B^T`` for ``rows`` tokens.

    ``base``: Conv1D's own ``addmm(b, x, W0)`` (no LoRA: the floor). ``addmm``: the base matmul,
    ``x A^T`` and ``addmm_`` (fused, concatenate=False). ``rows [W0; A]``: one matmul over the
    buffer stacked as nn.Linear stores weights, (out + r, in), then the slice and ``addmm_`` with
    B in its own layout (the fused path before). ``cols [W0, A^T]``: the buffer in Conv1D's own
    layout, (in, out + r), B in its own layout; ``cols, B^T rows``: the same with B stored as B^T's
    rows (the fused path now; ``addmm`` stores B that way too). ``... matmul only``: the big matmul
    without the slice and the rank-r ``addmm_``, in each layout.
    """
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator).to(device) * 0.05
    x, W0, b, A, B = make(rows, fan_in), make(fan_in, fan_out), make(fan_out), make(r, fan_in), make(fan_out, r)
    B_rows = B.T.contiguous()                                 # (r, out): B^T's rows
    rows_buffer = torch.cat([W0.T, A])                        # (out + r, in)
    cols_buffer = torch.cat([W0, A.T], dim=1)                 # (in, out + r)
    bias_buffer = torch.cat([b, b.new_zeros(r)])

    def addmm_path():
        out = torch.addmm(b, x, W0)
        return out.addmm_(torch.nn.functional.linear(x, A), B_rows, alpha=2.0)

    def concatenated(both, B_T):
        out, xa = both[:, :fan_out], both[:, fan_out:]
        return out.addmm_(xa, B_T, alpha=2.0)

    return {
        "base": lambda: torch.addmm(b, x, W0),
        "addmm": addmm_path,
        "rows [W0; A]": lambda: concatenated(torch.nn.functional.linear(x, rows_buffer, bias_buffer), B.T),
        "cols [W0, A^T]": lambda: concatenated(torch.addmm(bias_buffer, x, cols_buffer), B.T),
        "cols, B^T rows": lambda: concatenated(torch.addmm(bias_buffer, x, cols_buffer), B_rows),
        "rows matmul only": lambda: torch.nn.functional.linear(x, rows_buffer, bias_buffer),
        "cols matmul only": lambda: torch.addmm(bias_buffer, x, cols_buffer),
    }


def profile_layouts(shapes: list[tuple[int, int]], r: int, device: str, rows_per_call: tuple = (1, 128),
                    repeats: int = 20, min_rounds: int = 10, max_rounds: int = 40, max_seconds: float = 20.0) -> list:
    """Per layer shape and token count: each form's median per-round ratio to ``base`` with its interval.

    One call of a form is ``repeats`` back-to-back calls at one token (a single one-token matmul
    takes tens of microseconds: too short to time alone), ``repeats // 8`` at more.
    """
    from .timing import interleaved, summarize

    table = []
    for fan_in, fan_out in shapes:
        for rows in rows_per_call:
            forms = layout_forms(fan_in, fan_out, r, rows, device)
            expected = forms["addmm"]()
            for name in ("rows [W0; A]", "cols [W0, A^T]", "cols, B^T rows"):
                assert torch.allclose(forms[name](), expected, rtol=1e-4, atol=1e-5), name
            calls = repeats if rows == 1 else max(1, repeats // 8)  # a 128-token matmul is long enough
            functions = {name: (lambda f: lambda: [f() for _ in range(calls)])(f) for name, f in forms.items()}
            timed = interleaved(functions, device, "base", min_rounds, max_rounds, max_seconds)
            summary = summarize(timed, "base")
            first = timed["clocks"][0]
            table.append({"in": fan_in, "out": fan_out, "rows": rows, "rounds": timed["rounds"],
                          "us_per_call": {n: c[first]["median_s"] / calls * 1e6 for n, c in summary.items()},
                          "ratio": {n: [c[first]["ratio"], c[first]["low"], c[first]["high"]]
                                    for n, c in summary.items()}})
    return table


# ------------------------------------------------------------------------------------------------
# What one layer call costs beyond its matmuls (Python and the dispatcher)
# ------------------------------------------------------------------------------------------------
CALL_VARIANTS = ("peft", "reference", "merged", "fused", "fused-addmm")


def layer_call_models(fan_in: int = 8, fan_out: int = 16, r: int = 4, seed: int = 0) -> dict:
    """One Conv1D wrapped each way, so small (8 -> 16) that a call's time is its per-op overhead.

    ``conv1d`` is the bare layer (what GPT-2 calls); the others hold the same non-zero adapter.
    """
    import copy

    from torch import nn
    from transformers.pytorch_utils import Conv1D

    import minilora
    from parity.twins import randomize_adapters

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(fan_out, fan_in)

        def forward(self, x):
            return self.c_attn(x)

    torch.manual_seed(seed)
    bare = One().eval()
    config = minilora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn"], fan_in_fan_out=True)
    source = minilora.inject(copy.deepcopy(bare), config)
    randomize_adapters(source, seed=seed)
    models = {"conv1d": bare}
    for name in CALL_VARIANTS:
        weights = {k: v for k, v in source.state_dict().items() if "lora_" in k}
        models[name] = build_variant(name, bare, config, weights).eval()
    return models


def layer_call_overhead(device: str, calls: int = 500, min_rounds: int = 10, max_rounds: int = 40,
                        max_seconds: float = 15.0) -> dict:
    """Microseconds per call of one tiny layer (one token), each way, and the extra over ``conv1d``.

    Every way is first checked against the reference path (float32, 1e-5 relative). One timed call
    is ``calls`` back-to-back layer calls; the extra is (median ratio - 1) x conv1d's time, with the
    ratio's 95% interval. A GPT-2 small decode step makes 48 such calls (r on c_attn, c_proj, c_fc).
    """
    from .timing import interleaved, summarize
    from .variants import TOLERANCE, relative_difference

    models = {name: model.to(device) for name, model in layer_call_models().items()}
    x = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        expected = models["reference"](x)
        for name in CALL_VARIANTS:
            difference = relative_difference(models[name](x), expected)
            if not difference <= TOLERANCE:  # (NaN too)
                raise AssertionError(f"layer call {name}: differs from the reference by {difference:.3g}")

    def repeated(model):
        def run():
            with torch.no_grad():
                for _ in range(calls):
                    model(x)
        return run
    timed = interleaved({name: repeated(m) for name, m in models.items()}, device, "conv1d", min_rounds,
                        max_rounds, max_seconds, resolution=0.0)
    first = timed["clocks"][0]
    summary = summarize(timed, "conv1d")
    base_us = summary["conv1d"][first]["median_s"] / calls * 1e6
    return {"rounds": timed["rounds"], "calls": calls, "conv1d_us": base_us,
            "variants": {name: {"us": c[first]["median_s"] / calls * 1e6,
                                "extra_us": [(c[first][k] - 1) * base_us for k in ("ratio", "low", "high")]}
                         for name, c in summary.items() if name != "conv1d"}}
