"""The parity checks pass on small configurations, and each one FAILS when a real difference is planted.

Small models only (the plain nn.Linear model and a tiny GPT-2): GPT-2 small is covered by
``python -m parity`` itself and by the other test files.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import minilora
from minilora import compat
from parity import behaviours, checks, grid, suite, twins
from parity.results import CHECKS, FAIL, NOT_APPLICABLE, PASS, Result

from conftest import DEVICES

LINEAR = grid.Case("linear", r=8, lora_alpha=16, targets=grid.ALL_LINEAR)
CASES = [
    LINEAR,
    grid.Case("linear", r=1, lora_alpha=4, use_rslora=True, lora_dropout=0.1, dtype="bfloat16"),
    grid.Case("linear", r=64, lora_alpha=128, targets=grid.ALL_LINEAR, dtype="float64"),
    grid.Case("tiny-gpt2", r=8, lora_alpha=16, targets=grid.ALL_LINEAR, lora_dropout=0.1),
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is several times faster on the shared 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def bases():
    return grid.Bases()


def random_pair(bases, case=LINEAR, device="cpu"):
    pair = grid.make_pair(bases, case, device)
    grid.randomize(pair)
    return pair


def statuses(rows: list[Result]) -> dict[str, str]:
    return {row.metric: row.status for row in rows}


def only_failures(rows: list[Result]) -> list[Result]:
    return [row for row in rows if row.status == FAIL]


# ------------------------------------------------------------------------------------------------
# everything passes on the real thing
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.label)
def test_every_check_passes(bases, case, device, tmp_path):
    rows = suite.run_case(bases, case, device, tuple(CHECKS), tmp_path, with_behaviours=case is LINEAR,
                          training_steps=2)
    assert not only_failures(rows), [(r.check, r.metric, r.message) for r in only_failures(rows)]
    expected = set(CHECKS) if case is LINEAR else set(CHECKS) - {"behaviours", "adapters"}  # small models, once
    assert {row.check for row in rows} == expected
    no_generate = case.model == "linear"  # a plain nn.Module: generate is N/A, and says so
    assert all(row.status == (NOT_APPLICABLE if no_generate and row.check == "generate" else PASS) for row in rows)


def test_counts_match_the_issue_numbers_on_gpt2_small(gpt2_pair):
    """294,912 / 124,734,720 for r=8 on c_attn: 12 blocks * 8 * (768 + 2304), PEFT's count of the total."""
    import peft

    mini, other = gpt2_pair
    case = grid.Case("gpt2", r=8, lora_alpha=16)
    minilora.inject(mini, case.config())
    pair = grid.Pair(case, "cpu", mini, peft.get_peft_model(other, twins.peft_config(case.config())),
                     inputs=None, targets=None)
    rows = checks.check_counts(pair)
    assert [row.status for row in rows] == [PASS, PASS]
    assert rows[0].value == f"{12 * 8 * (768 + 2304):,} / 124,734,720"


# ------------------------------------------------------------------------------------------------
# each check fails when a difference is planted
# ------------------------------------------------------------------------------------------------
def test_counts_fail_on_an_extra_trainable_parameter(bases):
    pair = grid.make_pair(bases, LINEAR, "cpu")
    pair.mini.head.weight.requires_grad_(True)  # minilora now trains more than PEFT
    rows = checks.check_counts(pair)
    assert statuses(rows)["trainable / total"] == FAIL
    assert "but PEFT" in rows[0].message


def test_init_fails_on_a_perturbed_weight(bases):
    pair = grid.make_pair(bases, LINEAR, "cpu")
    with torch.no_grad():
        pair.mini.c_proj.lora_A["default"].weight[0, 0] += 1e-6
    [row] = checks.check_init(pair)
    assert row.status == FAIL
    assert "c_proj.lora_A.default.weight" in row.message and "bitwise" in row.message


def test_forward_fails_on_a_wrong_scaling(bases):
    pair = random_pair(bases)
    pair.mini.c_attn.scaling["default"] *= 2
    rows = checks.check_forward(pair)
    assert statuses(rows) == {"max rel err (eval)": FAIL, "max rel err (train, same RNG)": FAIL}
    assert "exceeds bitwise equality" in rows[0].message


def test_forward_train_mode_fails_on_a_different_dropout(bases):
    pair = random_pair(bases, grid.Case("linear", lora_dropout=0.1, targets=grid.ALL_LINEAR))
    pair.mini.c_fc.lora_dropout["default"].p = 0.2  # eval is unaffected; train mode must see it
    assert statuses(checks.check_forward(pair)) == {"max rel err (eval)": PASS,
                                                    "max rel err (train, same RNG)": FAIL}


def test_forward_refuses_a_vacuous_comparison(bases):
    pair = grid.make_pair(bases, LINEAR, "cpu")  # B = 0: adapted == base, so equality proves nothing
    failures = only_failures(checks.check_forward(pair))
    assert failures and "proves nothing" in failures[0].message


def test_backward_fails_on_a_wrong_scaling(bases):
    pair = random_pair(bases)
    pair.mini.c_attn.scaling["default"] *= 1.001
    [row] = checks.check_backward(pair)
    assert row.status == FAIL and "lora" in row.message


def test_training_fails_when_one_matrix_does_not_train(bases):
    pair = random_pair(bases)
    pair.mini.c_fc.lora_A["default"].weight.requires_grad_(False)
    [row] = checks.check_training(pair, steps=2)
    assert row.status == FAIL
    assert "c_fc.lora_A.default.weight" in row.message


def test_merge_fails_on_a_wrong_scaling(bases):
    pair = random_pair(bases)
    pair.mini.c_proj.scaling["default"] *= 2  # dW = 2 * scaling * B A in merge
    rows = checks.check_merge(pair)
    result = statuses(rows)
    assert result["max rel err (merged outputs)"] == FAIL
    assert result["max rel err (merge_and_unload weights)"] == FAIL
    assert "c_proj" in next(r for r in rows if "weights" in r.metric).message


def test_merge_reports_a_bad_unmerge(bases, monkeypatch):
    real_unmerge = minilora.unmerge

    def sloppy_unmerge(model):
        real_unmerge(model)
        with torch.no_grad():
            model.c_attn.base_layer.weight[0, 0] += 1e-3  # W0 not restored

    monkeypatch.setattr(minilora, "unmerge", sloppy_unmerge)
    rows = checks.check_merge(random_pair(bases))
    row = next(r for r in rows if r.metric.startswith("unmerge residual"))
    assert row.status == FAIL and row.value >= 1e-3 and "PEFT leaves" in row.message


def test_merge_fails_when_unload_changes_module_types(bases, monkeypatch):
    real = minilora.merge_and_unload

    def keeps_one_wrapper(model):
        real(model)
        model.c_fc = torch.nn.Sequential(model.c_fc)  # a different module type than PEFT leaves
        return model

    monkeypatch.setattr(minilora, "merge_and_unload", keeps_one_wrapper)
    rows = checks.check_merge(random_pair(bases))
    assert any(r.status == FAIL for r in rows if r.metric in ("layer types after unload", "merge_and_unload keys"))


def test_files_fail_when_the_saved_scaling_is_wrong(bases, monkeypatch, tmp_path):
    import json

    real_save = minilora.save_adapter

    def save_with_wrong_alpha(model, directory, **kwargs):
        real_save(model, directory, **kwargs)
        config_file = Path(directory) / "adapter_config.json"
        fields = json.loads(config_file.read_text())
        fields["lora_alpha"] *= 2
        config_file.write_text(json.dumps(fields))

    monkeypatch.setattr(minilora, "save_adapter", save_with_wrong_alpha)
    rows = behaviours.check_files(random_pair(bases), tmp_path)
    assert statuses(rows) == {"minilora file -> PEFT: max rel err": FAIL, "PEFT file -> minilora: max rel err": PASS}


def test_files_fail_when_loading_loses_a_weight(bases, monkeypatch, tmp_path):
    real_load = minilora.load_adapter

    def lossy_load(model, source, **kwargs):
        real_load(model, source, **kwargs)
        with torch.no_grad():
            model.c_attn.lora_B["default"].weight.zero_()
        return model

    monkeypatch.setattr(minilora, "load_adapter", lossy_load)
    rows = behaviours.check_files(random_pair(bases), tmp_path)
    assert statuses(rows)["PEFT file -> minilora: max rel err"] == FAIL


def test_behaviours_measure_peft_and_pass_for_minilora(bases, tmp_path):
    import peft

    rows = behaviours.check_behaviours(random_pair(bases), tmp_path)
    assert [row.status for row in rows] == [PASS] * 4  # + parity/wrong_answers.py's rows (no tied lm_head here)
    assert rows[0].value == "adapter output" and f"PEFT {peft.__version__}:" in rows[0].message
    assert "Expected state_dict to be dict-like" in rows[1].message  # what PyTorch says to PEFT users


def test_double_wrap_fails_when_minilora_gives_the_base_output(bases, monkeypatch, tmp_path):
    monkeypatch.setattr(compat.PeftModel, "from_pretrained", classmethod(lambda cls, model, path, **kw: model))
    [row] = behaviours.check_double_wrap(random_pair(bases), tmp_path)
    assert row.status == FAIL and row.value == "base output"
    assert "should give the trained output" in row.message


def test_whole_module_fails_when_minilora_accepts_a_module(bases, monkeypatch):
    monkeypatch.setattr(minilora, "load_adapter", lambda model, source, **kw: model)
    [row] = behaviours.check_whole_module(random_pair(bases))
    assert row.status == FAIL and "accepted it" in row.value


# ------------------------------------------------------------------------------------------------
# the runner
# ------------------------------------------------------------------------------------------------
def test_a_check_that_raises_becomes_a_fail_row():
    def broken():
        raise RuntimeError("boom")

    [row] = suite.guarded("forward", LINEAR, "cpu", broken)
    assert row.status == FAIL and "RuntimeError: boom" in row.message


def test_a_case_peft_cannot_express_is_not_applicable():
    def unsupported():
        raise twins.UnsupportedByPeft("peft 0.6.2 has no LoraConfig.use_rslora")

    [row] = suite.guarded("forward", LINEAR, "cpu", unsupported)
    assert row.status == "N/A" and "use_rslora" in row.message


def test_absent_devices_are_reported_not_skipped(monkeypatch):
    monkeypatch.setattr(suite, "device_available", lambda device: device == "cpu")
    rows = suite.run_suite([], suite.resolve_devices("all"))
    assert [(row.device, row.status, row.message) for row in rows] == [("cuda", "SKIP", "cuda: not available")]


# ------------------------------------------------------------------------------------------------
# targets, refusals and generate (the architecture axis)
# ------------------------------------------------------------------------------------------------
def test_targets_fail_when_a_layer_is_missing(bases):
    pair = grid.make_pair(bases, LINEAR, "cpu")
    pair.mini.c_fc = pair.mini.c_fc.base_layer  # minilora now adapts one layer fewer than PEFT
    [row] = checks.check_targets(pair)
    assert row.status == FAIL and "PEFT wraps ['c_fc']" in row.message


def test_refusal_fails_when_only_minilora_refuses(bases):
    base = bases.get("linear", "float32", "cpu")
    [row] = checks.check_refusal(base, LINEAR, "cpu", minilora.MiniLoraError("planted refusal"))
    assert row.status == FAIL and "but PEFT wraps 3 layers" in row.message
    [row] = checks.check_refusal(base, LINEAR, "cpu", KeyError("a crash, not a refusal"))
    assert row.status == FAIL and "not a MiniLoraError" in row.message


def test_refusal_passes_when_both_refuse(bases):
    base = bases.get("linear", "float32", "cpu")
    case = grid.Case("linear", targets=("no_such_layer",))
    [row] = checks.check_refusal(base, case, "cpu", minilora.MiniLoraError("matches no module"))
    assert row.status == PASS and row.value == "both refuse"


TINY_GPT2 = grid.Case("tiny-gpt2", r=8, lora_alpha=16)


def test_generate_fails_on_a_perturbed_adapter(bases):
    pair = random_pair(bases, TINY_GPT2)
    assert {row.status for row in checks.check_generate(pair)} == {PASS}
    with torch.no_grad():
        pair.mini.transformer.h[0].attn.c_attn.lora_B["default"].weight[0, 0] += 1e-4
    rows = checks.check_generate(pair)
    assert statuses(rows)["max rel err (scores of 4 greedy steps)"] == FAIL


def test_generate_tokens_fail_when_the_tokens_differ(bases, monkeypatch):
    pair = random_pair(bases, TINY_GPT2)
    real = checks._generate

    def shifted(model, pair_):
        result = real(model, pair_)
        if model is pair.mini:
            result.sequences[:, -1] += 1  # one different token at the end
        return result
    monkeypatch.setattr(checks, "_generate", shifted)
    assert statuses(checks.check_generate(pair))["tokens"] == FAIL


def test_a_nan_error_is_the_worst_whatever_its_place():
    """A NaN relative error (a NaN weight or gradient) is what ``worst`` reports, also after a finite one:
    max() keeps the first number over a NaN, so a NaN in the second tensor passed as the first's error."""
    one, nan = torch.tensor([1.0]), torch.tensor([float("nan")])
    named = [("a", one, one * 1.1), ("b", nan, one)]
    for order in (named, named[::-1]):
        error, name, _ = checks.worst(order)
        assert error != error and name == "b"
    assert twins.largest([0.1, float("nan")]) != twins.largest([0.1, float("nan")])  # (the other maxima)
