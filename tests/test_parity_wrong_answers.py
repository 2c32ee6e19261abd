"""parity/wrong_answers.py: each row PASSes for minilora, reports what PEFT does, and FAILs when the
wrong answer is planted in minilora."""

from __future__ import annotations

import warnings

import pytest
import torch

import minilora
from minilora import layer as layer_module
from parity import grid, wrong_answers
from parity.results import FAIL, PASS

LINEAR = grid.Case("linear", r=8, lora_alpha=16, targets=grid.ALL_LINEAR)
GPT2 = grid.Case("tiny-gpt2", r=8, lora_alpha=16)


@pytest.fixture(autouse=True)
def quiet():
    warnings.simplefilter("ignore")


@pytest.fixture(scope="module")
def bases():
    return grid.Bases()


def random_pair(bases, case=LINEAR):
    pair = grid.make_pair(bases, case, "cpu")
    grid.randomize(pair)
    return pair


def test_every_row_passes_and_reports_peft(bases, tmp_path):
    import peft

    rows = wrong_answers.check_wrong_answers(random_pair(bases, GPT2), tmp_path)
    assert [row.status for row in rows] == [PASS, PASS, PASS]
    assert all(f"PEFT {peft.__version__}:" in row.message for row in rows)
    merged, string, tied = rows
    assert merged.value == "adapter output" and "neither" in merged.message  # PEFT adds the update twice
    assert string.value == "clear error" and "rsLoRA switched on" in string.message
    assert tied.value <= tied.tolerance and "merged vs unmerged rel err" in tied.message


def test_merged_state_dict_fails_when_the_merged_flag_is_lost(bases, monkeypatch):
    monkeypatch.setattr(layer_module, "_record_merged_adapters", lambda *args: None)
    monkeypatch.setattr(layer_module, "_restore_merged_adapters", lambda *args: None)
    [row] = wrong_answers.check_merged_state_dict(random_pair(bases))  # layers built with the planted hooks
    assert row.status == FAIL and row.value.startswith("neither") and "should give the adapter output" in row.message


def test_string_boolean_fails_when_minilora_accepts_it(bases, monkeypatch, tmp_path):
    from minilora import config as config_module

    real_validate = config_module.LoraConfig.validate

    def lenient(self):
        self.use_rslora = bool(self.use_rslora)  # what a missing type check does: "false" -> True
        real_validate(self)

    monkeypatch.setattr(config_module.LoraConfig, "validate", lenient)
    [row] = wrong_answers.check_string_boolean(random_pair(bases), tmp_path)
    assert row.status == FAIL and row.value.startswith("accepted it") and "should refuse" in row.message


def test_tied_merge_fails_when_merge_writes_into_the_shared_weight(bases, monkeypatch):
    monkeypatch.setattr(layer_module.LoraLinear, "_untie", lambda self: None)
    [row] = wrong_answers.check_tied_merge(random_pair(bases, GPT2))
    assert row.status == FAIL and row.value > 1e-2


def test_tied_merge_has_no_row_without_a_tied_lm_head(bases):
    assert wrong_answers.check_tied_merge(random_pair(bases)) == []
