"""Random sequences of PEFT's calls on several adapters (parity/differential_sequences.py), run with ``peft``
and with ``minilora.compat``: every call and the outputs after it must agree (bitwise; 1e-5 once merged), or
minilora must refuse with a MiniLoraError. A few drawn sequences here, and the sequences that found each fix,
replayed (each raised a Finding before its fix: tests in test_differential_wide.py pin the fixes directly).
"""

from __future__ import annotations

import random

import pytest

from minilora import compat
from parity import differential_sequences
from parity.differential import Finding
from parity.differential_sequences import MODELS, Refusal, Sequence, draw_sequence, run_sequence

pytestmark = pytest.mark.usefixtures("one_thread")


def test_random_sequences_agree_with_peft():
    ran = 0
    for index in range(6):
        try:
            ran += len(run_sequence(draw_sequence(random.Random(f"test/{index}")), seed=index))
        except Refusal:  # minilora refused what PEFT ran (documented scope: loading into merged layers)
            continue
    assert ran >= 30  # calls run on both sides and compared (measured: 47 of the 72 drawn)


def _sequence(arch, head, calls, **changes):
    sequence = draw_sequence(random.Random(0))
    sequence.arch, sequence.head = arch, head
    targets, _ = MODELS[(arch, head)]
    sequence.configs = {"default": dict(target_modules=targets[:1], r=2, lora_alpha=4, bias="none"),
                        "b": dict(target_modules=targets, r=4, lora_alpha=3),
                        "c": dict(target_modules=targets[1:], r=1, use_rslora=True)}
    for name, fields in changes.items():
        sequence.configs[name].update(fields)
    sequence.calls = calls
    return sequence


REPLAYS = {
    # a new adapter unmerges every merged layer (PEFT's inject_adapter ends with set_adapter): outputs 0.2 apart
    "add-unmerges": _sequence("gpt2", "lm", [("merge", ["default"], ""), ("add", ["default"], "b"),
                                             ("merge_names", ["b"], "")]),
    # an adapter added again to layers a deleted one left empty: only its own modules start in train mode
    "re-add-modes": _sequence("opt", "lm", [("add", ["default"], "b"), ("forward", ["default"], ""),
                                            ("delete", ["b"], ""), ("add", ["default"], "b")]),
    # add_weighted_adapter, then unload of a merged model: W0 + dW stays in the plain layers (PEFT does not unmerge)
    "weighted-then-unload": _sequence("llama", "lm", [("add", ["default"], "b"), ("weighted", ["default", "b"], "cat"),
                                                      ("merge", ["default"], ""), ("unload_copy", ["default"], "")]),
    # several active, then the adapter the PeftModel keeps is deleted: PEFT's forward fails, minilora refuses
    "delete-kept-name": _sequence("opt", "lm", [("add", ["default"], "b"), ("add", ["default"], "c"),
                                                ("base_set_list", ["default", "b", "c"], ""),
                                                ("delete", ["default"], ""), ("forward", ["b"], "")]),
    # --seed 108 #80: delete_adapter lets each layer pick its next adapter (fc1: "c"); a new adapter then gives every
    # layer the model's active adapters, as PEFT's inject_adapter does (fc1 runs none): outputs were 0.35 apart
    "new-adapter-aligns-layers": _sequence("opt", "lm", [("add", ["default"], "c"), ("save_load", ["default"], ""),
                                                         ("delete", ["default"], ""), ("save_load", ["L1"], ""),
                                                         ("forward", ["default"], "")]),
    # --seed 109 #84: after PeftModel.set_adapter("c") and base_model.set_adapter(["default"]), deleting "default"
    # leaves none active in the first layer, but PEFT's PeftModel keeps "c": its forward runs; minilora refused it
    "delete-keeps-set-name": _sequence("llama", "lm", [("add", ["default"], "c"), ("set", ["c"], ""),
                                                       ("base_set_list", ["default"], ""), ("delete", ["default"], ""),
                                                       ("forward", ["c"], "")]),
    # --seed 700 #57: an adapter with modules_to_save=["ln_f"] added, deleted and added again: the wrapper it left is
    # not new, so PEFT leaves its mode (eval); minilora put it in train mode
    "re-add-wrapper-mode": _sequence("gpt2", "lm", [("add", ["default"], "c"), ("delete", ["c"], ""),
                                                    ("forward", ["default"], ""), ("add", ["default"], "c")],
                                     c=dict(modules_to_save=["ln_f"])),
}


# calls run and compared in each replay: all, except where both libraries fail (then the sequence stops)
REPLAYED = {name: len(sequence.calls) for name, sequence in REPLAYS.items()}
REPLAYED["delete-kept-name"] = 4  # (the forward after delete_adapter fails in PEFT, minilora refuses: both stop)


@pytest.mark.parametrize("name", list(REPLAYS))
def test_replayed_sequences_agree_with_peft(name):
    done = run_sequence(REPLAYS[name])
    assert done == [call for call, _, _ in REPLAYS[name].calls][:REPLAYED[name]]


def test_a_minilora_that_keeps_merged_layers_on_add_fails_its_replay(monkeypatch):
    """Planted: compat's add_adapter no longer unmerges (the bug fixed in 'add-unmerges'): the replay finds it."""
    from minilora import compat_loading

    monkeypatch.setattr(compat, "unmerge_as_pefts_injection", lambda model: None)
    monkeypatch.setattr(compat_loading, "unmerge_as_pefts_injection", lambda model: None)
    with pytest.raises(Finding, match="merge_names"):
        run_sequence(REPLAYS["add-unmerges"])


def test_the_cli_prints_a_summary(capsys):
    assert differential_sequences.main(["--sequences", "2", "--seed", "3"]) == 0
    assert "2 sequences: 0 findings" in capsys.readouterr().out


def test_a_sequence_prints_its_calls():
    sequence = Sequence("opt", "lm", {"default": {}}, [("merge", ["default"], "")])
    assert "calls=[('merge', ['default'], '')]" in str(sequence)
