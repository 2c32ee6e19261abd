"""Checks that go through files and PEFT's loading API: adapter files both ways, and PEFT's pitfalls.

- files: an adapter saved by ``minilora.save_adapter`` loads in ``peft.PeftModel.from_pretrained`` and
  gives minilora's outputs; one saved by PEFT's ``save_pretrained`` loads with ``minilora.load_adapter``
  and gives PEFT's outputs.
- behaviours: two mistakes that PEFT articles warn about, measured on the installed PEFT, not assumed,
  each next to what minilora does with the same code:
  1. double wrap: ``get_peft_model(model, config)`` and then ``PeftModel.from_pretrained(that_model, dir)``.
  2. whole module: ``torch.save(model)`` (the whole object) mixed up with weights, then
     ``load_state_dict(torch.load(...))`` / ``load_adapter`` on the loaded object.
  A row PASSes when minilora does the right thing (trained outputs; a clear MiniLoraError); its message
  says what PEFT did. parity/wrong_answers.py adds three more of the kind: a merged state dict, a
  string boolean in adapter_config.json, merging a tied lm_head.

Both need ``pair.base`` (the shared base, deep-copied here, never changed) and equal non-zero
adapters on the pair (``grid.randomize``).
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch

import minilora
from parity import twins
from parity.checks import RELATIVE_TOLERANCE, rel_err, tolerance
from parity.grid import Pair, output
from parity.results import FAIL, PASS, Result, within


def _fresh_base(pair: Pair) -> torch.nn.Module:
    return copy.deepcopy(pair.base).eval()


def _eval_output(model: torch.nn.Module, pair: Pair) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return output(model, pair)


NOISE = ("fan_in_fan_out", "deprecated", "is_gradient_checkpointing")  # warnings unrelated to loading


def _warnings_text(caught: list) -> str:
    """'no warning', or the first warning that is about loading (not a deprecation notice)."""
    lines = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    relevant = [line for line in lines if not any(word in line for word in NOISE)]
    if not relevant:
        return "no warning about it"
    return f"warns {relevant[0][:100]!r}"


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:90]}"


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def check_files(pair: Pair, directory: Path) -> list[Result]:
    """minilora's adapter file loads in PEFT, PEFT's loads in minilora; the outputs are equal."""
    import peft

    label, device, tol = pair.label, pair.device, tolerance(pair)
    rows = []
    mini_dir, peft_dir = Path(directory) / "saved-by-minilora", Path(directory) / "saved-by-peft"

    expected = _eval_output(pair.mini, pair)
    minilora.save_adapter(pair.mini, mini_dir)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = peft.PeftModel.from_pretrained(_fresh_base(pair), str(mini_dir))
        rows.append(within("files", label, device, "minilora file -> PEFT: max rel err",
                           rel_err(_eval_output(loaded, pair), expected), tol, f"PEFT: {_warnings_text(caught)}"))
        del loaded
    except Exception as error:  # an old PEFT may refuse the file: say how
        rows.append(Result("files", label, device, "minilora file -> PEFT", None, None, FAIL,
                           f"PEFT {peft.__version__} could not load it: {_short(error)}"))

    expected = _eval_output(pair.peft, pair)
    pair.peft.save_pretrained(str(peft_dir))
    try:
        loaded = minilora.load_adapter(_fresh_base(pair), peft_dir)
        rows.append(within("files", label, device, "PEFT file -> minilora: max rel err",
                           rel_err(_eval_output(loaded, pair), expected), tol,
                           f"PEFT wrote {sorted(p.name for p in peft_dir.iterdir())}"))
    except minilora.MiniLoraError as error:
        rows.append(Result("files", label, device, "PEFT file -> minilora", None, None, FAIL,
                           f"minilora could not load PEFT {peft.__version__}'s file: {_short(error)}"))
    return rows


# ------------------------------------------------------------------------------------------------
# behaviours
# ------------------------------------------------------------------------------------------------
def classify(out: torch.Tensor, adapted: torch.Tensor, base: torch.Tensor, dtype: str) -> str:
    """"adapter output", "base output" or "neither": which of the two ``out`` matches."""
    loose = RELATIVE_TOLERANCE[dtype]
    if rel_err(out, adapted) <= loose:
        return "adapter output"
    if rel_err(out, base) <= loose:
        return "base output"
    return f"neither (rel err {rel_err(out, adapted):.1e} to the adapter)"


def _compat_config(pair: Pair):
    from minilora import compat

    case = pair.case
    return compat.LoraConfig(r=case.r, lora_alpha=case.lora_alpha, lora_dropout=case.lora_dropout,
                             use_rslora=case.use_rslora, target_modules=list(case.targets))


def check_double_wrap(pair: Pair, directory: Path) -> list[Result]:
    """get_peft_model(model) then PeftModel.from_pretrained(that model, dir): which output comes out?"""
    import peft
    from minilora import compat

    label, device = pair.label, pair.device
    saved = Path(directory) / "trained-adapter"
    pair.peft.save_pretrained(str(saved))
    adapted, base = _eval_output(pair.peft, pair), _eval_output(pair.base, pair)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            wrapped = peft.get_peft_model(_fresh_base(pair), twins.peft_config(pair.case.config()))
            loaded = peft.PeftModel.from_pretrained(wrapped, str(saved))
            peft_outcome = classify(_eval_output(loaded, pair), adapted, base, pair.case.dtype)
            del wrapped, loaded
        except Exception as error:
            peft_outcome = f"raises {_short(error)}"
    peft_said = f"PEFT {peft.__version__}: {peft_outcome}, {_warnings_text(caught)}"

    try:
        model = compat.get_peft_model(_fresh_base(pair), _compat_config(pair))
        model = compat.PeftModel.from_pretrained(model, saved)
        mini_outcome = classify(_eval_output(model, pair), adapted, base, pair.case.dtype)
    except minilora.MiniLoraError as error:
        mini_outcome = f"raises {_short(error)}"
    ok = mini_outcome == "adapter output"
    return [Result("behaviours", label, device, "double wrap: minilora gives", mini_outcome, None,
                   PASS if ok else FAIL, peft_said if ok else f"minilora should give the trained output; {peft_said}")]


def check_whole_module(pair: Pair) -> list[Result]:
    """torch.save(model) of the whole object, then loading it as if it were weights."""
    import peft
    from minilora import compat

    label, device = pair.label, pair.device

    def round_trip(model: torch.nn.Module):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)  # the whole object; weights_only=True refuses it

    try:
        whole = round_trip(pair.peft)
        target = peft.get_peft_model(_fresh_base(pair), twins.peft_config(pair.case.config()))
        target.load_state_dict(whole)
        peft_outcome = "load_state_dict accepted it"
    except Exception as error:
        peft_outcome = f"load_state_dict raises {_short(error)}"

    whole = round_trip(pair.mini)
    outcomes = []
    fresh = _fresh_base(pair)
    for action, call in (
        ("minilora.load_adapter", lambda: minilora.load_adapter(fresh, whole)),
        ("compat load_state_dict", lambda: compat.get_peft_model(copy.deepcopy(pair.base), _compat_config(pair))
         .load_state_dict(whole)),
    ):
        try:
            call()
            outcomes.append((action, "accepted it", False))
        except minilora.MiniLoraError as error:
            outcomes.append((action, "MiniLoraError" if "torch.save" in str(error) else _short(error),
                             "torch.save" in str(error)))
        except Exception as error:
            outcomes.append((action, _short(error), False))
    untouched = not any(True for _ in minilora.lora_layers(fresh))
    ok = all(good for _, _, good in outcomes) and untouched
    value = "clear error" if ok else "; ".join(f"{a}: {o}" for a, o, _ in outcomes)
    message = f"PEFT {peft.__version__}: {peft_outcome}"
    if not untouched:
        message = "the model was changed by a failed load; " + message
    return [Result("behaviours", label, device, "whole-module mix-up: minilora gives", value, None,
                   PASS if ok else FAIL, message)]


def check_behaviours(pair: Pair, directory: Path) -> list[Result]:
    """Both pitfalls on one pair, then the cases where PEFT gives a silently different answer
    (parity/wrong_answers.py)."""
    from parity.wrong_answers import check_wrong_answers

    return check_double_wrap(pair, directory) + check_whole_module(pair) + check_wrong_answers(pair, directory)
