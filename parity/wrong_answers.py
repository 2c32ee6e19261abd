"""Behaviours where PEFT gives a silently different answer, measured next to what minilora does.

Part of the ``behaviours`` check (parity/behaviours.py). Each row PASSes when minilora gives the
right answer (the adapter's outputs, or a clear MiniLoraError); its message says what the installed
PEFT did with the same input, measured, not assumed:

1. merged state dict: ``torch.save(model.state_dict())`` taken while merged, loaded into a model
   whose layers are not merged. PEFT's state dict does not say it was merged: W0 + dW is loaded as W0
   and the update is added once more.
2. string booleans: ``"use_rslora": "false"`` in adapter_config.json. PEFT reads the non-empty string
   as true and loads the adapter at the rsLoRA scaling ``alpha / sqrt(r)``.
3. tied weights (GPT-2 only): LoRA on ``lm_head``, whose weight is the input embedding's. PEFT's merge
   adds dW to the shared weight, so the embedding takes the update too: merged != unmerged.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import torch

import minilora
from parity import twins
from parity.behaviours import _eval_output, _fresh_base, _short, classify
from parity.checks import RELATIVE_TOLERANCE, rel_err
from parity.grid import Pair
from parity.results import FAIL, PASS, Result


def _round_trip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def check_merged_state_dict(pair: Pair) -> list[Result]:
    """state_dict() of a merged model, loaded into an unmerged twin: which output comes out?"""
    import peft

    adapted, base = _eval_output(pair.peft, pair), _eval_output(pair.base, pair)
    try:
        merged = copy.deepcopy(pair.peft)
        merged.merge_adapter()
        target = peft.get_peft_model(_fresh_base(pair), twins.peft_config(pair.case.config()))
        target.load_state_dict(_round_trip(merged.state_dict()))
        peft_outcome = classify(_eval_output(target, pair), adapted, base, pair.case.dtype)
    except Exception as error:
        peft_outcome = f"raises {_short(error)}"

    try:
        merged = copy.deepcopy(pair.mini)
        minilora.merge(merged)
        target = minilora.inject(_fresh_base(pair), pair.case.config())
        target.load_state_dict(_round_trip(merged.state_dict()))
        mini_outcome = classify(_eval_output(target, pair), adapted, base, pair.case.dtype)
    except Exception as error:
        mini_outcome = f"raises {_short(error)}"
    return [_outcome_row(pair, "merged state_dict -> unmerged model: minilora gives", mini_outcome,
                         "adapter output", peft_outcome, "minilora should give the adapter output")]


def check_string_boolean(pair: Pair, directory: Path) -> list[Result]:
    """adapter_config.json with "use_rslora": "false" (a string): refused, or loaded at which scaling?"""
    import peft

    saved = Path(directory) / "string-boolean"
    pair.peft.save_pretrained(str(saved))
    config_file = saved / "adapter_config.json"
    fields = json.loads(config_file.read_text())
    fields["use_rslora"] = "false"
    config_file.write_text(json.dumps(fields))
    adapted, base = _eval_output(pair.peft, pair), _eval_output(pair.base, pair)
    try:
        loaded = peft.PeftModel.from_pretrained(_fresh_base(pair), str(saved))
        peft_outcome = classify(_eval_output(loaded, pair), adapted, base, pair.case.dtype)
        if peft_outcome != "adapter output":
            peft_outcome += ", rsLoRA switched on" if getattr(loaded.peft_config["default"], "use_rslora", False) else ""
    except Exception as error:
        peft_outcome = f"raises {_short(error)}"

    fresh = _fresh_base(pair)
    try:
        minilora.load_adapter(fresh, saved)
        mini_outcome = "accepted it: " + classify(_eval_output(fresh, pair), adapted, base, pair.case.dtype)
    except minilora.MiniLoraError as error:
        mini_outcome = "clear error" if "use_rslora" in str(error) else f"raises {_short(error)}"
    except Exception as error:
        mini_outcome = f"raises {_short(error)}"
    return [_outcome_row(pair, 'use_rslora: "false" in the file: minilora gives', mini_outcome,
                         "clear error", peft_outcome, "minilora should refuse the string")]


def _outcome_row(pair: Pair, metric: str, mini_outcome: str, wanted: str, peft_outcome: str, hint: str) -> Result:
    """PASS when minilora's outcome is ``wanted``; PEFT's outcome is reported next to it either way."""
    import peft

    ok = mini_outcome == wanted
    said = f"PEFT {peft.__version__}: {peft_outcome}"
    return Result("behaviours", pair.label, pair.device, metric, mini_outcome, None, PASS if ok else FAIL,
                  said if ok else f"{hint}; {said}")


def check_tied_merge(pair: Pair) -> list[Result]:
    """LoRA on GPT-2's lm_head (tied to the input embedding): merged vs unmerged outputs."""
    import peft

    if pair.case.model not in ("gpt2", "tiny-gpt2") or pair.case.architecture is not None:
        return []  # only GPT-2 has the tied lm_head here
    config = minilora.LoraConfig(r=pair.case.r, lora_alpha=pair.case.lora_alpha, target_modules=["lm_head"],
                                 init_lora_weights=False)  # a non-zero update

    def merged_vs_unmerged(model, merge) -> float:
        unmerged = _eval_output(model, pair)
        merge(model)
        return rel_err(_eval_output(model, pair), unmerged)

    try:
        peft_model = peft.get_peft_model(_fresh_base(pair), twins.peft_config(config))
        peft_said = f"merged vs unmerged rel err {merged_vs_unmerged(peft_model, lambda m: m.merge_adapter()):.1e}"
    except Exception as error:
        peft_said = f"raises {_short(error)}"
    try:
        mini = minilora.inject(_fresh_base(pair), config)
        value = merged_vs_unmerged(mini, minilora.merge)
    except Exception as error:
        return [Result("behaviours", pair.label, pair.device, "tied lm_head: merged vs unmerged (minilora)", None,
                       None, FAIL, f"minilora raised {_short(error)}; PEFT {peft.__version__}: {peft_said}")]
    bound = RELATIVE_TOLERANCE[pair.case.dtype]  # merging rounds: never bitwise
    return [Result("behaviours", pair.label, pair.device, "tied lm_head: merged vs unmerged (minilora)", value,
                   bound, PASS if value <= bound else FAIL, f"PEFT {peft.__version__}: {peft_said}")]


def check_wrong_answers(pair: Pair, directory: Path) -> list[Result]:
    """All three on one pair."""
    return check_merged_state_dict(pair) + check_string_boolean(pair, directory) + check_tied_merge(pair)
