"""A differential fuzzer: random PEFT scripts run twice, with ``peft`` and with ``minilora.compat``.

A *scenario* is drawn at random: one of the tiny architectures (parity/architectures.py) under one
of its task heads (``AutoModelForCausalLM``, ``...SequenceClassification``, ``...TokenClassification``,
``...QuestionAnswering``, ``...Seq2SeqLM``, ``...MaskedLM``, the bare ``AutoModel``), a LoraConfig
from PEFT's field space (targets as None / a list / a regex / "all-linear", exclude_modules,
layers_to_transform + layers_pattern, rank_pattern / alpha_pattern, r, lora_alpha, use_rslora,
init_lora_weights, lora_dropout, bias, modules_to_save, task_type, fan_in_fan_out) and which
operations to run. ``run_scenario`` runs it with both libraries from the same seed and compares:

    get_peft_model          both succeed, or minilora refuses with a MiniLoraError
    what was adapted        the LoRA layers (names, r, scaling), the modules_to_save wrappers, the
                            parameter names with requires_grad, the state-dict keys, train/eval modes
    counts                  get_nb_trainable_parameters, the print_trainable_parameters line
    init                    every parameter, bitwise (same seed, same adapter)
    forward / backward      outputs in eval mode, outputs in train mode under the same seed, and the
                            gradients of every trainable parameter (bitwise: the op order is PEFT's)
    add_adapter             a second adapter, then set_adapter to it: the same checks
    merge_adapter           outputs merged and unmerged again (merged: 1e-5 relative, the sums differ)
    disable_adapter         the base outputs
    save_pretrained         the files: adapter_config.json's shared fields, every tensor bitwise;
                            then each library loads the other's files: the loaded class, PEFT's outputs
    merge_and_unload        outputs and state-dict keys of the plain model
    or, last, one of        get_layer_status / get_model_status, disable / enable_adapter_layers,
                            set_requires_grad, a mixed batch (adapter_names), delete_adapter of the active
                            adapter, add_weighted_adapter ("cat"): what each changed, outputs bitwise

and, drawn from a stream of their own so that a seed's scenarios above stay the same (``--narrow``
leaves them out), the wider fields and calls of parity/differential_wide.py: lora_bias, regex keys in
rank_pattern / alpha_pattern, layers_pattern variants, merge_adapter(adapter_names=...), several active
adapters, enable_adapter_layers after a merge, load_adapter of the other library's files with
adapter_name / is_trainable, merge_and_unload(safe_merge=True, adapter_names=...), unload, get_base_model,
model.to(float16 / bfloat16), a half-precision base with autocast_adapter_dtype.

Anything else (a different number, a different set of layers, an exception other than
MiniLoraError, PEFT refusing what minilora runs) is a finding. minilora refusing what PEFT runs is
reported as a *refusal* so that it can be checked against the documented scope.

``run_scenario`` returns a ``Trace``: every step run on both sides, in order, with its outcome
("equal": compared, no difference; "ran": both ran, its effect compared by the steps after it; "both
refused (MiniLoraError / KeyError)": minilora's and PEFT's exception types; "stop: ...": a documented
difference ends the scenario), and how many comparisons of numbers passed. A scenario where both
sides refuse early compares nothing: the tests count those, so that a minilora that refuses
everything cannot pass.

Known differences, left out of the comparison on purpose (each documented or reported):
- merging a target whose weight is tied (lm_head and the input embedding): minilora unties it, PEFT
  merges into the shared weight (README); the scenario stops there;
- merge_and_unload where lm_head no longer shares the input embedding's weight (a modules_to_save
  copy) and ``tie_word_embeddings`` also ties other embeddings (BART, T5, Switch Transformers, ...):
  PEFT sets the flag False, minilora keeps it (README, minilora/tied_config.py); minilora's merged
  outputs are compared with PEFT's unmerged ones instead;
- adapter files: with bias="all" PEFT also writes the biases inside modules_to_save wrappers;
  those keys are not compared (loading each other's files still is);
- a step where both libraries raise ends the comparison of that step (PEFT may leave a half-changed
  model behind; minilora changes nothing before it refuses); a merge or a wide call both refuse ends
  the scenario;
- while merged, minilora's state dict also holds ``<layer>.lora_merged.<adapter>`` (README): not compared;
- a bias="all" file that holds the trained biases of another adapter's layers: PEFT loading it alone
  drops them, minilora loads them (README); the cross-loaded outputs are not compared;
- unload() with modules_to_save: minilora gives the original module back, PEFT keeps the trained copy
  (README); the outputs after it are not compared.

    python -m parity.differential --examples 300 --seed 1     # a loop; prints the findings grouped
    python -m parity.differential --examples 80 --seed 62 --narrow   # the scenarios seeds gave before the wide draws
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import copy
import io
import json
import random
import re
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from minilora.inject import lora_layers
from parity.architectures import ARCHITECTURES, Architecture

# Which heads each kind of architecture is built with (transformers' Auto classes).
HEADS = {
    "causal": ("lm", "base", "seq_cls", "token_cls", "qa"),
    "masked": ("lm", "base", "seq_cls", "token_cls", "qa"),
    "seq2seq": ("lm", "base", "seq_cls", "qa"),
    "vision": ("lm", "base"),
    "speech": ("lm", "base"),
}
AUTO_CLASS = {"base": "AutoModel", "seq_cls": "AutoModelForSequenceClassification",
              "token_cls": "AutoModelForTokenClassification", "qa": "AutoModelForQuestionAnswering"}
HEAD_TASK = {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "qa": "QUESTION_ANS", "base": "FEATURE_EXTRACTION"}
LM_TASK = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "speech": "SEQ_2_SEQ_LM"}
# mixture-of-experts models refuse most configs (documented); gemma4 is slow to build
SKIPPED = ("mixtral", "gemma4")


class Finding(AssertionError):
    """A difference between minilora.compat and PEFT (the scenario's step and what differed)."""


class Refusal(Exception):
    """minilora refused (MiniLoraError) where PEFT ran: acceptable only for documented scope."""


@dataclass
class Trace:
    """What a scenario ran: (step, outcome) in order, and how many comparisons of numbers passed
    (outputs, gradients, parameters, file tensors). Outcomes: "equal", "ran", "both refused (A / B)",
    "stop: why", "skipped: why" (a drawn call that does not apply to this scenario)."""

    steps: list[tuple[str, str]] = field(default_factory=list)
    numbers: int = 0

    def ran(self, step: str) -> None:
        self.steps.append((step, "ran"))

    def refused(self, step: str, mini_error: BaseException, peft_error: BaseException) -> None:
        self.steps.append((step, f"both refused ({type(mini_error).__name__} / {type(peft_error).__name__})"))

    def stop(self, step: str, why: str) -> None:
        self.steps.append((step, f"stop: {why}"))

    def skipped(self, step: str, why: str) -> None:
        self.steps.append((step, f"skipped: {why}"))

    def equal(self, step: str, numbers: bool = False) -> None:
        """``step`` was compared with PEFT's and agrees: its "ran" entry becomes "equal" (or a new entry)."""
        if self.steps and self.steps[-1][0] == step and self.steps[-1][1] in ("ran", "equal"):
            self.steps[-1] = (step, "equal")
        else:
            self.steps.append((step, "equal"))
        self.numbers += numbers


_TRACE: contextvars.ContextVar[Trace] = contextvars.ContextVar("differential_trace")


def trace() -> Trace:
    """The trace of the scenario being run (a throwaway one outside ``run_scenario``)."""
    try:
        return _TRACE.get()
    except LookupError:
        return Trace()


# --------------------------------------------------------------------------------------------
# Drawing a scenario
# --------------------------------------------------------------------------------------------
class Draw:
    """The few kinds of choice a scenario makes, from ``random.Random`` (the CLI loop) or from
    hypothesis' ``data.draw`` (the test), so one drawing function serves both."""

    def __init__(self, rng: Optional[random.Random] = None, data: Any = None) -> None:
        self.rng, self.data = rng, data

    def choice(self, options: list) -> Any:
        options = list(options)
        if self.data is not None:
            from hypothesis import strategies as st

            return self.data.draw(st.sampled_from(options))
        return self.rng.choice(options)

    def boolean(self, p: float = 0.5) -> bool:
        if self.data is not None:
            from hypothesis import strategies as st

            return self.data.draw(st.booleans())
        return self.rng.random() < p

    def subset(self, options: list, most: int = 3) -> list:
        options = list(dict.fromkeys(options))
        if not options:
            return []
        if self.data is not None:
            from hypothesis import strategies as st

            return self.data.draw(st.lists(st.sampled_from(options), min_size=1, max_size=most, unique=True))
        return self.rng.sample(options, self.rng.randint(1, min(most, len(options))))


@dataclass
class Scenario:
    arch: str
    head: str
    config: dict                       # LoraConfig keyword arguments, PEFT's field names
    second: Optional[dict] = None      # add_adapter("other", ...) config, or None
    ops: dict = field(default_factory=dict)   # which optional operations run
    seed: int = 0
    wide: dict = field(default_factory=dict)  # more fields and calls (parity/differential_wide.py)

    def __str__(self) -> str:
        wide = f" wide={self.wide}" if self.wide else ""
        return f"{self.arch}/{self.head} {self.config} second={self.second} ops={self.ops} seed={self.seed}{wide}"


_BASES: dict = {}


def build_base(arch: Architecture, head: str) -> nn.Module:
    """The tiny model under ``head`` (seed 0, eval mode); built once, deep-copied by callers."""
    key = (arch.name, head)
    if key not in _BASES:
        import transformers

        config = arch.config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if head == "lm":
                model = getattr(transformers, arch.class_name)(config)
            else:
                model = getattr(transformers, AUTO_CLASS[head]).from_config(config)
        _BASES[key] = model.eval()
    return _BASES[key]


def model_inputs(arch: Architecture, head: str, seed: int = 0) -> dict:
    """A batch the model accepts under ``head`` (seq2seq classifiers need an eos token per row)."""
    inputs = arch.inputs(seed)
    if arch.kind == "seq2seq" and head in ("seq_cls", "qa"):
        ids = inputs["input_ids"].clone()
        ids[:, -1] = 2  # eos_token_id
        return {"input_ids": ids}
    return inputs


def linear_names(model: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))]


def draw_scenario(draw: Draw, seed: int = 0, wide: Optional[Draw] = None) -> Scenario:
    """A scenario from ``draw``; with ``wide`` also the wider fields and calls of differential_wide.py,
    drawn from ``wide`` alone (so ``draw`` gives the same scenarios with or without it)."""
    arch = draw.choice([name for name in ARCHITECTURES if name not in SKIPPED])
    spec = ARCHITECTURES[arch]
    head = draw.choice(HEADS[spec.kind])
    try:
        model = build_base(spec, head)
    except Exception:  # no such head class for this architecture: use its own class
        head = "lm"
        model = build_base(spec, head)
    config = draw_config(draw, model, spec, head)
    second = draw_config(draw, model, spec, head, second=True) if draw.boolean(0.3) else None
    ops = {name: draw.boolean() for name in ("train_forward", "backward", "train_step", "merge", "disable", "files",
                                              "merge_and_unload")}
    ops["extra"] = draw.choice([None, *EXTRA_OPS])  # one more of PEFT's calls, last (without merge_and_unload)
    scenario = Scenario(arch, head, config, second, ops, seed)
    if wide is not None:
        from parity.differential_wide import draw_wide

        scenario.wide = draw_wide(wide, model, spec, head, config, second)
    return scenario


# PEFT's calls a scenario may end with (``_compare_extra``); the two-adapter ones need a second adapter
EXTRA_OPS = ("get_layer_status", "disable_adapter_layers", "set_requires_grad", "mixed batch", "delete_adapter",
             "add_weighted_adapter")


def draw_config(draw: Draw, model: nn.Module, spec: Architecture, head: str, second: bool = False) -> dict:
    names = linear_names(model)
    suffixes = sorted({name.split(".")[-1] for name in names})
    two_part = sorted({".".join(name.split(".")[-2:]) for name in names if "." in name})
    config: dict = {}
    kind = draw.choice(["default", "all-linear", "list", "list", "regex"])
    if kind == "all-linear":
        config["target_modules"] = draw.choice(["all-linear", "ALL-LINEAR"]) if draw.boolean(0.1) else "all-linear"
    elif kind == "list":
        config["target_modules"] = draw.subset(suffixes + two_part + names[:2], most=3)
    elif kind == "regex":
        picked = draw.subset(suffixes, most=2)
        config["target_modules"] = draw.choice([rf".*\.({'|'.join(picked)})", rf".*({'|'.join(picked)})",
                                                rf".*\.0\..*({'|'.join(picked)})"])
    if draw.boolean(0.2):
        excluded = draw.subset(suffixes, most=1)
        config["exclude_modules"] = excluded if draw.boolean() else rf".*\.{excluded[0]}"
    if kind == "list" and draw.boolean(0.3):
        config["layers_to_transform"] = draw.choice([0, 1, [0], [1], [0, 1]])
        patterns = sorted({part for name in names for part, nxt in zip(name.split("."), name.split(".")[1:])
                           if nxt.isdigit()})
        if draw.boolean(0.6) and patterns:
            config["layers_pattern"] = draw.choice(patterns + [patterns[:1]])
    config["r"] = draw.choice([1, 2, 4, 8])
    config["lora_alpha"] = draw.choice([1, 4, 8, 16, 3.5])
    if draw.boolean(0.2):
        config["rank_pattern"] = {draw.choice(suffixes): draw.choice([2, 3, 6])}
    if draw.boolean(0.2):
        config["alpha_pattern"] = {draw.choice(suffixes): draw.choice([2, 7.5])}
    if draw.boolean(0.2):
        config["use_rslora"] = True
    config["init_lora_weights"] = draw.choice([True, True, False, "gaussian"])
    config["lora_dropout"] = draw.choice([0.0, 0.0, 0.1])
    if not second:
        config["bias"] = draw.choice(["none", "none", "all", "lora_only"])
    if draw.boolean(0.25):
        others = [name for name, module in model.named_children()] + [
            name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)]
        config["modules_to_save"] = draw.subset(["classifier", "score", "qa_outputs", "lm_head"] + suffixes[:3]
                                                + others[:4], most=2)
    task = draw.choice([None, "matching", "matching", "any"])
    if task == "matching":
        config["task_type"] = HEAD_TASK.get(head) or LM_TASK.get(spec.kind)
    elif task == "any":
        config["task_type"] = draw.choice(["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "SEQ_2_SEQ_LM",
                                           "FEATURE_EXTRACTION"])
    if draw.boolean(0.1):
        config["fan_in_fan_out"] = draw.boolean()
    if draw.boolean(0.1):
        config["inference_mode"] = True
    return {name: value for name, value in config.items() if value is not None}


# --------------------------------------------------------------------------------------------
# Running it twice
# --------------------------------------------------------------------------------------------
def tensors_of(output: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model output (logits, hidden states, ...), without caches."""
    if isinstance(output, torch.Tensor):
        return [("", output)]
    if hasattr(output, "items"):
        found = []
        for key, value in output.items():
            found += [(f"{key}{sub}", tensor) for sub, tensor in tensors_of(value)]
        return found
    if isinstance(output, (tuple, list)):
        found = []
        for index, value in enumerate(output):
            found += [(f"[{index}]{sub}", tensor) for sub, tensor in tensors_of(value)]
        return found
    return []


def compare_tensors(step: str, mini: list, peft_: list, rtol: float = 0.0) -> None:
    if [k for k, _ in mini] != [k for k, _ in peft_]:
        raise Finding(f"{step}: output fields {[k for k, _ in mini]} vs PEFT's {[k for k, _ in peft_]}")
    for (key, a), (_, b) in zip(mini, peft_):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise Finding(f"{step}: {key} has shape/dtype {tuple(a.shape)}/{a.dtype} vs PEFT's "
                          f"{tuple(b.shape)}/{b.dtype}")
        if rtol == 0.0:
            if not _same(a, b):
                diff = (a.double() - b.double()).abs().max().item()
                raise Finding(f"{step}: {key} differs from PEFT's (max abs {diff:.3e}; bitwise expected)")
        else:  # (NaN and inf only where the other has the same; the scale is PEFT's largest finite value)
            same = (a == b) | (a.isnan() & b.isnan())
            finite = b.double().abs()[b.isfinite()]
            scale = max(finite.max().item() if finite.numel() else 0.0, 1e-12)
            diff = torch.where(same, 0.0, (a.double() - b.double()).abs()).max().item() if a.numel() else 0.0
            if not diff <= rtol * scale:  # (a NaN diff, NaN against a number, is a difference too)
                raise Finding(f"{step}: {key} differs from PEFT's (max abs {diff:.3e}, relative {diff / scale:.2e} "
                              f"> {rtol})")
    trace().equal(step, numbers=bool(mini))


def run_both(step: str, mini_call: Callable[[], Any], peft_call: Callable[[], Any]) -> tuple[Any, Any, bool]:
    """(minilora's result, PEFT's result, ran): both raising is fine (``ran`` False) when minilora's
    is a MiniLoraError or the same exception type; one raising alone is a finding or a refusal. The
    outcome goes into the scenario's trace ("ran", or "both refused (A / B)")."""
    from minilora import MiniLoraError

    mini_error = peft_error = None
    mini_result = peft_result = None
    try:
        mini_result = mini_call()
    except Exception as error:  # noqa: BLE001 - every exception is evidence here
        mini_error = error
    try:
        peft_result = peft_call()
    except Exception as error:  # noqa: BLE001
        peft_error = error
    if mini_error is None and peft_error is None:
        trace().ran(step)
        return mini_result, peft_result, True
    if mini_error is not None and peft_error is not None:
        if isinstance(mini_error, MiniLoraError) or type(mini_error) is type(peft_error):
            trace().refused(step, mini_error, peft_error)
            return None, None, False
        raise Finding(f"{step}: both raise, minilora a {type(mini_error).__name__} (not a MiniLoraError): "
                      f"{mini_error}; PEFT: {type(peft_error).__name__}: {peft_error}") from mini_error
    if mini_error is not None:
        if isinstance(mini_error, MiniLoraError):
            raise Refusal(f"{step}: {mini_error} [PEFT runs]") from mini_error
        raise Finding(f"{step}: minilora raises {type(mini_error).__name__}: {mini_error} (PEFT runs)") \
            from mini_error
    raise Finding(f"{step}: PEFT raises {type(peft_error).__name__}: {peft_error}; minilora runs") from peft_error


def lora_summary(model: nn.Module) -> dict:
    """{layer name: {adapter: (r, scaling)}} and the modules_to_save wrappers, for either library."""
    layers, saved = {}, {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "scaling") and hasattr(module, "base_layer"):
            layers[name] = {adapter: (module.r[adapter], float(module.scaling[adapter])) for adapter in module.lora_A}
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
            saved[name] = sorted(module.modules_to_save)
    return {"layers": layers, "saved": saved}


def compare_structure(step: str, mini: nn.Module, twin: nn.Module) -> None:
    a, b = lora_summary(mini), lora_summary(twin)
    if a["layers"].keys() != b["layers"].keys():
        raise Finding(f"{step}: LoRA layers differ: minilora only {sorted(a['layers'].keys() - b['layers'].keys())[:5]}"
                      f", PEFT only {sorted(b['layers'].keys() - a['layers'].keys())[:5]}")
    for name in a["layers"]:
        if a["layers"][name] != b["layers"][name]:
            raise Finding(f"{step}: {name}: (r, scaling) {a['layers'][name]} vs PEFT's {b['layers'][name]}")
    if a["saved"] != b["saved"]:
        raise Finding(f"{step}: modules_to_save wrappers {a['saved']} vs PEFT's {b['saved']}")
    mini_params = {name: p.requires_grad for name, p in mini.named_parameters()}
    peft_params = {name: p.requires_grad for name, p in twin.named_parameters()}
    if mini_params.keys() != peft_params.keys():
        raise Finding(f"{step}: parameter names: minilora only {sorted(mini_params.keys() - peft_params.keys())[:5]}, "
                      f"PEFT only {sorted(peft_params.keys() - mini_params.keys())[:5]}")
    grads = [name for name in mini_params if mini_params[name] != peft_params[name]]
    if grads:
        raise Finding(f"{step}: requires_grad differs on {grads[:5]} (minilora {[mini_params[n] for n in grads[:5]]})")
    peft_dtypes = {name: p.dtype for name, p in twin.named_parameters()}
    dtypes = [(name, p.dtype, peft_dtypes[name]) for name, p in mini.named_parameters() if p.dtype != peft_dtypes[name]]
    if dtypes:
        raise Finding(f"{step}: parameter dtypes differ (name, minilora's, PEFT's): {dtypes[:4]}")
    # (while merged, minilora's state dict also holds <layer>.lora_merged.<adapter>: README, documented)
    mini_keys = {key for key in mini.state_dict() if ".lora_merged." not in key}
    peft_keys = set(twin.state_dict())
    if mini_keys != peft_keys:
        raise Finding(f"{step}: state_dict keys: minilora only {sorted(mini_keys - peft_keys)[:5]}, "
                      f"PEFT only {sorted(peft_keys - mini_keys)[:5]}")
    if hasattr(twin, "active_adapter") and hasattr(twin, "base_model"):  # a PeftModel: the name it keeps, its counts
        names = [_active_name(model) for model in (mini, twin)]
        if names[0] != names[1]:
            raise Finding(f"{step}: active_adapter {names[0]!r} vs PEFT's {names[1]!r}")
        if list(mini.peft_config) != list(twin.peft_config):
            raise Finding(f"{step}: adapters {list(mini.peft_config)} vs PEFT's {list(twin.peft_config)}")
        for name in twin.peft_config:  # every adapter's config, as the wrapper keeps it
            _compare_config(f"{step}: peft_config[{name!r}]", mini.peft_config[name], twin.peft_config[name])
        counts = [tuple(model.get_nb_trainable_parameters()) for model in (mini, twin)]
        if counts[0] != counts[1]:
            raise Finding(f"{step}: get_nb_trainable_parameters {counts[0]} vs PEFT's {counts[1]}")
    mini_modes = {name: m.training for name, m in mini.named_modules()}
    peft_modes = {name: m.training for name, m in twin.named_modules()}
    modes = [name for name in mini_modes if name in peft_modes and mini_modes[name] != peft_modes[name]]
    if modes:
        raise Finding(f"{step}: train/eval mode differs on {modes[:5]} (minilora {[mini_modes[n] for n in modes[:3]]})")
    trace().equal(step)


def _active_name(model: nn.Module) -> Any:
    try:
        return model.active_adapter
    except Exception as error:  # noqa: BLE001 - what it raises is compared
        return type(error).__name__


def compare_values(step: str, mini: nn.Module, twin: nn.Module) -> None:
    peft_state = twin.state_dict()
    for key, value in mini.state_dict().items():
        if ".lora_merged." in key:  # (compare_structure)
            continue
        if value.dtype != peft_state[key].dtype:  # (torch.equal does not look at dtypes)
            raise Finding(f"{step}: {key} is {value.dtype}, PEFT's {peft_state[key].dtype}")
        if not torch.equal(value, peft_state[key]):
            raise Finding(f"{step}: {key} differs from PEFT's")
    trace().equal(step, numbers=True)


def same_values(mini: nn.Module, twin: nn.Module, seed: int) -> None:
    """Give every trainable parameter (and every LoRA tensor) equal random values on both sides."""
    generator = torch.Generator().manual_seed(seed)
    peft_params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, param in mini.named_parameters():
            if param.requires_grad or ".lora_" in name or ".modules_to_save." in name:
                value = torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.05
                param.copy_(value)
                peft_params[name].copy_(value)


def forward(model: nn.Module, inputs: dict) -> list:
    return tensors_of(model(**inputs))


def compare_forward(step: str, mini: nn.Module, twin: nn.Module, inputs: dict, train: bool = False,
                    rtol: float = 0.0) -> None:
    for model in (mini, twin):
        model.train(train)
    with torch.no_grad():
        torch.manual_seed(7)
        mini_call = lambda: forward(mini, inputs)  # noqa: E731
        a, b, ran = run_both(step, mini_call, lambda: (torch.manual_seed(7), forward(twin, inputs))[1])
    if ran:
        compare_tensors(step, a, b, rtol)


def compare_backward(step: str, mini: nn.Module, twin: nn.Module, inputs: dict) -> None:
    def grads_of(model: nn.Module) -> dict:
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        out = tensors_of(model(**inputs))
        loss = sum(t.float().pow(2).mean() for _, t in out if t.is_floating_point())
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    mini_grads, peft_grads, ran = run_both(step, lambda: grads_of(mini), lambda: grads_of(twin))
    for model in (mini, twin):
        model.zero_grad(set_to_none=True)
        model.eval()
    if not ran:
        return
    if mini_grads.keys() != peft_grads.keys():
        raise Finding(f"{step}: gradients for {sorted(mini_grads.keys() ^ peft_grads.keys())[:5]} on one side only")
    for name, grad in mini_grads.items():
        if not _same(grad, peft_grads[name]):
            diff = (grad.double() - peft_grads[name].double()).abs().max().item()
            raise Finding(f"{step}: grad of {name} differs (max abs {diff:.3e})")
    trace().equal(step, numbers=bool(mini_grads))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN where the other has NaN (half-precision passes overflow alike): a NaN against a
    number, or inf against the largest finite number, is a difference (nan_to_num's defaults would hide both)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        torch.where(a.isnan(), 0, a), torch.where(b.isnan(), 0, b))


def compare_train_step(step: str, mini: nn.Module, twin: nn.Module, inputs: dict) -> None:
    """One AdamW step on what requires grad, same seed (dropout): every parameter afterwards, bitwise."""
    def train(model: nn.Module) -> None:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)
        torch.manual_seed(13)
        loss = sum(t.float().pow(2).mean() for _, t in tensors_of(model(**inputs)) if t.is_floating_point())
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
            optimizer.step()
        model.zero_grad(set_to_none=True)
        model.eval()

    _, _, ran = run_both(step, lambda: train(mini), lambda: train(twin))
    if ran:
        compare_values(step, mini, twin)


def compare_files(step: str, mini_dir: Path, peft_dir: Path) -> None:
    from safetensors.torch import load_file

    mini_files = sorted(p.relative_to(mini_dir).as_posix() for p in mini_dir.rglob("*") if p.is_file())
    peft_files = sorted(p.relative_to(peft_dir).as_posix() for p in peft_dir.rglob("*") if p.is_file())
    if mini_files != peft_files:
        raise Finding(f"{step}: files {mini_files} vs PEFT's {peft_files}")
    for name in mini_files:
        if name.endswith(".safetensors"):
            a, b = load_file(mini_dir / name), load_file(peft_dir / name)
            a = {key: value for key, value in a.items() if not _only_peft_writes(key)}
            b = {key: value for key, value in b.items() if not _only_peft_writes(key)}
            if a.keys() != b.keys():
                raise Finding(f"{step}: {name} keys: minilora only {sorted(a.keys() - b.keys())[:5]}, PEFT only "
                              f"{sorted(b.keys() - a.keys())[:5]}")
            for key in a:
                if not torch.equal(a[key], b[key]):
                    raise Finding(f"{step}: {name} {key} differs")
        if name.endswith("adapter_config.json"):
            a, b = json.loads((mini_dir / name).read_text()), json.loads((peft_dir / name).read_text())
            for key in sorted(a.keys() & b.keys()):
                va, vb = a[key], b[key]
                if isinstance(va, list) and isinstance(vb, list):
                    va, vb = sorted(map(str, va)), sorted(map(str, vb))
                if va != vb and key not in ("peft_version", "auto_mapping"):
                    raise Finding(f"{step}: {name} field {key}: {a[key]!r} vs PEFT's {b[key]!r}")
            extra = {key: b[key] for key in b.keys() - a.keys() if not _unused(b[key])}
            default_like = {"use_rslora": False, "use_dora": False, "lora_bias": False}
            extra = {k: v for k, v in extra.items() if default_like.get(k, object()) != v and k not in (
                "peft_version", "megatron_core", "qalora_group_size")}
            if extra:
                raise Finding(f"{step}: {name}: PEFT writes fields minilora leaves out: {extra}")
    trace().equal(step, numbers=any(name.endswith(".safetensors") for name in mini_files))


def _only_peft_writes(key: str) -> bool:
    """Keys only PEFT writes (reported differences; loading is checked separately): with bias="all",
    the biases inside every modules_to_save wrapper (its original's, its copies'). (The embedding
    layers' weights of save_embedding_layers="auto" are written by both, and compared.)"""
    return bool(re.search(r"\.(original_module|modules_to_save)\..*bias$", key))


def _unused(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def run_scenario(scenario: Scenario) -> Trace:
    """Run ``scenario`` with PEFT and with minilora.compat; returns what ran (``Trace``). Raises Finding
    on a difference, Refusal when minilora refuses what PEFT runs."""
    recorded = Trace()
    token = _TRACE.set(recorded)
    try:
        _run_scenario(scenario, recorded)
    finally:
        _TRACE.reset(token)
    return recorded


def _run_scenario(scenario: Scenario, record: Trace) -> None:
    import peft

    from minilora import compat

    from parity import differential_wide

    spec = ARCHITECTURES[scenario.arch]
    base = build_base(spec, scenario.head)
    inputs = model_inputs(spec, scenario.head, scenario.seed)
    wide = scenario.wide
    config = {**scenario.config, **wide.get("config", {})}
    second = scenario.second if scenario.second is not None else wide.get("second")
    with quiet():
        mini_base, peft_base = copy.deepcopy(base), copy.deepcopy(base)

        def make(module, kwargs):
            return module.LoraConfig(**copy.deepcopy(kwargs))

        mini_config, peft_config, ran = run_both("LoraConfig", lambda: make(compat, config),
                                                 lambda: make(peft, config))
        if not ran:
            return
        first = wide.get("adapter_name", "default")  # (get_peft_model's adapter_name: a wide draw)
        torch.manual_seed(scenario.seed)
        mini_call = lambda: compat.get_peft_model(mini_base, mini_config, adapter_name=first)  # noqa: E731

        def peft_call():
            torch.manual_seed(scenario.seed)
            return peft.get_peft_model(peft_base, peft_config, adapter_name=first)

        mini, twin, ran = run_both("get_peft_model", mini_call, peft_call)
        if not ran:
            return
        if type(mini).__name__ != type(twin).__name__:
            raise Finding(f"get_peft_model: {type(mini).__name__} vs PEFT's {type(twin).__name__}")
        compare_structure("get_peft_model", mini, twin)
        compare_values("init", mini, twin)
        if tuple(mini.get_nb_trainable_parameters()) != tuple(twin.get_nb_trainable_parameters()):
            raise Finding(f"counts: {mini.get_nb_trainable_parameters()} vs PEFT's "
                          f"{twin.get_nb_trainable_parameters()}")
        _compare_printed(mini, twin)
        _compare_config("peft_config", mini.peft_config[first], twin.peft_config[first])
        record.equal("counts and config")
        same_values(mini, twin, scenario.seed)
        compare_forward("forward eval", mini, twin, inputs)
        if scenario.ops.get("train_forward"):
            compare_forward("forward train", mini, twin, inputs, train=True)
        if scenario.ops.get("backward"):
            compare_backward("backward", mini, twin, inputs)
        if scenario.ops.get("train_step"):
            compare_train_step("AdamW step", mini, twin, inputs)
        if wide.get("dtype_start"):
            differential_wide.run_dtype_start(wide, config, second, base, inputs, scenario.seed)
        if second is not None:
            second_mini, second_peft, ran = run_both("LoraConfig (second)", lambda: make(compat, second),
                                                     lambda: make(peft, second))
            if ran:
                torch.manual_seed(scenario.seed + 1)
                mini_call = lambda: mini.add_adapter("other", second_mini)  # noqa: E731

                def peft_call():
                    torch.manual_seed(scenario.seed + 1)
                    return twin.add_adapter("other", second_peft)

                _, _, ran = run_both("add_adapter", mini_call, peft_call)
                if not ran:  # both refused; PEFT may have put the adapter into some layers before it raised
                    return
                if ran:
                    compare_structure("add_adapter", mini, twin)
                    compare_values("add_adapter init", mini, twin)
                    _, _, ran = run_both("set_adapter", lambda: mini.set_adapter("other"),
                                         lambda: twin.set_adapter("other"))
                    if ran:
                        compare_structure("set_adapter", mini, twin)
                        same_values(mini, twin, scenario.seed + 1)
                        compare_forward("forward (other)", mini, twin, inputs)
                        if scenario.ops.get("backward"):
                            compare_backward("backward (other)", mini, twin, inputs)
        if wide:
            differential_wide.run_middle(wide, mini, twin, inputs)
            if record.steps and record.steps[-1][1].startswith("stop:"):
                return
        if scenario.ops.get("merge"):
            _, _, ran = run_both("merge_adapter", mini.merge_adapter, twin.merge_adapter)
            if not ran:  # PEFT may have merged some layers before it raised (a lora_bias into a layer without bias)
                return record.stop("merge_adapter", "both refused")
            if any(getattr(layer, "tied_to", None) for _, layer in lora_layers(mini)):
                # documented difference (README): minilora unties a tied target to merge it; PEFT merges into the
                # shared weight (the input embedding too), so its merged outputs are not its unmerged ones
                return record.stop("merge_adapter", "a tied weight (documented difference)")
            if ran:
                compare_forward("forward merged", mini, twin, inputs, rtol=1e-5)
                run_both("unmerge_adapter", mini.unmerge_adapter, twin.unmerge_adapter)
                compare_forward("forward unmerged", mini, twin, inputs, rtol=1e-5)
        if scenario.ops.get("disable"):
            def disabled(model):
                with model.disable_adapter():
                    return forward(model.eval(), inputs)

            a, b, ran = run_both("disable_adapter", lambda: disabled(mini), lambda: disabled(twin))
            if ran:
                compare_tensors("disable_adapter", a, b, 1e-5)
                compare_structure("after disable_adapter", mini, twin)
        if scenario.ops.get("files"):
            _compare_save_load(scenario, mini, twin, base, inputs)
        if scenario.ops.get("extra") and scenario.ops.get("merge_and_unload"):
            record.skipped(scenario.ops["extra"], "merge_and_unload was drawn too; it ends the scenario instead")
        elif scenario.ops.get("extra"):
            _compare_extra(scenario.ops["extra"], mini, twin, inputs)
            if wide.get("ending") and record.steps[-1][1].startswith(("both refused", "stop:")):
                # (PEFT may have changed part of the model before it raised: its mixed-batch hooks stay)
                record.skipped(wide["ending"][0], "the last call was refused by both")
            elif wide.get("ending"):
                differential_wide.run_ending(wide, mini, twin, inputs)
            return
        if scenario.ops.get("merge_and_unload"):
            compare_merge_and_unload(mini, twin, inputs)
        elif wide.get("ending"):
            differential_wide.run_ending(wide, mini, twin, inputs)


def compare_merge_and_unload(mini: nn.Module, twin: nn.Module, inputs: dict, kwargs: Optional[dict] = None) -> None:
    """merge_and_unload(**kwargs) on both: the class and keys of the plain model, its outputs."""
    record = trace()
    step = "merge_and_unload" + (f"({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")
    kwargs = kwargs or {}
    compare_forward("before merge_and_unload", mini, twin, inputs, rtol=1e-5)
    if any(getattr(layer, "tied_to", None) for _, layer in lora_layers(mini)):
        return record.stop(step, "a tied weight (documented difference)")
    try:
        with torch.no_grad():
            unmerged = forward(twin.eval(), inputs)  # PEFT's adapted outputs: what a merged model must give
    except Exception:  # noqa: BLE001 - both could not run it: "before merge_and_unload" recorded that
        unmerged = None
    a, b, ran = run_both(step, lambda: mini.merge_and_unload(**kwargs),
                         lambda: twin.merge_and_unload(**kwargs))
    if ran:
        if type(a).__name__ != type(b).__name__:
            raise Finding(f"merge_and_unload returns {type(a).__name__} vs PEFT's {type(b).__name__}")
        if set(a.state_dict()) != set(b.state_dict()):
            raise Finding(f"merge_and_unload state_dict keys: minilora only "
                          f"{sorted(set(a.state_dict()) - set(b.state_dict()))[:5]}, PEFT only "
                          f"{sorted(set(b.state_dict()) - set(a.state_dict()))[:5]}")
        record.equal(step)
        flags = [getattr(getattr(model, "config", None), "tie_word_embeddings", None) for model in (a, b)]
        if flags == [True, False]:
            # documented difference (README, minilora/tied_config.py): where the flag also ties the
            # encoder/decoder embeddings (and in Switch Transformers scales the decoder output) PEFT sets
            # it False and its merged model is not its unmerged one; minilora keeps it: PEFT's unmerged
            # outputs are the reference
            record.stop("config.tie_word_embeddings", "kept True, PEFT sets False (documented difference)")
            if unmerged is not None and not kwargs.get("adapter_names"):  # (else not what was merged)
                with torch.no_grad():
                    compare_tensors("forward after merge_and_unload vs PEFT unmerged",
                                    forward(a.eval(), inputs), unmerged, rtol=1e-5)
            return
        if flags[0] != flags[1]:
            raise Finding(f"merge_and_unload: config.tie_word_embeddings {flags[0]} vs PEFT's {flags[1]}")
        compare_forward("forward after merge_and_unload", a, b, inputs, rtol=1e-5)


def _compare_extra(kind: str, mini: nn.Module, twin: nn.Module, inputs: dict) -> None:
    """One more of PEFT's calls on the adapted models, then what it changed (structure, outputs)."""
    names = list(mini.peft_config)
    if kind == "get_layer_status":
        for step, call in (("get_layer_status", lambda m: [vars(row) for row in m.get_layer_status()]),
                           ("get_model_status", lambda m: vars(m.get_model_status()))):
            a, b, ran = run_both(step, lambda: call(mini), lambda: call(twin))
            if ran and a != b:
                raise Finding(f"{step}: {a} vs PEFT's {b}")
            if ran:
                trace().equal(step)
    elif kind == "disable_adapter_layers":
        for step, on in (("disable_adapter_layers", False), ("enable_adapter_layers", True)):
            method = "enable_adapter_layers" if on else "disable_adapter_layers"
            _, _, ran = run_both(step, getattr(mini.base_model, method), getattr(twin.base_model, method))
            if not ran:
                return
            compare_structure(f"after {step}", mini, twin)
            compare_forward(f"forward after {step}", mini, twin, inputs)
    elif kind == "set_requires_grad":
        _, _, ran = run_both("set_requires_grad", lambda: mini.set_requires_grad(names[-1], False),
                             lambda: twin.set_requires_grad(names[-1], False))
        if ran:
            compare_structure("after set_requires_grad", mini, twin)
    elif kind == "mixed batch":
        rows = next(iter(inputs.values())).shape[0]
        mixed = {**inputs, "adapter_names": [([*names, "__base__"] * rows)[row] for row in range(rows)]}
        a, b, ran = run_both("mixed batch", lambda: forward(mini.eval(), mixed), lambda: forward(twin.eval(), mixed))
        if ran:
            compare_tensors("mixed batch", a, b)
    elif kind == "delete_adapter" and len(names) > 1:
        victim = mini.active_adapters[0] if mini.active_adapters else names[0]
        _, _, ran = run_both("delete_adapter", lambda: mini.delete_adapter(victim), lambda: twin.delete_adapter(victim))
        if ran:
            compare_structure("after delete_adapter", mini, twin)
            if mini.active_adapters != twin.active_adapters:
                raise Finding(f"delete_adapter: active adapters {mini.active_adapters} vs PEFT's {twin.active_adapters}")
            compare_forward("forward after delete_adapter", mini, twin, inputs)
    elif kind in ("delete_adapter", "add_weighted_adapter") and len(names) < 2:
        trace().skipped(kind, "the scenario has one adapter")
    elif kind == "add_weighted_adapter":
        def weighted(model):
            torch.manual_seed(17)  # (the new adapter is drawn before cat overwrites A and B: a lora_bias stays drawn)
            model.add_weighted_adapter(names, [1.0, -0.5][:len(names)], "mix", combination_type="cat")
            model.set_adapter("mix")

        _, _, ran = run_both("add_weighted_adapter", lambda: weighted(mini), lambda: weighted(twin))
        if ran:
            compare_structure("after add_weighted_adapter", mini, twin)
            compare_values("add_weighted_adapter values", mini, twin)
            compare_forward("forward (mix)", mini, twin, inputs)


def _compare_printed(mini: nn.Module, twin: nn.Module) -> None:
    lines = []
    for model in (mini, twin):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            model.print_trainable_parameters()
        lines.append(buffer.getvalue())
    if lines[0] != lines[1]:
        raise Finding(f"print_trainable_parameters: {lines[0]!r} vs PEFT's {lines[1]!r}")


def _compare_config(step: str, mini: Any, twin: Any) -> None:
    for name in ("target_modules", "exclude_modules", "modules_to_save", "r", "lora_alpha", "task_type",
                 "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out",
                 "inference_mode", "init_lora_weights", "use_rslora"):
        a, b = getattr(mini, name), getattr(twin, name)
        a, b = getattr(a, "value", a), getattr(b, "value", b)
        if isinstance(a, (set, list)) and isinstance(b, (set, list)):
            if type(a) is not type(b) and name != "modules_to_save":
                raise Finding(f"{step}.{name} is a {type(a).__name__} ({a!r}) vs PEFT's {type(b).__name__} ({b!r})")
            a, b = sorted(a), sorted(b)
        if a != b:
            raise Finding(f"{step}.{name}: {a!r} vs PEFT's {b!r}")


def _compare_save_load(scenario: Scenario, mini: nn.Module, twin: nn.Module, base: nn.Module, inputs: dict) -> None:
    import peft

    from minilora import compat

    with tempfile.TemporaryDirectory() as tmp:
        mini_dir, peft_dir = Path(tmp) / "mini", Path(tmp) / "peft"
        _, _, ran = run_both("save_pretrained", lambda: mini.save_pretrained(mini_dir),
                             lambda: twin.save_pretrained(peft_dir))
        if not ran:
            return
        for directory in (mini_dir, peft_dir):
            card = directory / "README.md"
            if card.exists():
                card.unlink()
        compare_files("save_pretrained", mini_dir, peft_dir)
        # each library loads the other's files into a fresh base; the reference is PEFT loading its own
        # (not the live models: a merge and unmerge before may have moved W0 by a rounding)
        active = mini.active_adapters[0] if mini.active_adapters else "default"  # (the first of several active)
        subdir = "" if active == "default" else active
        # (the wide draws: from_pretrained(adapter_name=, is_trainable=), load_adapter of the other's files)
        load = scenario.wide.get("load", {})
        options = dict(adapter_name=load["from_name"], is_trainable=load["is_trainable"]) if load else {}
        try:  # (with the same options: is_trainable=True alone moves some outputs by a rounding, in PEFT too)
            reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), peft_dir / subdir, **options).eval()
            with torch.no_grad():
                expected = forward(reference, inputs)
        except Exception as error:  # noqa: BLE001 - PEFT cannot load or run its own files: nothing to compare with
            trace().stop("PEFT loads its own files", f"PEFT cannot ({type(error).__name__})")
            return
        step = "from_pretrained" + (f"(adapter_name={load['from_name']!r}, is_trainable={load['is_trainable']})"
                                    if load else "")
        loaded_mini, loaded_peft, ran = run_both(
            step, lambda: compat.PeftModel.from_pretrained(copy.deepcopy(base), peft_dir / subdir, **options),
            lambda: peft.PeftModel.from_pretrained(copy.deepcopy(base), mini_dir / subdir, **options))
        if not ran:
            return
        if type(loaded_mini).__name__ != type(loaded_peft).__name__:  # the task's subclass, by the file's task_type
            raise Finding(f"from_pretrained: {type(loaded_mini).__name__} vs PEFT's {type(loaded_peft).__name__}")
        compare_structure(step, loaded_mini, loaded_peft)
        # and each loads its own files (wide: the other's) as a further adapter of the live model, which then runs it
        name, trainable = (load["name"], load["is_trainable"]) if load else ("loaded", False)
        name = active if name == "same" else name
        mini_files, peft_files = (peft_dir, mini_dir) if load.get("cross") else (mini_dir, peft_dir)
        whose = "the other library's" if load.get("cross") else "its own"
        step = f"load_adapter({whose} files, adapter_name={name!r}, is_trainable={trainable})" if load else "load_adapter"
        _, _, ran = run_both(step, lambda: mini.load_adapter(mini_files / subdir, name, is_trainable=trainable),
                             lambda: twin.load_adapter(peft_files / subdir, name, is_trainable=trainable))
        if ran:
            compare_structure(step, mini, twin)
            _, _, ran = run_both(f"set_adapter({name})", lambda: mini.set_adapter(name),
                                 lambda: twin.set_adapter(name))
            if ran:
                compare_structure(f"set_adapter({name})", mini, twin)
                compare_forward(f"forward ({name})", mini, twin, inputs)
        if _other_adapters_biases(peft_dir / subdir):
            # documented difference (README, tests/test_differential.py): a bias="all" file holds the trained biases
            # of another adapter's LoRA layers (<layer>.base_layer.bias); PEFT loading it alone drops them
            return trace().stop("cross-loaded outputs", "biases of another adapter's layers (documented difference)")
        with torch.no_grad():
            for label, model in (("minilora loads PEFT's files", loaded_mini), ("peft loads minilora's files",
                                                                                 loaded_peft)):
                model.eval()
                try:
                    compare_tensors(label, forward(model, inputs), expected)
                except Finding as finding:  # say whether the loaded weights differ, or only the forward's rounding
                    raise Finding(f"{finding}; {_weights_against(model, reference)}") from None
        if load.get("is_trainable"):  # (wide) the loaded trainable adapters train alike: an AdamW step, then the outputs
            compare_train_step("AdamW step (loaded, is_trainable=True)", loaded_mini, loaded_peft, inputs)
            compare_forward("forward after the AdamW step (loaded)", loaded_mini, loaded_peft, inputs)


def _other_adapters_biases(directory: Path) -> bool:
    """Whether the adapter file in ``directory`` holds a trained bias of another adapter's module (README, "A
    bias="lora_only" or "all" adapter saved beside another"): a base_layer.bias of a layer it has no LoRA weights
    for, or an original_module.bias of a module it saves no copy of."""
    from safetensors import safe_open

    path = directory / "adapter_model.safetensors"
    if not path.exists():
        return False
    with safe_open(path, "pt") as file:
        keys = list(file.keys())
    layers = {key.split(".lora_A.")[0] for key in keys if ".lora_A." in key}
    if any(key.endswith(".base_layer.bias") and key.removesuffix(".base_layer.bias") not in layers for key in keys):
        return True
    # <module>.original_module.[...].bias of another adapter's modules_to_save wrapper (this adapter saves no copy of it)
    def copied(prefix: str) -> bool:
        return any(other.startswith(f"{prefix}.") and ".original_module." not in other and ".modules_to_save." not in
                   other for other in keys)

    return any(".original_module." in key and key.endswith("bias") and not copied(key.split(".original_module.")[0])
               for key in keys)


def _weights_against(model: nn.Module, reference: nn.Module) -> str:
    """Which tensors of ``model`` differ from ``reference``'s (by name), for a finding's message."""
    ours, theirs = model.state_dict(), reference.state_dict()
    differ = [key for key in ours if key in theirs and not torch.equal(ours[key], theirs[key])]
    one_side = sorted(set(ours) ^ set(theirs))
    if differ or one_side:
        return f"loaded weights differing from PEFT's: {differ[:5]}, keys on one side only: {one_side[:5]}"
    return "the same loaded weights as PEFT's"


# --------------------------------------------------------------------------------------------
# The CLI loop
# --------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.differential", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", default=None, help="only this architecture")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--narrow", action="store_true",
                        help="without the wide draws (parity/differential_wide.py): the scenarios seeds gave before them")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    findings: dict[str, list[str]] = {}
    refusals: dict[str, list[str]] = {}
    errors = 0
    for index in range(args.examples):
        wide = None if args.narrow else Draw(random.Random(f"{args.seed}/{index}"))
        scenario = draw_scenario(Draw(rng), seed=index, wide=wide)
        if args.arch and scenario.arch != args.arch:
            continue
        try:
            done = run_scenario(scenario)
            if args.verbose:
                print(f"ok {index}: {scenario} -> {done.steps} ({done.numbers} comparisons of numbers)",
                      flush=True)
        except Finding as finding:
            key = re.sub(r"[\d.e+-]{3,}", "#", str(finding))[:160]
            findings.setdefault(key, []).append(f"{index}: {scenario}")
            print(f"FINDING {index}: {finding}\n    {scenario}", flush=True)
        except Refusal as refusal:
            key = str(refusal)[:120]
            refusals.setdefault(key, []).append(f"{index}: {scenario}")
            if args.verbose:
                print(f"refused {index}: {refusal}", flush=True)
        except Exception:  # noqa: BLE001 - a crash in the harness itself
            errors += 1
            print(f"HARNESS ERROR {index}: {scenario}\n{traceback.format_exc()}", flush=True)
    print(f"\n{args.examples} examples: {len(findings)} kinds of finding, {len(refusals)} kinds of refusal, "
          f"{errors} harness errors")
    for key, where in findings.items():
        print(f"FINDING x{len(where)}: {key}\n    e.g. {where[0]}")
    for key, where in refusals.items():
        print(f"refusal x{len(where)}: {key}\n    e.g. {where[0]}")
    return 1 if findings or errors else 0


if __name__ == "__main__":  # (run as parity.differential, so that differential_wide's Finding is this file's)
    from parity.differential import main as module_main

    raise SystemExit(module_main())
