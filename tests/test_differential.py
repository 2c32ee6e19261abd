"""The differential fuzzer (parity/differential.py): random PEFT scripts run with ``peft`` and with
``minilora.compat`` from the same seed; every step must agree (bitwise on the CPU; merged outputs
within 1e-5 relative), or minilora must refuse with a MiniLoraError.

A few examples per run here (hypothesis, derandomized); ``python -m parity.differential --examples
500`` runs many more. A scenario where both sides refuse early compares nothing, so the random test also
counts how many examples compared numbers, and fails below a stated share: a minilora that refuses
everything (planted below) cannot pass. Below them, each difference the fuzzer found, replayed as a fixed
scenario with the exact steps it must run and their outcomes, and as a focused comparison with PEFT.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import warnings

import peft
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from minilora import MiniLoraError, compat
from parity import differential
from parity.architectures import ARCHITECTURES
from parity.differential import Draw, Refusal, Scenario, build_base, draw_scenario, run_scenario

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_OPS = dict(train_forward=True, backward=True, merge=True, disable=True, files=True, merge_and_unload=True)


# At least this share of the random examples must get past both sides' refusals to a comparison of
# numbers (outputs, gradients, parameters, file tensors). Measured when it was set: 8 of these 14 examples
# (57%), 18 of the first 40 derandomized ones (45%), 58 of 80 of the CLI's draws (--seed 1, 72%); the rest
# are refused by both sides at get_peft_model (task heads and modules_to_save that do not fit the model),
# or refused by minilora alone (documented scope). A third leaves a margin of 3 examples here.
RANDOM_EXAMPLES = 14
MIN_COMPARED_SHARE = 1 / 3


def random_outcomes(examples: int) -> collections.Counter:
    """Run ``examples`` derandomized scenarios (a Finding fails at once); count how each ended: "compared
    numbers", "refused by minilora (...)" (PEFT ran) or "compared no numbers (...)" (the steps not equal)."""
    outcomes: collections.Counter = collections.Counter()

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data):
        scenario = draw_scenario(Draw(data=data), wide=Draw(data=data))  # (with the wide draws: differential_wide.py)
        try:
            done = run_scenario(scenario)  # raises Finding (an AssertionError) on any difference
        except Refusal as refusal:  # minilora refused with a MiniLoraError where PEFT ran (documented scope)
            outcomes[f"refused by minilora ({str(refusal).split(':')[0]})"] += 1
            return
        if done.numbers:
            outcomes["compared numbers"] += 1
        else:
            outcomes[f"compared no numbers ({[step for step in done.steps if step[1] != 'equal']})"] += 1

    one()
    return outcomes


def assert_enough_compared(outcomes: collections.Counter, examples: int) -> None:
    assert sum(outcomes.values()) == examples, outcomes
    compared = outcomes["compared numbers"]
    assert compared >= MIN_COMPARED_SHARE * examples, (
        f"only {compared} of {examples} random examples compared numbers with PEFT (at least "
        f"{MIN_COMPARED_SHARE:.0%} expected): {dict(outcomes)}")


def test_random_scenarios_agree_with_peft():
    assert_enough_compared(random_outcomes(RANDOM_EXAMPLES), RANDOM_EXAMPLES)


@pytest.mark.parametrize("who", ["minilora", "both"])
def test_a_minilora_that_refuses_everything_fails_the_random_test(monkeypatch, who):
    """Planted: compat.get_peft_model (and with "both" also PEFT's) always raises. Every example then
    ends refused, with no Finding; the count of compared examples must fail the test."""
    def refuse(*args, **kwargs):
        raise MiniLoraError("planted: refuses everything")

    def peft_refuses(*args, **kwargs):
        raise ValueError("planted: PEFT refuses too")

    monkeypatch.setattr(compat, "get_peft_model", refuse)
    if who == "both":
        monkeypatch.setattr(peft, "get_peft_model", peft_refuses)
    outcomes = random_outcomes(4)
    assert outcomes["compared numbers"] == 0, outcomes
    with pytest.raises(AssertionError, match=r"only 0 of 4 random examples compared numbers"):
        assert_enough_compared(outcomes, 4)


# --------------------------------------------------------------------------------------------
# What the fuzzer found, replayed (each was a Finding before its fix), with the exact steps each must run
# --------------------------------------------------------------------------------------------
EQUAL, RAN = "equal", "ran"  # compared with PEFT and equal; both ran, compared through the steps after it
BIAS_ONE_ADAPTER = "both refused (MiniLoraError / ValueError)"  # a second adapter while bias != "none" (PEFT's rule)
START = [("LoraConfig", RAN), ("get_peft_model", EQUAL), ("init", EQUAL), ("counts and config", EQUAL),
         ("forward eval", EQUAL)]
TRAIN = [("forward train", EQUAL), ("backward", EQUAL)]
SECOND = [("LoraConfig (second)", RAN), ("add_adapter", EQUAL), ("add_adapter init", EQUAL), ("set_adapter", EQUAL),
          ("forward (other)", EQUAL), ("backward (other)", EQUAL)]
MERGE_DISABLE = [("merge_adapter", RAN), ("forward merged", EQUAL), ("unmerge_adapter", RAN),
                 ("forward unmerged", EQUAL), ("disable_adapter", EQUAL), ("after disable_adapter", EQUAL)]
SAVED = [("save_pretrained", EQUAL), ("from_pretrained", EQUAL)]
CROSS_LOADED = [("minilora loads PEFT's files", EQUAL), ("peft loads minilora's files", EQUAL)]
LOADED = SAVED + [("load_adapter", EQUAL), ("set_adapter(loaded)", EQUAL), ("forward (loaded)", EQUAL)] + CROSS_LOADED
LOADED_WITH_BIAS = SAVED + [("load_adapter", BIAS_ONE_ADAPTER)] + CROSS_LOADED
UNLOAD = [("before merge_and_unload", EQUAL), ("merge_and_unload", EQUAL), ("forward after merge_and_unload", EQUAL)]

REPLAYS = {
    # "all-linear" on a model with 20+ linear layers: PEFT shortens the names to suffixes (config, file)
    "all-linear-shortened": (Scenario("mbart", "lm", dict(target_modules="all-linear", r=4, lora_alpha=1,
                                                           init_lora_weights="gaussian", lora_dropout=0.1,
                                                           task_type="SEQ_2_SEQ_LM"), ops=ALL_OPS),
                             START + TRAIN + MERGE_DISABLE + LOADED + UNLOAD),
    # an exclude_modules list (a set in compat's config) could not be written to adapter_config.json
    "exclude-list-saved": (Scenario("gptj", "seq_cls", dict(exclude_modules=["k_proj"], r=1, lora_alpha=4,
                                                             bias="lora_only", task_type="SEQ_CLS"), ops=ALL_OPS),
                           START + TRAIN + MERGE_DISABLE + LOADED_WITH_BIAS + UNLOAD),
    # add_adapter froze the base biases that bias="all" of the first adapter trains
    "add-adapter-keeps-trainable-biases": (Scenario(
        "opt", "lm", dict(target_modules=["model.decoder.layers.0.self_attn.k_proj"], r=2, bias="all",
                          task_type="CAUSAL_LM"),
        second=dict(target_modules=["self_attn.v_proj", "fc1"], layers_to_transform=[0, 1], layers_pattern="layers",
                    r=8), ops=ALL_OPS),
        START + TRAIN + SECOND + MERGE_DISABLE + LOADED + UNLOAD),
    # a second adapter of a QUESTION_ANS model gets its own copy of the head, as in PEFT. Its files are not
    # loaded: the second adapter's task_type SEQ_2_SEQ_LM makes PEFT's from_pretrained build a
    # PeftModelForSeq2SeqLM, which reads prepare_inputs_for_generation that the QA model lacks
    "add-adapter-task-head": (Scenario(
        "electra", "qa", dict(target_modules=".*(key)", r=4, bias="all", task_type="QUESTION_ANS"),
        second=dict(target_modules=r".*\.0\..*(dense)", r=8, task_type="SEQ_2_SEQ_LM"), ops=ALL_OPS),
        START + TRAIN + SECOND + MERGE_DISABLE
        + [("save_pretrained", EQUAL), ("PEFT loads its own files", "stop: PEFT cannot (AttributeError)")] + UNLOAD),
    # loading with is_trainable=False: PEFT leaves bias="all" biases trainable
    "inference-biases": (Scenario("gpt2", "qa", dict(target_modules=["attn.c_attn", "attn.c_proj"], r=1, bias="all",
                                                      task_type="QUESTION_ANS"), ops=ALL_OPS),
                         START + TRAIN + MERGE_DISABLE + LOADED_WITH_BIAS + UNLOAD),
    # fan_in_fan_out: PEFT's default False, set to the layer's layout (Conv1D: True) while injecting
    "fan-in-fan-out": (Scenario("olmo", "lm", dict(target_modules=".*(k_proj)", r=2, bias="lora_only",
                                                    task_type="CAUSAL_LM"), ops=ALL_OPS),
                       START + TRAIN + MERGE_DISABLE + LOADED_WITH_BIAS + UNLOAD),
    # PEFT's file of an adapter on lm_head also holds lm_head.base_layer.weight: minilora refused to load it
    "peft-file-with-lm-head-base-weight": (Scenario("qwen3", "lm", dict(target_modules=["o_proj", "lm_head"], r=8,
                                                                        bias="lora_only", task_type="CAUSAL_LM"),
                                                    ops=dict(backward=True, files=True)),
                                           START + [("backward", EQUAL)] + LOADED_WITH_BIAS),
    # bias="all" with a head built of several layers: PEFT's file holds classifier.original_module.dense.bias and
    # the copy's biases again; minilora refused to load it (and expected a bias of the head's copy twice)
    "peft-file-bias-all-nested-head": (Scenario("roberta", "seq_cls", dict(
        target_modules=["roberta.encoder.layer.0.attention.self.key"], r=4, bias="all", task_type="SEQ_CLS"),
        ops=dict(backward=True, train_step=True, files=True)),
        START + [("backward", EQUAL), ("AdamW step", EQUAL)] + LOADED_WITH_BIAS),
    # ... and its bias when lm_head has one (GPT-J)
    "peft-file-with-lm-head-base-bias": (Scenario("gptj", "lm", dict(target_modules=["lm_head"], r=8,
                                                                      task_type="CAUSAL_LM"), ops=dict(files=True)),
                                         START + LOADED),
    # loading with is_trainable=False, bias="all": a bias shared with a modules_to_save module (RoBERTa's
    # lm_head.bias is lm_head.decoder.bias) is frozen with the wrapper, as in PEFT
    "inference-bias-shared-with-saved-module": (Scenario("roberta", "lm", dict(
        target_modules=["output.dense"], r=8, bias="all", modules_to_save=["decoder"]), ops=dict(files=True)),
        START + LOADED_WITH_BIAS),
    # a new modules_to_save wrapper on add_adapter: the original's trainable bias stays so, the copy is frozen
    "add-adapter-new-wrapper": (Scenario("codegen", "base", dict(target_modules=r".*\.(qkv_proj)", r=2, bias="all"),
                                         second=dict(target_modules=["h.0.attn.out_proj"], modules_to_save=["fc_in"]),
                                         ops=ALL_OPS),
                                START + TRAIN + SECOND + MERGE_DISABLE + LOADED + UNLOAD),
    # --examples 80 --seed 1, #63: PEFT's merge_and_unload sets tie_word_embeddings=False once lm_head is a trained
    # copy; in Switch Transformers the flag also switches off the decoder output's d_model**-0.5 rescale, so PEFT's
    # merged logits left its unmerged ones (82%). minilora keeps the flag (documented; tests/test_tied_config.py):
    # its merged outputs are compared with PEFT's unmerged ones
    "switch-transformers-tied-flag-kept": (Scenario(
        "switch_transformers", "lm", dict(target_modules=["v", "expert_0.wi", "wi"], r=1, lora_alpha=8,
                                          init_lora_weights=True, lora_dropout=0.1, bias="all",
                                          modules_to_save=["decoder", "lm_head"], task_type="SEQ_2_SEQ_LM"),
        ops=dict(train_step=True, merge=True, disable=True, merge_and_unload=True), seed=63),
        START + [("AdamW step", EQUAL)] + MERGE_DISABLE + UNLOAD[:2]
        + [("config.tie_word_embeddings", "stop: kept True, PEFT sets False (documented difference)"),
           ("forward after merge_and_unload vs PEFT unmerged", EQUAL)]),
    # --examples 60 --seed 2, #5 and --seed 5, #52 (found before 98e12f1): lm_head targeted, merge_adapter +
    # unmerge_adapter, then files. PEFT's file also holds lm_head.base_layer.weight, its live W0 + dW - dW (a
    # rounding away from W0); minilora's held A and B only, so PEFT loading minilora's files got the base's exact
    # W0 and logits 6e-8 off PEFT loading its own. minilora now writes that weight as PEFT does (98e12f1). In the
    # CLI's loop the rounding reached the logits; alone it may not: the steps are pinned here
    "lm-head-base-weight-after-merge-second-adapter": (Scenario(
        "opt", "lm", dict(target_modules=r".*\.(fc2)", exclude_modules=["v_proj"], r=2, lora_alpha=1,
                          init_lora_weights="gaussian", lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"),
        second=dict(target_modules=["q_proj", "lm_head", "1.fc2"], r=1, lora_alpha=3.5, init_lora_weights=False,
                    lora_dropout=0.0, task_type="SEQ_CLS"), ops=dict(merge=True, files=True), seed=5),
        START + SECOND[:5] + MERGE_DISABLE[:4] + LOADED),
    # the scenarios' last call (ops["extra"]), found by a probe before it was in the fuzzer: deleting the active
    # adapter where the first LoRA layer holds no other (PEFT's forward: KeyError; minilora ran, now refuses) ...
    "delete-active-adapter-none-left-active": (Scenario(
        "opt", "lm", dict(target_modules=r".*\.(fc2)", r=2, task_type="CAUSAL_LM"),
        second=dict(target_modules=["q_proj", "1.fc2"], r=1), ops=dict(extra="delete_adapter"), seed=5),
        START + SECOND[:5] + [("delete_adapter", RAN), ("after delete_adapter", EQUAL),
                              ("forward after delete_adapter", "both refused (MiniLoraError / KeyError)")]),
    # ... and get_layer_status of a saved module without parameters (minilora: requires_grad True, PEFT: none; this
    # replay fails on the code before that fix, 287ef09)
    "layer-status-parameterless-saved-module": (Scenario(
        "gemma3", "base", dict(target_modules="all-linear", r=8, modules_to_save=["rotary_emb"], inference_mode=True),
        second=dict(target_modules=["q_proj"], r=4), ops=dict(extra="get_layer_status"), seed=13),
        START + SECOND[:5] + [("get_layer_status", EQUAL), ("get_model_status", EQUAL)]),
    # --examples 80 --seed 61, #3: add_weighted_adapter of "default" and the adapter loaded from the files: PEFT's new
    # modules start in train mode (as add_adapter's), minilora's followed the model's eval mode
    "add-weighted-adapter-modes": (Scenario(
        "stablelm", "lm", dict(target_modules=["o_proj"], exclude_modules=["k_proj"], r=8, lora_alpha=8,
                               init_lora_weights="gaussian", lora_dropout=0.1, bias="none", task_type="CAUSAL_LM"),
        ops=dict(train_forward=True, disable=True, files=True, extra="add_weighted_adapter"), seed=3),
        START + [("forward train", EQUAL), ("disable_adapter", EQUAL), ("after disable_adapter", EQUAL)] + LOADED
        + [("add_weighted_adapter", RAN), ("after add_weighted_adapter", EQUAL), ("add_weighted_adapter values", EQUAL),
           ("forward (mix)", EQUAL)]),
    # --examples 80 --seed 62, #73: load_adapter (inference) of an adapter with a copy of BERT's decoder, whose bias
    # is cls.predictions.bias (bias="all" trains it): PEFT freezes every parameter outside the wrappers before it
    # copies the original, so its new copy's bias is frozen; minilora's took the shared bias's requires_grad
    "new-copy-of-a-shared-bias": (Scenario("bert", "lm", dict(target_modules=["output.dense"], r=2, bias="all"),
                                           second=dict(r=4, modules_to_save=["decoder"]), ops=dict(files=True),
                                           seed=73),
                                  START + SECOND[:5] + LOADED),
    # --examples 80 --seed 120, #46: a mixed batch on MPT under CAUSAL_LM: PEFT's PeftModelForCausalLM calls MPT without
    # its mixed-batch hooks (adapter_names silently ignored, every row runs the active adapter); minilora ran the mixed
    # batch. Now both refuse (MiniLoraError / PEFT's rows are not the ones asked for: compared as refused by minilora)
    "mixed-batch-mpt-causal-lm": (Scenario("mpt", "lm", dict(r=2, lora_alpha=1, bias="all", task_type="CAUSAL_LM"),
                                           ops=dict(extra="mixed batch"), seed=46), None),
    "lm-head-base-weight-after-merge": (Scenario(
        "stablelm", "lm", dict(target_modules=["o_proj", "lm_head", "self_attn.o_proj"], exclude_modules=["up_proj"],
                               layers_to_transform=0, r=4, lora_alpha=16, init_lora_weights=False, lora_dropout=0.1,
                               bias="none", task_type="SEQ_2_SEQ_LM"),
        ops=dict(train_forward=True, train_step=True, merge=True, disable=True, files=True), seed=52),
        START + [("forward train", EQUAL), ("AdamW step", EQUAL)] + MERGE_DISABLE + LOADED),
}


@pytest.mark.parametrize("name", [name for name, (_, steps) in REPLAYS.items() if steps is not None])
def test_replayed_findings_agree_with_peft(name):
    scenario, expected = REPLAYS[name]
    done = run_scenario(scenario)
    assert done.steps == expected
    assert done.numbers > 0


def test_a_save_that_both_refuse_fails_its_replay(monkeypatch):
    """Planted: both save_pretrained raise. The replay records the save as refused by both (not as a
    compared step, and nothing after it runs), so its expected steps no longer match."""
    def refuse(*args, **kwargs):
        raise MiniLoraError("planted: no save")

    def peft_refuses(*args, **kwargs):
        raise OSError("planted: no save")

    monkeypatch.setattr(compat.PeftModel, "save_pretrained", refuse)
    monkeypatch.setattr(peft.PeftModel, "save_pretrained", peft_refuses)
    scenario, expected = REPLAYS["peft-file-with-lm-head-base-bias"]
    done = run_scenario(scenario)
    assert done.steps == START + [("save_pretrained", "both refused (MiniLoraError / OSError)")] != expected


# Cases where PEFT fails (an exception, often after changing the model) and minilora ran: now refused.
REFUSED = {
    # PeftModelForCausalLM reads prepare_inputs_for_generation: a classifier has none (AttributeError)
    "causal-lm-task-on-classifier": ("llama", "seq_cls", dict(target_modules=["v_proj"], task_type="CAUSAL_LM")),
    # TOKEN_CLS / QUESTION_ANS add the head to modules_to_save after injecting: a targeted head (TypeError)
    "qa-head-targeted": ("qwen2", "qa", dict(target_modules=".*(v_proj|qa_outputs)", task_type="QUESTION_ANS")),
    "token-cls-all-linear": ("bert", "token_cls", dict(target_modules="all-linear", task_type="TOKEN_CLS")),
    # modules_to_save=["dropout"] also reaches each new LoRA layer's lora_dropout, a ModuleDict (TypeError)
    "modules-to-save-reaches-lora-dropout": ("mpt", "token_cls", dict(target_modules=["ffn.down_proj"],
                                                                      modules_to_save=["dropout"])),
    # modules_to_save=["model"] ends the wrapper's own name "base_model.model": PEFT wraps the whole model
    "modules-to-save-wrapper-name": ("mistral", "seq_cls", dict(target_modules=["q_proj"],
                                                                 modules_to_save=["model"], task_type="SEQ_CLS")),
}


# PEFT 0.21.2's exception for each (measured), so that another failure of PEFT's cannot pass for it
PEFT_ERRORS = {"causal-lm-task-on-classifier": "AttributeError", "qa-head-targeted": "TypeError",
               "token-cls-all-linear": "TypeError", "modules-to-save-reaches-lora-dropout": "TypeError",
               "modules-to-save-wrapper-name": "NoMatchingPeftModuleError"}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_peft_fails_on_is_refused_before_anything_changes(name, unchanged):
    arch, head, fields = REFUSED[name]
    base = build_base(ARCHITECTURES[arch], head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as peft_error:  # noqa: PT011 - PEFT's own exception types vary
            peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(fields)))
    assert type(peft_error.value).__name__ == PEFT_ERRORS[name], peft_error.value
    model = copy.deepcopy(base)
    check = unchanged(model)
    with pytest.raises(MiniLoraError):
        compat.get_peft_model(model, compat.LoraConfig(**copy.deepcopy(fields)))
    check()


def test_second_adapter_refusals_as_peft_fails(tmp_path):
    """A second adapter whose modules_to_save is a LoRA layer of the first, or whose targets lie inside
    the first's modules_to_save: PEFT raises (TypeError on wrapping; a KeyError on saving later)."""
    base = build_base(ARCHITECTURES["gemma"], "lm")
    first = dict(target_modules=r".*\.(q_proj)", modules_to_save=["k_proj"], task_type="CAUSAL_LM")
    inside = dict(target_modules="all-linear", exclude_modules=["k_proj"], task_type="CAUSAL_LM")
    on_lora = dict(target_modules=["v_proj"], modules_to_save=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**first))
        twin.add_adapter("other", peft.LoraConfig(**inside))
        with pytest.raises(KeyError):
            twin.save_pretrained(tmp_path / "peft")  # (it makes the folder, then raises)
        with pytest.raises(TypeError):
            peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**first)).add_adapter(
                "other", peft.LoraConfig(**on_lora))
        mini = compat.get_peft_model(copy.deepcopy(base), compat.LoraConfig(**first))
        with pytest.raises(MiniLoraError, match="inside a module that an adapter trains in full"):
            mini.add_adapter("other", compat.LoraConfig(**inside))
        with pytest.raises(MiniLoraError, match="holds an adapter already"):
            mini.add_adapter("other", compat.LoraConfig(**on_lora))
        # (PEFT runs this one, copying the first adapter's LoRA layers into the trained copy: out of scope)
        with pytest.raises(MiniLoraError, match="holds LoRA layers of another adapter"):
            mini.add_adapter("other", compat.LoraConfig(target_modules=["v_proj"], modules_to_save=["layers.0"]))
    assert list(mini.peft_config) == ["default"]


# --------------------------------------------------------------------------------------------
# The fixes, each compared with PEFT directly
# --------------------------------------------------------------------------------------------
def _both(arch, head, fields, seed=0):
    base = build_base(ARCHITECTURES[arch], head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(fields)))
        torch.manual_seed(seed)
        mini = compat.get_peft_model(copy.deepcopy(base), compat.LoraConfig(**copy.deepcopy(fields)))
    return base, mini, twin


def _add_to_both(mini, twin, name, **fields):
    """``add_adapter(name, LoraConfig(**fields))`` on minilora's model, then on PEFT's (warnings ignored)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mini.add_adapter(name, compat.LoraConfig(**copy.deepcopy(fields)))
        twin.add_adapter(name, peft.LoraConfig(**copy.deepcopy(fields)))


def test_long_target_lists_are_shortened_as_peft_and_layers_to_transform_then_applies():
    """20 names or more: PEFT keeps the fewest suffixes that select the same modules (config and file),
    and matches with them, so layers_to_transform (ignored for full names) then applies."""
    names = [name for name in differential.linear_names(build_base(ARCHITECTURES["mbart"], "lm")) if "layers." in name]
    assert len(names) >= 20  # mbart: 2 encoder + 2 decoder layers, 32 linear layers in them
    _, mini, twin = _both("mbart", "lm", dict(target_modules="all-linear"))
    assert mini.peft_config["default"].target_modules == twin.peft_config["default"].target_modules
    assert twin.peft_config["default"].target_modules == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    _, mini, twin = _both("mbart", "lm", dict(target_modules=names, layers_to_transform=[1]))
    adapted = set(differential.lora_summary(mini)["layers"])
    assert adapted == set(differential.lora_summary(twin)["layers"])
    assert adapted and all(".layers.1." in name for name in adapted)
    assert mini.peft_config["default"].target_modules == twin.peft_config["default"].target_modules


def test_config_fields_after_injection_are_pefts(tmp_path):
    """fan_in_fan_out (PEFT's default False, then the last new layer's layout), modules_to_save with the
    task head appended to the user's list (repeats kept), exclude_modules written as a list."""
    for arch, head, fields in [("gpt2", "seq_cls", dict(modules_to_save=["score"], task_type="SEQ_CLS",
                                                         exclude_modules=["c_proj"], target_modules="all-linear")),
                               ("llama", "lm", dict(fan_in_fan_out=True, target_modules=["q_proj"]))]:
        _, mini, twin = _both(arch, head, fields)
        for name in ("fan_in_fan_out", "modules_to_save", "exclude_modules"):
            assert getattr(mini.peft_config["default"], name) == getattr(twin.peft_config["default"], name), name
        mini.save_pretrained(tmp_path / arch / "mini")
        twin.save_pretrained(tmp_path / arch / "peft")
        written = [json.loads((tmp_path / arch / side / "adapter_config.json").read_text()) for side in ("mini", "peft")]
        for name in ("fan_in_fan_out", "modules_to_save", "target_modules", "exclude_modules"):
            ours, theirs = written[0].get(name), written[1].get(name)  # (minilora leaves out an unused exclude_modules)
            if isinstance(theirs, list):  # (PEFT writes a set's names in no particular order)
                ours, theirs = sorted(ours), sorted(theirs)
            assert ours == theirs, name


def _assert_same_modes(mini, twin) -> dict[str, bool]:
    """Every module minilora has is in PEFT's model, in the same train/eval mode, and every module of PEFT's that
    minilora lacks is one of its layer's containers for other methods (empty). Returns PEFT's modes."""
    modes = [{n: m.training for n, m in model.named_modules()} for model in (mini, twin)]
    assert set(modes[0]) <= set(modes[1]), sorted(set(modes[0]) - set(modes[1]))[:5]
    assert modes[0] == {n: modes[1][n] for n in modes[0]}
    assert {n.rsplit(".", 1)[-1] for n in set(modes[1]) - set(modes[0])} <= {
        "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
    return modes[1]


def test_requires_grad_and_modes_after_loading_and_adding_are_pefts(tmp_path):
    """from_pretrained(is_trainable=False) with bias="all" (PEFT: biases still require grad), and the
    train/eval mode of every module after add_adapter (new layers and wrappers start in train mode)."""
    base, mini, twin = _both("gpt2", "qa", dict(target_modules=["c_attn"], bias="all", task_type="QUESTION_ANS"))
    twin.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = [compat.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path),
                  peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)]
        grads = [{n: p.requires_grad for n, p in model.named_parameters()} for model in loaded]
        assert grads[0] == grads[1] and any(grads[1].values())
    _add_to_both(mini, twin, "other", target_modules=["c_fc"], modules_to_save=["ln_f"], task_type="QUESTION_ANS")
    _assert_same_modes(mini, twin)
    grads = [{n: p.requires_grad for n, p in model.named_parameters()} for model in (mini, twin)]
    assert grads[0] == grads[1]


def test_modes_after_loading_a_trainable_adapter_into_an_eval_model_are_pefts(tmp_path):
    """load_adapter(is_trainable=True) into a model in eval mode: PEFT's new modules start in train mode
    (dropout on); minilora's must be the same modules in the same modes."""
    base, mini, twin = _both("opt", "lm", dict(target_modules=["q_proj", "v_proj"]))
    twin.save_pretrained(tmp_path)
    saved = dict(target_modules=["fc1"], lora_dropout=0.5)
    other = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**saved))
    other.save_pretrained(tmp_path / "trainable")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (mini, twin):
            model.eval()
            model.load_adapter(tmp_path / "trainable", adapter_name="trainable", is_trainable=True)
    modes = _assert_same_modes(mini, twin)
    assert any(training for name, training in modes.items() if "lora_dropout.trainable" in name)


def test_modules_to_save_inside_another_adapters_copy_is_refused_before_any_change(unchanged):
    """A second adapter's modules_to_save names a module inside the first adapter's wrapper: PEFT trains a
    copy of the whole wrapper for it; minilora refuses before any change."""
    _, mini, twin = _both("opt", "lm", dict(target_modules=["q_proj"], modules_to_save=["layers.1"]))
    second = dict(target_modules=["layers.0.self_attn.k_proj"], modules_to_save=["fc2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin.add_adapter("other", peft.LoraConfig(**second))
    assert any(name.endswith("layers.1.modules_to_save.other") for name, _ in twin.named_modules())
    check = unchanged(mini)
    with pytest.raises(compat.MiniLoraError, match="inside .*layers.1"):
        mini.add_adapter("other", compat.LoraConfig(**second))
    assert "other" not in mini.peft_config
    check()


def test_files_after_merge_and_unmerge_hold_the_same_lm_head_w0_as_pefts(tmp_path):
    """The cause of the two replays above, directly: after merge_adapter + unmerge_adapter PEFT's file holds
    lm_head.base_layer.weight = W0 + dW - dW (not W0, a rounding); minilora's file holds the same tensor, bitwise,
    so each library loading the other's files gives the other's outputs."""
    from safetensors.torch import load_file

    base, mini, twin = _both("stablelm", "lm", dict(target_modules=["lm_head"], r=4, lora_alpha=16))
    differential.same_values(mini, twin, 52)
    key = "base_model.model.lm_head.base_layer.weight"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, side in ((mini, "mini"), (twin, "peft")):
            model.merge_adapter()
            model.unmerge_adapter()
            model.save_pretrained(tmp_path / side)
    saved = {side: load_file(tmp_path / side / "adapter_model.safetensors")[key] for side in ("mini", "peft")}
    assert not torch.equal(saved["peft"], base.lm_head.weight)  # the rounding is there
    assert torch.equal(saved["mini"], saved["peft"])


def test_a_cross_loading_finding_names_the_loaded_weights_that_differ(monkeypatch):
    """Planted: PEFT loading minilora's files gets one weight perturbed. The finding says which."""
    real = peft.PeftModel.from_pretrained.__func__

    def perturbed(cls, model, model_id, *args, **kwargs):
        loaded = real(cls, model, model_id, *args, **kwargs)
        if str(model_id).endswith("mini"):
            with torch.no_grad():
                loaded.base_model.model.lm_head.base_layer.weight.add_(1e-3)
        return loaded

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", classmethod(perturbed))
    scenario, _ = REPLAYS["peft-file-with-lm-head-base-bias"]
    with pytest.raises(differential.Finding, match=r"peft loads minilora's files: .* loaded weights differing from "
                                                    r"PEFT's: \['base_model\.model\.lm_head\.base_layer\.weight'\]"):
        run_scenario(scenario)


def test_lora_inside_a_task_head_wrapped_after_injection_is_refused_before_anything_changes(unchanged):
    """--examples 80 --seed 12, #73: RoBERTa's classifier is built of layers (dense, out_proj); "all-linear" with
    task_type TOKEN_CLS puts LoRA on them, then PEFT wraps the head (modules_to_save, added after injecting) with the
    LoRA layers inside its original and its trained copy. minilora built the wrapper without them (the LoRA layers
    PEFT trains were silently missing): now a MiniLoraError before any change. Naming the head in modules_to_save
    leaves its layers out of the targets in both libraries, and then every step agrees."""
    fields = dict(target_modules="all-linear", r=8, lora_alpha=3.5, lora_dropout=0.1, bias="all", task_type="TOKEN_CLS")
    base = build_base(ARCHITECTURES["roberta"], "seq_cls")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))
    assert "classifier.modules_to_save.default.dense" in str(differential.lora_summary(twin)["layers"])
    model = copy.deepcopy(base)
    check = unchanged(model)
    with pytest.raises(MiniLoraError, match=r"selects 'classifier.dense', inside the task head 'classifier'.*"
                                            r"put the head in modules_to_save yourself"):
        compat.get_peft_model(model, compat.LoraConfig(**fields))
    check()
    with pytest.raises(Refusal):
        run_scenario(Scenario("roberta", "seq_cls", fields, seed=73))
    done = run_scenario(Scenario("roberta", "seq_cls", dict(fields, modules_to_save=["classifier"]),
                                 ops=dict(backward=True, merge_and_unload=True), seed=73))
    assert done.steps == START + [("backward", EQUAL)] + UNLOAD


# A first adapter with bias != "none" and a second beside it: PEFT's file of the first also holds the biases of
# the second's layers (<layer>.base_layer.bias of its LoRA layers; with bias="all" also <module>.original_module.bias
# of its modules_to_save). minilora refused to load those files, PEFT's and its own (found by a probe of the
# fuzzer's scenarios that loads the first adapter's folder: --seed 1 #29, --seed 3 #61), and with bias="all" did not
# write the original_module biases.
BESIDE = {
    "lora-only-beside-all-linear": ("qwen2", "seq_cls", dict(target_modules=["mlp.gate_proj", "down_proj"], r=1,
                                                              bias="lora_only", init_lora_weights=False),
                                    dict(target_modules="all-linear", r=2, task_type="SEQ_CLS")),
    "bias-all-beside-saved-module": ("gpt_neo", "base", dict(target_modules=["c_proj"], layers_to_transform=[1],
                                                             layers_pattern="h", r=2, bias="all",
                                                             init_lora_weights=False),
                                     dict(target_modules=r".*\.(out_proj)", r=2, modules_to_save=["c_fc"])),
}


def _with_second(arch, head, first, second, tmp_path):
    """Both libraries: the first adapter, the second beside it, both saved; (base, inputs, saved outputs)."""
    base, mini, twin = _both(arch, head, first)
    inputs = differential.model_inputs(ARCHITECTURES[arch], head)
    outputs = {}
    _add_to_both(mini, twin, "other", **second)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for side, model in (("mini", mini), ("peft", twin)):
            with torch.no_grad():
                outputs[side] = differential.forward(model.eval(), inputs)
            model.save_pretrained(tmp_path / side)
    return base, inputs, outputs


@pytest.mark.parametrize("name", list(BESIDE))
def test_a_bias_adapter_saved_beside_another_loads_as_peft(name, tmp_path):
    """Both files hold the same tensors, bitwise; each library loads each file into a fresh base model and
    gets the saved model's outputs, bitwise (the other layers' biases in the file equal the base's)."""
    from safetensors.torch import load_file

    arch, head, first, second = BESIDE[name]
    base, inputs, outputs = _with_second(arch, head, first, second, tmp_path)
    differential.compare_tensors(name, outputs["mini"], outputs["peft"])
    files = {side: load_file(tmp_path / side / "adapter_model.safetensors") for side in ("mini", "peft")}
    assert files["mini"].keys() == files["peft"].keys()
    assert any(".base_layer.bias" in key and ".mlp." not in key for key in files["peft"])  # the second's layers
    assert all(torch.equal(value, files["peft"][key]) for key, value in files["mini"].items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for side in ("mini", "peft"):
            for library in (compat, peft):
                loaded = library.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / side).eval()
                with torch.no_grad():
                    differential.compare_tensors(f"{library.__name__} loads {side}", differential.forward(
                        loaded, inputs), outputs["peft"])


def test_a_trained_bias_of_another_adapters_layer_is_loaded_where_peft_drops_it(tmp_path):
    """bias="all" trains every bias, those of the second adapter's LoRA layers too; the first's file holds them as
    <layer>.base_layer.bias. PEFT loading that file into a fresh base ignores those keys: its outputs are not the
    saved model's. Loaded after the second adapter (which wraps those layers) PEFT gives the saved outputs; minilora
    gives them loading the file alone (README, "Where minilora differs from PEFT on purpose"), bitwise."""
    arch, head = "qwen2", "seq_cls"
    first = dict(target_modules=["mlp.gate_proj", "down_proj"], r=1, bias="all", init_lora_weights=False)
    base = build_base(ARCHITECTURES[arch], head)
    inputs = differential.model_inputs(ARCHITECTURES[arch], head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**first))
        twin.add_adapter("other", peft.LoraConfig(target_modules=["k_proj"], r=2))
        with torch.no_grad():
            for key, param in twin.named_parameters():
                if key.endswith(".bias") and param.requires_grad:
                    param.add_(0.3)  # trained biases, the second adapter's k_proj among them
            saved = differential.forward(twin.eval(), inputs)
        twin.save_pretrained(tmp_path)
        dropped = differential.forward(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval(), inputs)
        assert not torch.equal(dropped[0][1], saved[0][1])  # PEFT's answer: the trained k_proj biases are gone
        both = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "other", adapter_name="other")
        both.load_adapter(tmp_path, "default")
        both.set_adapter("default")
        ours = compat.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        with torch.no_grad():
            differential.compare_tensors("PEFT, after the other adapter", differential.forward(both.eval(), inputs),
                                         saved)
            differential.compare_tensors("minilora, alone", differential.forward(ours.eval(), inputs), saved)


# add_weighted_adapter where PEFT fails after adding the new adapter (found by a probe of the fuzzer's scenarios
# with add_weighted_adapter, --seed 4 #31 and #45): minilora raised an IndexError, or ran; now a MiniLoraError
# before any change. (first adapter, second adapter, combination_type, PEFT 0.21.2's exception)
NO_MATCHING = (r"add_weighted_adapter: the new adapter's targets \(target_modules=.*layers_to_transform=None\) "
               r"select \[.*\], where none of \['default', 'other'\] has a LoRA layer: no matching LoRAs")
WEIGHTED_REFUSED = {
    # the union of the targets, with the first adapter's (absent) layers_to_transform, selects layers that the
    # second adapter (layers_to_transform=1) left out: "No matching LoRAs found" (svd), IndexError (linear)
    "no-matching-loras-svd": ("longt5", "lm", dict(target_modules=["DenseReluDense.wo"], r=4),
                              dict(target_modules=["k"], layers_to_transform=1, layers_pattern="layer", r=1), "svd",
                              "ValueError", NO_MATCHING),
    "no-matching-loras-linear": ("longt5", "lm", dict(target_modules=["DenseReluDense.wo"], r=4),
                                 dict(target_modules=["k"], layers_to_transform=1, layers_pattern="layer", r=4),
                                 "linear", "IndexError", NO_MATCHING),
    # both adapters train a copy of the same module (the task head)
    "shared-modules-to-save": ("falcon", "seq_cls", dict(exclude_modules=["dense"], r=4, task_type="TOKEN_CLS"),
                               dict(r=4, task_type="SEQ_CLS"), "linear", "ValueError",
                               r"target the same module with modules_to_save, but found 1 such instance\(s\)\. .*"
                               r"\[.*score\] hold a trained copy"),
}


@pytest.mark.parametrize("name", list(WEIGHTED_REFUSED))
def test_add_weighted_adapter_where_peft_fails_is_refused_before_anything_changes(name, unchanged):
    arch, head, first, second, combination, peft_error, words = WEIGHTED_REFUSED[name]
    base, mini, twin = _both(arch, head, first)
    _add_to_both(mini, twin, "other", **second)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as raised:  # noqa: PT011 - PEFT's own exception types vary
            twin.add_weighted_adapter(["default", "other"], [1.0, 0.5], "mix", combination_type=combination)
        assert type(raised.value).__name__ == peft_error, raised.value
        check = unchanged(mini)
        with pytest.raises(MiniLoraError, match=words):
            mini.add_weighted_adapter(["default", "other"], [1.0, 0.5], "mix", combination_type=combination)
        check()
    assert list(mini.peft_config) == ["default", "other"]


def test_disable_adapter_layers_freezes_every_adapters_copies_as_peft():
    """--seed 4 #71 of the probe with disable/enable_adapter_layers: a task head wrapped for two adapters; PEFT's
    disable_adapter_layers freezes every modules_to_save copy (the inactive adapter's too, whose bias bias="all"
    made trainable), minilora only the active one's. requires_grad of every parameter, off and on again, as PEFT."""
    base, mini, twin = _both("falcon", "token_cls", dict(target_modules="all-linear", r=2, bias="all",
                                                         modules_to_save=["input_layernorm"], task_type="SEQ_CLS"))
    grads = []
    _add_to_both(mini, twin, "other", target_modules=["dense"], r=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (mini, twin):
            model.base_model.disable_adapter_layers()
            off = {name: p.requires_grad for name, p in model.named_parameters()}
            model.base_model.enable_adapter_layers()
            grads.append((off, {name: p.requires_grad for name, p in model.named_parameters()}))
    assert grads[1][0]["base_model.model.classifier.modules_to_save.other.bias"] is False  # PEFT's, the case found
    assert grads[0] == grads[1]


@pytest.mark.parametrize("victim", ["default", "other"])
def test_deleting_the_active_adapter_leaves_modules_to_save_as_peft(victim):
    """--seed 1 #70 of the probe with delete_adapter: the first adapter trains copies of down_proj and the head,
    the second of the head only; the second is active, then one is deleted. PEFT's ModulesToSaveWrapper only
    changes a wrapper that holds a copy of the deleted adapter: down_proj keeps running its original (frozen)
    after the second is deleted, though the first becomes the active adapter. minilora switched it to the first's
    copy. Now every requires_grad, each wrapper's active copy and the outputs (bitwise) are PEFT's."""
    fields = dict(r=2, modules_to_save=["down_proj", "score"], task_type="SEQ_CLS")
    base, mini, twin = _both("llama", "seq_cls", fields)
    inputs = differential.model_inputs(ARCHITECTURES["llama"], "seq_cls")
    _add_to_both(mini, twin, "other", target_modules=["k_proj"], modules_to_save=["score"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        differential.same_values(mini, twin, 70)  # trained copies: the original and the copies differ
        for model in (mini, twin):
            model.set_adapter("other")
            model.delete_adapter(victim)
    assert mini.active_adapters == twin.active_adapters
    wrappers = [{name: list(module.active_adapters) for name, module in model.named_modules()
                 if hasattr(module, "original_module")} for model in (mini, twin)]
    assert wrappers[0] == wrappers[1]
    assert wrappers[1]["base_model.model.model.layers.0.mlp.down_proj"] == []  # PEFT's: no copy runs there
    differential.compare_structure("after delete_adapter", mini, twin)  # names, requires_grad, modes
    differential.compare_forward("forward after delete_adapter", mini, twin, inputs)


@pytest.mark.parametrize("arch, head, task", [("llama", "lm", "CAUSAL_LM"), ("bert", "seq_cls", "SEQ_CLS"),
                                              ("whisper", "base", "FEATURE_EXTRACTION"), ("gpt2", "base", None)])
def test_from_pretrained_builds_the_task_wrapper_of_the_files_task_type(arch, head, task, tmp_path):
    """PeftModel.from_pretrained wraps the model in the class of the saved task_type (PEFT's
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING): compat read the task from minilora's own config, which has none, and always
    built a plain PeftModel (found by a probe of the fuzzer's scenarios: whisper, seed 6 #40). The fuzzer now
    compares the loaded class too."""
    fields = dict(r=2, target_modules=["q_proj"] if arch == "whisper" else None, task_type=task)
    base, mini, twin = _both(arch, head, fields)
    twin.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = [library.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path) for library in (compat, peft)]
    assert type(loaded[0]).__name__ == type(loaded[1]).__name__ == type(twin).__name__ == type(mini).__name__


def _active_adapter_deleted():
    """(minilora twin, PEFT twin, inputs) of an OPT with adapters "default" (on fc2) and "other" (on q_proj, the
    first layer PEFT looks at, and 1.fc2), after set_adapter("other") and delete_adapter("other"): no adapter
    is left active."""
    _, mini, twin = _both("opt", "lm", dict(target_modules=r".*\.(fc2)", r=2, task_type="CAUSAL_LM"))
    _add_to_both(mini, twin, "other", target_modules=["q_proj", "1.fc2"], r=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (mini, twin):
            model.set_adapter("other")
            model.delete_adapter("other")
            assert model.active_adapters == []
    return mini, twin, differential.model_inputs(ARCHITECTURES["opt"], "lm")


def test_forward_after_deleting_the_active_adapter_that_leaves_none_active_refuses_as_peft_fails():
    """The second adapter (active) is on q_proj, the first layer PEFT looks at; deleting it leaves that layer, and
    so the model, with no active adapter, and PEFT's PeftModel keeps the deleted name: its forward raises a
    KeyError. minilora ran (found by a probe of the fuzzer's scenarios with delete_adapter, seed 2 #5 and 9 others);
    now a MiniLoraError that says to set_adapter, after which both give the same outputs, bitwise."""
    mini, twin, inputs = _active_adapter_deleted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyError):
            twin(**inputs)
        with pytest.raises(MiniLoraError, match=r"delete_adapter\('other'\) deleted the active adapter.*Call "
                                                r"set_adapter with one of \['default'\]"):
            mini(**inputs)
        for model in (mini, twin):
            model.set_adapter("default")
    differential.same_values(mini, twin, 5)
    differential.compare_forward("forward after set_adapter", mini, twin, inputs)


def test_a_second_delete_while_none_is_active_keeps_the_first_deleted_name_as_peft():
    """After the delete above, deleting the last adapter too: PEFT's PeftModel keeps the first deleted name as
    its active adapter (its KeyError names it); minilora's refusal names the same one, and why none is left."""
    mini, twin, inputs = _active_adapter_deleted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (mini, twin):
            model.delete_adapter("default")
        with pytest.raises(KeyError, match="other"):
            twin(**inputs)
        with pytest.raises(MiniLoraError, match=r"delete_adapter\('other'\) .*\(it was the last adapter\).*"
                                                r"KeyError: 'other'"):
            mini(**inputs)


def test_a_second_adapters_modules_to_save_holding_the_firsts_is_refused_before_anything_changes(unchanged):
    """The first adapter trains Switch Transformers' router classifiers in full, the second names the encoder,
    which holds two of them: PEFT nests the wrappers (and its copies' train/eval modes then differ from the
    copies minilora made: found by a probe of the fuzzer's scenarios, seed 36 #55). As with LoRA layers inside,
    minilora refuses, before any change."""
    _, mini, twin = _both("switch_transformers", "lm", dict(target_modules=["EncDecAttention.v"], r=8,
                                                            modules_to_save=["classifier"], task_type="SEQ_2_SEQ_LM"))
    second = dict(target_modules=["wi"], r=1, modules_to_save=["encoder"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin.add_adapter("other", peft.LoraConfig(**second))  # PEFT runs it, the wrappers nested
    nested = "encoder.modules_to_save.other.block.1.layer.1.mlp.router.classifier.modules_to_save"
    assert any(name.endswith(nested) for name, _ in twin.named_modules())
    check = unchanged(mini)
    with pytest.raises(MiniLoraError, match=r"selects 'encoder', which holds 'encoder.block.1.layer.1.mlp.router."
                                            r"classifier', a module another adapter trains in full"):
        mini.add_adapter("other", compat.LoraConfig(**second))
    check()


def _three_copies(library, model, second=("ln_f",)):
    """Adapters "b" (modules_to_save ``second``), "c" (ln_f) and "n" (none) added to ``model``."""
    model.add_adapter("b", library.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=list(second)))
    model.add_adapter("c", library.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"]))
    model.add_adapter("n", library.LoraConfig(r=2, target_modules=["c_attn"]))


@pytest.mark.parametrize("calls", [[("set_adapter", "b")], [("set_adapter", "default")],
                                   [("set_adapter", "c"), ("delete_adapter", "c")],
                                   [("set_adapter", "b"), ("disable_adapter_layers",), ("enable_adapter_layers",)],
                                   [("set_adapter", "n"), ("set_adapter", "b"), ("delete_adapter", "default")]])
def test_modules_to_save_copies_of_other_adapters_keep_their_requires_grad_as_peft(calls):
    """Review finding: PEFT's ModulesToSaveWrapper.set_adapter (and delete_adapter through it) freezes only the copy
    that was active, so with bias="all" on "default" the bias of "c"'s copy of ln_f, switched on with every bias
    when "c" was added, still trains after set_adapter("b"). minilora froze every copy, so the trainable parameters
    (and training) differed. requires_grad of every parameter and each wrapper's active copy, after every call."""
    _, mini, twin = _both("gpt2", "lm", dict(r=2, target_modules=["c_attn"], bias="all", modules_to_save=["ln_f"]))
    states = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, library in ((mini, compat), (twin, peft)):
            _three_copies(library, model, second=("ln_f", "wpe"))
            steps = []
            for name, *args in calls:
                getattr(model.base_model if name.endswith("_layers") else model, name)(*args)
                steps.append(({name: p.requires_grad for name, p in model.named_parameters()},
                              {name: list(module.active_adapters) for name, module in model.named_modules()
                               if hasattr(module, "original_module")}))
            states.append(steps)
    if calls == [("set_adapter", "b")]:
        assert states[1][0][0]["base_model.model.transformer.ln_f.modules_to_save.c.bias"] is True  # the case found
    assert states[0] == states[1]


def test_delete_adapter_where_pefts_modules_to_save_wrapper_fails_is_refused_before_anything_changes(unchanged):
    """PEFT's ModulesToSaveWrapper.delete_adapter raises a ValueError when the deleted adapter has a copy there and
    several adapters stay active (its LoRA layers are changed by then), and an IndexError when it must switch to a
    copy while it runs none. minilora kept the first of the active adapters and switched; now a MiniLoraError,
    raised before any change."""
    def build(library):
        _, mini, twin = _both("gpt2", "lm", dict(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"]))
        model = mini if library is compat else twin
        _three_copies(library, model, second=())
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for library in (peft, compat):
            model = build(library)
            model.base_model.set_adapter(["default", "n"])
            check = unchanged(model)
            with pytest.raises(MiniLoraError if library is compat else ValueError,
                               match=r"Attempted to set multiple \(\['default', 'n'\]\) adapters at once"):
                model.delete_adapter("c")
            if library is compat:
                check()
            model = build(library)
            model.set_adapter("b")  # ln_f runs no copy ("b" has none); deleting "b" makes "c" active
            model.delete_adapter("b")
            assert model.active_adapters == ["c"]
            check = unchanged(model)
            with pytest.raises(MiniLoraError if library is compat else IndexError,
                               match=r"set_adapter\('c'\) first" if library is compat else "out of range"):
                model.delete_adapter("default")
            if library is compat:
                check()


def _saved(head, task, tmp_path):
    """(base, directory of a PEFT adapter on llama ``head`` saved with ``task``)."""
    base, _, twin = _both("llama", head, dict(r=2, target_modules=["q_proj"], task_type=task))
    twin.save_pretrained(tmp_path / f"{head}-{task}")
    return base, tmp_path / f"{head}-{task}"


@pytest.mark.parametrize("head, task, cls, given", [
    ("lm", "CAUSAL_LM", "PeftModelForSequenceClassification", None),
    ("lm", "CAUSAL_LM", "PeftModelForFeatureExtraction", None),
    ("seq_cls", "SEQ_CLS", "PeftModelForCausalLM", None),
    ("seq_cls", "SEQ_CLS", "PeftModelForFeatureExtraction", None),
    ("lm", "CAUSAL_LM", "PeftModel", "FEATURE_EXTRACTION"),
    ("lm", "CAUSAL_LM", "PeftModelForSequenceClassification", "FEATURE_EXTRACTION"),
    ("lm", None, "PeftModel", "CAUSAL_LM"),
    ("seq_cls", None, "PeftModel", "FEATURE_EXTRACTION"),
    ("seq_cls", None, "PeftModelForFeatureExtraction", None)])
def test_from_pretrained_builds_the_class_of_the_task_type_it_loads_with_as_peft(head, task, cls, given, tmp_path):
    """Review finding B: PEFT's from_pretrained picks the class of the task_type of the config it loads with, the
    caller's config= if given (else the file's), whatever class it is called on (cls only where that task has no
    class). minilora used the file's task_type, and only on PeftModel. The class and the outputs (bitwise)."""
    base, directory = _saved(head, task, tmp_path)
    inputs = differential.model_inputs(ARCHITECTURES["llama"], head)
    loaded = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for library in (compat, peft):
            extra = {} if given is None else {"config": library.LoraConfig(r=2, target_modules=["q_proj"],
                                                                           task_type=given)}
            loaded.append(getattr(library, cls).from_pretrained(copy.deepcopy(base), directory, **extra))
    assert type(loaded[0]).__name__ == type(loaded[1]).__name__
    if cls != "PeftModel" and (task or given):
        assert type(loaded[1]).__name__ != cls  # the case found: the class called on is not the one PEFT builds
    differential.compare_forward("forward after from_pretrained", loaded[0], loaded[1], inputs)


@pytest.mark.parametrize("cls, given", [("PeftModelForSequenceClassification", None), ("PeftModel", "SEQ_CLS")])
def test_from_pretrained_as_a_task_with_a_head_the_files_do_not_hold_is_refused_before_anything_changes(
        cls, given, tmp_path, unchanged):
    """A classifier's adapter saved without task_type (so without its head): loaded as SEQ_CLS (the class, or a
    config= with that task_type), PEFT adds the head to modules_to_save and fails with a KeyError on the missing
    weights. minilora built the class; now a MiniLoraError, before any change."""
    base, directory = _saved("seq_cls", None, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for library, error in ((peft, KeyError), (compat, MiniLoraError)):
            extra = {} if given is None else {"config": library.LoraConfig(r=2, target_modules=["q_proj"],
                                                                           task_type=given)}
            model = copy.deepcopy(base)
            check = unchanged(model)
            with pytest.raises(error, match="score"):
                getattr(library, cls).from_pretrained(model, directory, **extra)
            if library is compat:
                check()


def test_another_layers_bias_in_a_bias_none_file_is_still_refused(tmp_path, unchanged):
    """Only bias="lora_only" / "all" files hold other layers' biases (PEFT's save); in a bias="none" file such a key
    was not written by PEFT and stays an unexpected key, refused before any change."""
    from safetensors.torch import load_file, save_file

    base, _, twin = _both("qwen2", "seq_cls", dict(target_modules=["down_proj"], r=1))
    twin.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.k_proj.base_layer.bias"] = \
        base.model.layers[0].self_attn.k_proj.bias.detach().clone()
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = copy.deepcopy(base)
    check = unchanged(model)
    with pytest.raises(MiniLoraError, match=r"unexpected keys \[model.layers.0.self_attn.k_proj.base_layer.bias\]"):
        compat.PeftModel.from_pretrained(model, tmp_path)
    check()


def test_a_mixed_batch_on_mpt_under_causal_lm_is_refused_where_peft_ignores_it():
    """--examples 80 --seed 120, #46: PEFT's PeftModelForCausalLM passes adapter_names to MPT's own forward, which
    ignores it: the "__base__" row gets the adapter's outputs. minilora refuses (a Refusal in the fuzzer)."""
    scenario, _ = REPLAYS["mixed-batch-mpt-causal-lm"]
    _, mini, twin = _both("mpt", "lm", scenario.config)
    differential.same_values(mini, twin, 46)  # B != 0: the adapter changes the outputs
    inputs = differential.model_inputs(ARCHITECTURES["mpt"], "lm")
    with torch.no_grad():
        mixed = twin.eval()(**inputs, adapter_names=["default", "__base__"]).logits
        assert torch.equal(mixed, twin(**inputs).logits)  # PEFT: every row ran the adapter
        with twin.disable_adapter():
            assert not torch.equal(mixed[1], twin(**inputs).logits[1])  # not the base model's row
        with pytest.raises(MiniLoraError, match="adapter_names is silently ignored"):
            mini.eval()(**inputs, adapter_names=["default", "__base__"])
    with pytest.raises(Refusal, match="mixed batch"):
        run_scenario(scenario)


@pytest.mark.parametrize("extra, merge_and_unload, why", [
    ("delete_adapter", False, "the scenario has one adapter"),
    ("add_weighted_adapter", False, "the scenario has one adapter"),
    ("get_layer_status", True, "merge_and_unload was drawn too"),
])
def test_a_drawn_last_call_that_does_not_apply_is_recorded_as_skipped(extra, merge_and_unload, why):
    """The fuzzer's last call is drawn for every scenario; where it cannot run (a two-adapter call with one
    adapter, or merge_and_unload ending the scenario) the trace says so instead of leaving it out."""
    scenario = Scenario("gpt2", "lm", dict(target_modules=["c_attn"], r=2), None,
                        {"extra": extra, "merge_and_unload": merge_and_unload}, seed=0)
    steps = differential.run_scenario(scenario).steps
    skipped = [outcome for step, outcome in steps if step == extra]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped: {why}"), steps


@pytest.mark.parametrize("ours, theirs", [([math.nan, 1.0], [0.0, 1.0]), ([math.inf], [torch.finfo(torch.float32).max]),
                                          ([-math.inf], [torch.finfo(torch.float32).min])],
                         ids=["NaN-vs-0", "inf-vs-max", "-inf-vs-min"])
def test_a_nan_or_inf_against_a_number_is_a_finding(ours, theirs):
    """Outputs and gradients compare NaN as equal only to NaN (half-precision passes overflow alike on both
    sides): a NaN against 0, or inf against the largest float, is a difference (nan_to_num hid both)."""
    with pytest.raises(differential.Finding, match="differs from PEFT's"):
        differential.compare_tensors("forward", [("logits", torch.tensor(ours))], [("logits", torch.tensor(theirs))])
    assert not differential._same(torch.tensor(ours), torch.tensor(theirs))
    assert differential._same(torch.tensor(ours), torch.tensor(ours))
    with pytest.raises(differential.Finding, match="differs from PEFT's"):  # (and within a relative tolerance)
        differential.compare_tensors("merged", [("logits", torch.tensor(ours))], [("logits", torch.tensor(theirs))],
                                     rtol=1e-2)
    differential.compare_tensors("merged", [("logits", torch.tensor(ours))], [("logits", torch.tensor(ours))],
                                 rtol=1e-2)


def test_within_a_relative_tolerance_an_inf_both_have_does_not_widen_it():
    """The tolerance is relative to PEFT's largest finite value: an inf both sides hold (equal there) does not
    make every other difference pass."""
    inf = math.inf
    differential.compare_tensors("merged", [("x", torch.tensor([inf, 1.0]))], [("x", torch.tensor([inf, 1.001]))],
                                 rtol=1e-2)
    with pytest.raises(differential.Finding, match="differs from PEFT's"):
        differential.compare_tensors("merged", [("x", torch.tensor([inf, 1.0]))], [("x", torch.tensor([inf, 2.0]))],
                                     rtol=1e-2)
