"""Random sequences of PEFT's calls on a model with several adapters, run with ``peft`` and ``minilora.compat``.

parity/differential.py draws whole scenarios (a config, then a fixed order of steps); this draws the
order: up to 12 calls, each picked from those below with its adapter names, on a tiny model with a
first adapter and two more that ``add`` brings in. After every call that both libraries ran it compares
what parity.differential compares (the LoRA layers, requires_grad, state-dict keys, train/eval modes,
the wrapper's active adapter, every adapter's config, the trainable counts), the active adapters and
the outputs in eval mode (bitwise; 1e-5 relative once anything was merged: merged sums round
differently). What a call returns (outputs, statuses) is compared too.

    add                 add_adapter of "b" or "c" (new adapters are given equal random A and B)
    merge, safe_merge   merge_adapter(), merge_adapter(safe_merge=True)
    merge_names         merge_adapter(adapter_names=[...])
    unmerge             unmerge_adapter()
    set, set_inference  set_adapter(name), set_adapter(name, inference_mode=True)
    base_set_list       base_model.set_adapter([...]) (several active)
    delete              delete_adapter(name)
    disable, enable     base_model.disable_adapter_layers() / enable_adapter_layers()
    disable_ctx         the outputs inside ``with disable_adapter()``
    mixed               a mixed batch: forward(..., adapter_names=[one per row, "__base__" among them])
    bfloat16            model.to(torch.bfloat16): the calls after it run in bfloat16
    weighted            add_weighted_adapter(names, weights, "mix", cat / linear / svd)
    train, train_dropout  an SGD step on what requires grad (same seed); outputs in train mode
    save_load           save_pretrained(selected_adapters=[name]), load_adapter under a new name
                        (is_trainable alternating)
    load_same           the same, loaded into the adapter of that name (Trainer's resume)
    set_requires_grad   set_requires_grad(names, True / False)
    status              get_layer_status() and get_model_status()
    merge_and_unload_names, unload_copy   on a deep copy: merge_and_unload(adapter_names=[...]), unload()
    forward             the outputs

A call both refuse ends the sequence (PEFT may have changed part of the model), and so does a merge into a
tied weight (GPT-2's lm_head: the documented difference, README); minilora refusing what
PEFT runs (a MiniLoraError) is a *refusal*, counted and printed: check it against the documented scope
(loading into merged layers is one). Anything else is a finding.

    python -m parity.differential_sequences --sequences 100 --seed 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import tempfile
import traceback
import warnings
from typing import Any, Optional

import torch
from torch import nn

from minilora.inject import lora_layers
from parity.architectures import ARCHITECTURES
from parity.differential import (Finding, build_base, compare_structure, compare_tensors, forward, lora_summary,
                                 model_inputs)

# (architecture, head): the first adapter's targets, the second's, and modules the third trains in full
MODELS = {
    ("llama", "lm"): (["q_proj", "v_proj"], ["norm"]),
    ("gpt2", "lm"): (["c_attn", "lm_head"], ["ln_f"]),  # lm_head: tied to the input embedding
    ("bert", "seq_cls"): (["query", "value"], ["LayerNorm"]),
    ("opt", "lm"): (["q_proj", "fc1"], ["final_layer_norm"]),
    ("t5", "lm"): (["q", "wo"], ["final_layer_norm"]),
    ("roberta", "token_cls"): (["query", "dense"], ["LayerNorm"]),
}
TASKS = {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS"}
CALLS = ("add", "merge", "merge_names", "unmerge", "set", "base_set_list", "delete", "disable", "enable", "forward",
         "merge_and_unload_names", "set_inference", "safe_merge", "weighted", "train", "save_load", "set_requires_grad",
         "disable_ctx", "status", "load_same", "unload_copy", "train_dropout", "mixed", "bfloat16")


class Refusal(Exception):
    """minilora refused (MiniLoraError) a call PEFT ran."""


@dataclasses.dataclass
class Sequence:
    """One drawn sequence: the model, the three adapters' configs, and the calls with their arguments."""

    arch: str
    head: str
    configs: dict
    calls: list = dataclasses.field(default_factory=list)  # (call, names, extra): extra = added name / combination

    def __str__(self) -> str:
        return f"{self.arch}/{self.head} {self.configs} calls={self.calls}"


def draw_sequence(rng: random.Random, length: int = 12) -> Sequence:
    arch, head = rng.choice(sorted(MODELS))
    targets, saved = MODELS[(arch, head)]
    configs = {"default": dict(target_modules=targets[:1], r=2, lora_alpha=4, task_type=TASKS.get(head),
                               bias=rng.choice(["none", "none", "none", "none", "lora_only", "all"])),
               "b": dict(target_modules=targets, r=4, lora_alpha=3, lora_dropout=rng.choice([0.0, 0.2]),
                         inference_mode=rng.random() < 0.2, lora_bias=rng.random() < 0.2,
                         rank_pattern=rng.choice([{}, {targets[-1]: 2}])),
               "c": dict(target_modules=targets[1:], r=1, use_rslora=True,
                         modules_to_save=rng.choice([None, saved]))}
    if arch == "roberta":  # (the token head's classifier.dense is a "dense": PEFT refuses LoRA inside the head)
        for name in ("default", "b"):
            configs[name]["exclude_modules"] = ["classifier.dense"]
    sequence = Sequence(arch, head, configs)
    names = ["default", "b", "c", "mix"]
    for _ in range(length):
        call = rng.choice(CALLS)
        picked = rng.sample(names, rng.randint(1, 3))
        extra = rng.choice(["b", "c"]) if call == "add" else rng.choice(["cat", "linear", "svd"])
        sequence.calls.append((call, picked, extra))
    return sequence


def run_sequence(sequence: Sequence, seed: int = 0) -> list[str]:
    """Run ``sequence`` with both libraries; returns the calls run (raises Finding, Refusal)."""
    import peft

    from minilora import MiniLoraError, compat

    spec = ARCHITECTURES[sequence.arch]
    base = build_base(spec, sequence.head)
    inputs = model_inputs(spec, sequence.head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = []
        for library in (compat, peft):
            torch.manual_seed(0)
            models.append(library.get_peft_model(copy.deepcopy(base),
                                                 library.LoraConfig(**copy.deepcopy(sequence.configs["default"]))))
        mini, twin = models
        generator = torch.Generator().manual_seed(seed)
        _equal_values(mini, twin, generator)
        merged, done = False, []
        for step, (call, picked, extra) in enumerate(sequence.calls):
            names = [name for name in picked if name in twin.peft_config] or list(twin.peft_config)[:1]
            results, errors = [], []
            for model, library in ((mini, compat), (twin, peft)):
                try:
                    results.append(_call(call, model, library, names, extra, step, sequence, inputs))
                    errors.append(None)
                except Exception as error:  # noqa: BLE001 - every exception is evidence here
                    results.append(None)
                    errors.append(error)
            done.append(call)
            if isinstance(errors[0], MiniLoraError) and errors[1] is None:
                raise Refusal(f"{call}({names}): {errors[0]}")
            if (errors[0] is None) != (errors[1] is None):
                raise Finding(f"{call}({names}): minilora {_said(errors[0])}; PEFT {_said(errors[1])}")
            if errors[0] is not None:
                if not isinstance(errors[0], MiniLoraError) and type(errors[0]) is not type(errors[1]):
                    raise Finding(f"{call}({names}): minilora {_said(errors[0])}, PEFT {_said(errors[1])}")
                break  # both refused: PEFT may have changed part of the model before it raised
            merged = merged or call in ("merge", "merge_names", "safe_merge")
            if merged and any(getattr(layer, "untied_weight", None) is not None for _, layer in lora_layers(mini)):
                break  # a merge into a tied weight: the documented difference (README; PEFT merges into the shared one)
            if call == "add" and results[0] != "exists":
                _equal_values(mini, twin, generator, only=extra)
            _compare_results(call, results, merged)
            compare_structure(call, mini, twin)
            if list(mini.active_adapters) != list(twin.active_adapters):
                raise Finding(f"{call}: active adapters {mini.active_adapters} vs PEFT's {twin.active_adapters}")
            outputs, errors = [], []
            for model in (mini, twin):
                try:
                    with torch.no_grad():
                        outputs.append(forward(model.eval(), inputs))
                    errors.append(None)
                except Exception as error:  # noqa: BLE001
                    outputs.append(None)
                    errors.append(error)
            if (errors[0] is None) != (errors[1] is None):
                raise Finding(f"forward after {call}: minilora {_said(errors[0])}; PEFT {_said(errors[1])}")
            if errors[0] is not None:
                break
            compare_tensors(f"forward after {call}", outputs[0], outputs[1], rtol=1e-5 if merged else 0.0)
    return done


def _said(error: Optional[BaseException]) -> str:
    return "runs" if error is None else f"raises {type(error).__name__}: {str(error)[:300]}"


def _equal_values(mini: nn.Module, twin: nn.Module, generator: torch.Generator, only: Optional[str] = None) -> None:
    """Equal random A and B on both sides (only the adapter ``only`` after an add: the others may be merged)."""
    theirs = dict(twin.named_parameters())
    with torch.no_grad():
        for name, param in mini.named_parameters():
            if ".lora_" in name and name in theirs and (only is None or f".{only}." in name):
                value = torch.randn(param.shape, generator=generator) * 0.1
                param.copy_(value)
                theirs[name].copy_(value)


def _compare_results(call: str, results: list, merged: bool) -> None:
    if isinstance(results[0], str) and results[0] != "exists" and results[0] != results[1]:
        raise Finding(f"{call}: {results[0][:300]} vs PEFT's {results[1][:300]}")
    if isinstance(results[0], list):
        compare_tensors(call, results[0], results[1], rtol=1e-5 if merged else 0.0)


def _call(call: str, model: nn.Module, library: Any, names: list, extra: str, step: int, sequence: Sequence,
          inputs: dict) -> Any:
    """One call on one library's model; what it returns is compared (outputs, statuses)."""
    if call == "add":
        if extra in model.peft_config:
            return "exists"
        torch.manual_seed(step)
        model.add_adapter(extra, library.LoraConfig(**copy.deepcopy(sequence.configs[extra])))
    elif call in ("merge", "safe_merge"):
        model.merge_adapter(safe_merge=call == "safe_merge")
    elif call == "merge_names":
        model.merge_adapter(adapter_names=names)
    elif call == "unmerge":
        model.unmerge_adapter()
    elif call in ("set", "set_inference"):
        model.set_adapter(names[0], inference_mode=call == "set_inference")
    elif call == "base_set_list":
        model.base_model.set_adapter(names)
    elif call == "delete":
        model.delete_adapter(names[0])
    elif call == "disable":
        model.base_model.disable_adapter_layers()
    elif call == "enable":
        model.base_model.enable_adapter_layers()
    elif call == "weighted":
        if "mix" in model.peft_config:
            return "exists"
        torch.manual_seed(step)
        model.add_weighted_adapter(names, [1.0, -0.5, 0.3][:len(names)], "mix", combination_type=extra)
    elif call in ("train", "train_dropout"):
        model.train()
        torch.manual_seed(step)
        if call == "train_dropout":
            with torch.no_grad():
                return forward(model, inputs)
        params = [param for param in model.parameters() if param.requires_grad]
        loss = sum(t.float().pow(2).mean() for _, t in forward(model, inputs) if t.is_floating_point())
        if params and loss.requires_grad:
            loss.backward()
            torch.optim.SGD(params, lr=0.1).step()
        model.zero_grad(set_to_none=True)
    elif call in ("save_load", "load_same"):
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory, selected_adapters=names[:1])
            where = directory if names[0] == "default" else f"{directory}/{names[0]}"
            model.load_adapter(where, names[0] if call == "load_same" else f"L{step}", is_trainable=bool(step % 2))
    elif call == "set_requires_grad":
        model.set_requires_grad(names, requires_grad=bool(step % 2))
    elif call == "status":
        return repr([dataclasses.asdict(row) for row in model.get_layer_status()]) + repr(
            dataclasses.asdict(model.get_model_status()))
    elif call == "disable_ctx":
        with model.disable_adapter(), torch.no_grad():
            return forward(model.eval(), inputs)
    elif call in ("merge_and_unload_names", "unload_copy"):
        if call == "unload_copy" and lora_summary(model)["saved"]:  # (both sides have the same wrappers)
            return "unload with modules_to_save: outputs not compared (README: minilora gives the original back)"
        plain = copy.deepcopy(model)
        plain = plain.merge_and_unload(adapter_names=names) if call == "merge_and_unload_names" else plain.unload()
        with torch.no_grad():
            return forward(plain.eval(), inputs)
    elif call == "mixed":
        rows = next(iter(inputs.values())).shape[0]
        with torch.no_grad():
            return forward(model.eval(), {**inputs, "adapter_names": [([*names, "__base__"] * rows)[row]
                                                                       for row in range(rows)]})
    elif call == "bfloat16":
        model.to(torch.bfloat16)
    elif call == "forward":
        with torch.no_grad():
            return forward(model.eval(), inputs)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.differential_sequences",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    findings = refusals = errors = 0
    for index in range(args.sequences):
        sequence = draw_sequence(random.Random(f"{args.seed}/{index}"))
        try:
            run_sequence(sequence, seed=index)
        except Finding as finding:
            findings += 1
            print(f"FINDING {index}: {finding}\n    {sequence}", flush=True)
        except Refusal as refusal:
            refusals += 1
            print(f"refusal {index}: {str(refusal)[:200]}", flush=True)
        except Exception:  # noqa: BLE001 - a crash in the harness itself
            errors += 1
            print(f"HARNESS ERROR {index}: {sequence}\n{traceback.format_exc()}", flush=True)
    print(f"\n{args.sequences} sequences: {findings} findings, {refusals} refusals, {errors} harness errors")
    return 1 if findings or errors else 0


if __name__ == "__main__":  # (run as parity.differential_sequences, so that Finding is parity.differential's)
    from parity.differential_sequences import main as module_main

    raise SystemExit(module_main())
