"""Probes: what the installed PEFT release does, where releases differ. Run inside each matrix env.

Each probe answers one question with a short value, measured on a tiny model (GPT-2 with its Conv1D
layers, unless the question is about another architecture) or on GPT-2 small where it needs GPT-2
small's own numbers. A probe that raises reports the error as its value: on an old release "this
API does not exist yet" is an answer too. This file holds the probes about files, init and PEFT's
pitfalls; ``probes_adapters.py`` and ``probes_targets.py`` hold the others, ``probing.py`` what
they share.

    python -m parity.probes --json probes.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import minilora
from parity import twins
from parity.grid import tiny_gpt2
from parity.probing import FUNCTIONS, IDS, PROBES, logits, peft_model, probe, short, warnings_said


@probe("which GPT-2 layers get LoRA when target_modules is not given (gpt2)")
def default_targets(base) -> str:
    model = peft_model(base, r=8, lora_alpha=16)
    wrapped = sorted({name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")})
    return ",".join(wrapped)


@probe("the line print_trainable_parameters() prints for GPT-2 small, r=8, default targets")
def trainable_line(base, gpt2_small=None) -> str:
    model = peft_model(gpt2_small if gpt2_small is not None else base, r=8, lora_alpha=16)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    return out.getvalue().strip()


@probe("does merge_and_unload work on GPT-2, give the adapted logits, and put Conv1D back")
def merge_and_unload_gpt2(base) -> str:
    mini, model = twins.make_twins(base, minilora.LoraConfig(r=8, lora_alpha=16), random_b=True)
    adapted = logits(model, IDS)
    plain = model.merge_and_unload()
    kind = type(plain.transformer.h[0].attn.c_attn).__name__
    error = twins.max_rel_diff(logits(plain, IDS), adapted)
    verdict = "works" if error < 1e-5 else f"logits off by rel {error:.1e}"
    return f"{verdict}; c_attn is {kind} again" if kind == "Conv1D" else f"{verdict}; c_attn is {kind}"


@probe("the files save_pretrained writes, and the key of the first lora_A weight")
def adapter_files(base) -> str:
    model = peft_model(base, r=8, lora_alpha=16)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        files = sorted(name for name in os.listdir(directory) if name != "README.md")
        weights = [name for name in files if name.startswith("adapter_model")][0]
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file
            keys = sorted(load_file(os.path.join(directory, weights)))
        else:
            keys = sorted(torch.load(os.path.join(directory, weights), weights_only=True))
    first = next(key for key in keys if "lora_A" in key)
    return f"{' + '.join(files)}; {first}"


@probe("from_pretrained on an adapter_config.json with a field this release does not know")
def unknown_config_field(base) -> str:
    import peft

    model = peft_model(base, r=8, lora_alpha=16)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        config_file = Path(directory) / "adapter_config.json"
        fields = json.loads(config_file.read_text())
        fields["field_from_the_future"] = True
        config_file.write_text(json.dumps(fields))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)
            except Exception as error:
                return f"raises {short(error)}"
    said = warnings_said(caught)
    return f"loads, warns {said[0]!r}" if said else "loads, silently ignores it"


@probe("same torch.manual_seed -> the same adapter (twice in PEFT, and equal to minilora.inject)")
def same_seed(base) -> str:
    first = peft_model(base, r=8, lora_alpha=16, init_lora_weights=True)
    second = peft_model(base, r=8, lora_alpha=16, init_lora_weights=True)
    state = lambda m: {k: v for k, v in m.state_dict().items() if "lora_" in k}  # noqa: E731
    again = all(torch.equal(v, state(second)[k]) for k, v in state(first).items())
    mini = copy.deepcopy(base)
    torch.manual_seed(0)
    minilora.inject(mini, minilora.LoraConfig(r=8, lora_alpha=16))
    as_mini = all(torch.equal(v, state(first)[twins.peft_key(k)]) for k, v in twins.adapter_state(mini).items())
    return ("yes" if again else "no") + ("; equal to minilora" if as_mini else "; differs from minilora")


@probe("get_peft_model(model) then PeftModel.from_pretrained(that model, dir): which output?")
def double_wrap(base) -> str:
    import peft

    _, trained = twins.make_twins(base, minilora.LoraConfig(r=8, lora_alpha=16), random_b=True)
    adapted, plain = logits(trained, IDS), logits(base, IDS)
    with tempfile.TemporaryDirectory() as directory:
        trained.save_pretrained(directory)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                wrapped = peft_model(base, r=8, lora_alpha=16)
                loaded = peft.PeftModel.from_pretrained(wrapped, directory)
            except Exception as error:
                return f"raises {short(error)}"
    out = logits(loaded, IDS)
    outcome = ("adapter output" if twins.max_rel_diff(out, adapted) < 1e-5
               else "base output" if twins.max_rel_diff(out, plain) < 1e-5 else "neither")
    said = warnings_said(caught)
    return f"{outcome}, warns {said[0]!r}" if said else f"{outcome}, no warning"


@probe("the dtype of lora_A on a bfloat16 base model (PEFT's adapter autocast)")
def bf16_adapter_dtype(base) -> str:
    model = peft_model(copy.deepcopy(base).to(torch.bfloat16), r=8, lora_alpha=16)
    layer = next(module for module in model.modules() if hasattr(module, "lora_A"))
    return str(next(iter(layer.lora_A.values())).weight.dtype).replace("torch.", "")


@probe("does LoraConfig know use_rslora (scaling alpha / sqrt(r))")
def rslora(base) -> str:
    import inspect

    import peft

    return "yes" if "use_rslora" in inspect.signature(peft.LoraConfig).parameters else "no"


# the other probes register themselves when imported, after the ones above (the order of the rows)
from parity import probes_adapters, probes_targets  # noqa: E402,F401


def run_probes(gpt2_small: bool = True) -> dict[str, dict[str, str]]:
    """{probe name: {"question": ..., "value": ...}}; ``gpt2_small=False`` uses the tiny GPT-2 throughout."""
    base = tiny_gpt2().eval()
    small = minilora.load_model() if gpt2_small else None
    answers = {}
    for name, question in PROBES.items():
        function = FUNCTIONS[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                value = function(base, small) if name == "trainable_line" else function(base)
            except Exception as error:  # noqa: BLE001 - an old API is an answer too
                value = f"error: {short(error)}"
        answers[name] = {"question": question, "value": value}
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.probes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the answers here (default: print them)")
    parser.add_argument("--tiny", action="store_true", help="tiny GPT-2 only (no GPT-2 small: faster)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    answers = run_probes(gpt2_small=not args.tiny)
    if args.json:
        Path(args.json).write_text(json.dumps(answers, indent=2) + "\n")
    else:
        for name, answer in answers.items():
            print(f"{name:<22} {answer['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
