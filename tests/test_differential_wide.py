"""The differential fuzzer's wider draws (parity/differential_wide.py): more of PEFT's config fields and
calls, drawn without changing the scenarios a seed drew before; one scenario that runs each new call,
with the exact steps it must take (each compared with PEFT); and what they found, each fixed and
compared with PEFT directly (each test fails on the code before its fix).
"""

from __future__ import annotations

import copy
import json
import random
import warnings

import peft
import pytest
import safetensors.torch
import torch

from minilora import MiniLoraError, compat
from parity import differential
from parity.architectures import ARCHITECTURES
from parity.differential import Draw, Scenario, build_base, draw_scenario, run_scenario
from test_differential import _assert_same_modes, _both  # (the same models by both libraries; their modes)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wide_draws_leave_a_seeds_scenarios_unchanged():
    """The CLI draws each scenario from the seed's stream and its wide part from a stream of its own, so
    ``--seed N`` replays the scenarios N gave before the wide draws existed (and ``--narrow`` them alone)."""
    for seed in (31, 120):
        narrow_rng, wide_rng = random.Random(seed), random.Random(seed)
        for index in range(6):
            narrow = draw_scenario(Draw(narrow_rng), seed=index)
            wide = draw_scenario(Draw(wide_rng), seed=index, wide=Draw(random.Random(f"{seed}/{index}")))
            assert narrow.wide == {}
            assert (narrow.arch, narrow.head, narrow.config, narrow.second, narrow.ops) == (
                wide.arch, wide.head, wide.config, wide.second, wide.ops)


EQUAL, RAN = "equal", "ran"

# Every wide call in one scenario (OPT has biases, so lora_bias can merge): the steps it must take, in order
WIDE = Scenario(
    "opt", "lm", dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, lora_bias=True, use_rslora=True,
                      rank_pattern={r"\d+\.self_attn.v_proj": 3}),
    second=dict(target_modules=["v_proj", "fc1"], r=4, lora_dropout=0.1),
    ops=dict(train_forward=True, backward=True, merge=True, disable=True, files=True), seed=3,
    wide=dict(merge_names=["default", "other"], multi_active=True, merge_enable=True, train_step=True,
              load=dict(cross=True, is_trainable=True, name="loaded", from_name="x"),
              ending=("merge_and_unload", ["default", "other"]), dtype_start=("bfloat16", True)))
HALF = "get_peft_model(bfloat16 base, autocast_adapter_dtype=True)"
WIDE_STEPS = [
    ("LoraConfig", RAN), ("get_peft_model", EQUAL), ("init", EQUAL), ("counts and config", EQUAL),
    ("forward eval", EQUAL), ("forward train", EQUAL), ("backward", EQUAL),
    (HALF, EQUAL), (f"{HALF} dtypes", EQUAL), (f"{HALF} values", EQUAL), ("forward (bfloat16 base)", EQUAL),
    ("backward (bfloat16 base)", EQUAL), ("add_adapter (bfloat16 base)", RAN), ("after add_adapter (bfloat16 base)", EQUAL),
    ("after add_adapter (bfloat16 base) dtypes", EQUAL), ("add_adapter (bfloat16 base) values", EQUAL),
    ("forward (other, bfloat16 base)", EQUAL), ("merge_adapter (bfloat16 base)", RAN),
    ("forward merged (bfloat16 base)", EQUAL), ("unmerge_adapter (bfloat16 base)", RAN),
    ("forward unmerged (bfloat16 base)", EQUAL), ("save_pretrained (bfloat16 base)", EQUAL),
    ("from_pretrained (bfloat16 base)", EQUAL), ("from_pretrained (bfloat16 base) dtypes", EQUAL),
    ("forward loaded (bfloat16 base)", EQUAL),
    ("LoraConfig (second)", RAN), ("add_adapter", EQUAL), ("add_adapter init", EQUAL), ("set_adapter", EQUAL),
    ("forward (other)", EQUAL), ("backward (other)", EQUAL),
    ("merge_adapter(adapter_names=['default', 'other'])", RAN), ("after merge_adapter(adapter_names)", EQUAL),
    ("forward merged (adapter_names)", EQUAL), ("unmerge_adapter (adapter_names)", RAN),
    ("forward unmerged (adapter_names)", EQUAL),
    ("base_model.set_adapter([...])", RAN), ("after base_model.set_adapter([...])", EQUAL),
    ("forward (both active)", EQUAL), ("backward (both active)", EQUAL), ("AdamW step (both active)", EQUAL),
    ("merge_adapter (then disable)", RAN), ("disable_adapter_layers (merged)", RAN),
    ("after disable_adapter_layers (merged)", EQUAL), ("forward after disable_adapter_layers (merged)", EQUAL),
    ("enable_adapter_layers (after merge)", RAN), ("after enable_adapter_layers (after merge)", EQUAL),
    ("forward after enable_adapter_layers (after merge)", EQUAL), ("unmerge_adapter (after enable)", RAN),
    ("forward after unmerge (after enable)", EQUAL),
    ("AdamW step (before saving)", EQUAL), ("forward after the AdamW step", EQUAL),
    ("merge_adapter", RAN), ("forward merged", EQUAL), ("unmerge_adapter", RAN), ("forward unmerged", EQUAL),
    ("disable_adapter", EQUAL), ("after disable_adapter", EQUAL),
    ("save_pretrained", EQUAL), ("from_pretrained(adapter_name='x', is_trainable=True)", EQUAL),
    ("load_adapter(the other library's files, adapter_name='loaded', is_trainable=True)", EQUAL),
    ("set_adapter(loaded)", EQUAL), ("forward (loaded)", EQUAL),
    ("minilora loads PEFT's files", EQUAL), ("peft loads minilora's files", EQUAL),
    ("AdamW step (loaded, is_trainable=True)", EQUAL), ("forward after the AdamW step (loaded)", EQUAL),
    ("before merge_and_unload", EQUAL), ("merge_and_unload(safe_merge=True, adapter_names=['default', 'other'])", EQUAL),
    ("forward after merge_and_unload", EQUAL)]


def test_every_wide_call_runs_and_agrees_with_peft():
    done = run_scenario(WIDE)
    assert done.steps == WIDE_STEPS
    assert done.numbers > 20


@pytest.mark.parametrize("ending", ["unload", "get_base_model", "float16"])
def test_the_other_wide_endings_agree_with_peft(ending):
    scenario = Scenario("gpt2", "lm", dict(target_modules=["c_attn"], r=2, bias="lora_only"), seed=1,
                        wide=dict(ending=(ending, None)))
    steps = run_scenario(scenario).steps
    expected = {"unload": [("unload", EQUAL), ("forward after unload", EQUAL)],
                "get_base_model": [("get_base_model", RAN), ("forward after get_base_model", EQUAL)],
                "float16": [("to(float16)", RAN), ("after to(float16)", EQUAL), ("forward in float16", EQUAL),
                             ("backward in float16", EQUAL), ("merge_adapter in float16", RAN),
                             ("forward merged in float16", EQUAL), ("unmerge_adapter in float16", RAN),
                             ("forward unmerged in float16", EQUAL), ("save_pretrained in float16", EQUAL)]}
    assert steps[-len(expected[ending]):] == expected[ending], steps


# --------------------------------------------------------------------------------------------
# What the wide draws found, fixed, each compared with PEFT directly
# --------------------------------------------------------------------------------------------
def _grads(model) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in model.named_parameters()}


def test_load_adapter_trainable_trains_its_copies_in_another_adapters_wrappers_as_peft(tmp_path):
    """--examples 80 --seed 147, #68: load_adapter(is_trainable=True) of an adapter whose modules_to_save the
    model wraps already (another adapter's): PEFT's load_adapter calls set_requires_grad(adapter_name), so the
    new, inactive copy trains; minilora's stayed frozen."""
    fields = dict(target_modules=["k_proj"], r=2, modules_to_save=["down_proj"])
    _, mini, twin = _both("qwen2", "qa", fields)
    twin.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (mini, twin):
            model.load_adapter(tmp_path, adapter_name="loaded", is_trainable=True)
    grads = [_grads(model) for model in (mini, twin)]
    copies = [name for name in grads[1] if ".modules_to_save.loaded." in name]
    assert copies and all(grads[1][name] for name in copies)  # PEFT's answer: they train
    assert grads[0] == grads[1]
    differential.compare_structure("load_adapter(is_trainable=True)", mini, twin)


def _names(model) -> tuple:
    try:
        config = model.active_peft_config.r
    except Exception as error:  # noqa: BLE001 - PEFT's exception type is the answer there
        config = type(error).__name__
    return model.active_adapter, list(model.active_adapters), config


@pytest.mark.parametrize("calls", [
    [("base_model.set_adapter", ["default", "other"])],
    [("base_model.set_adapter", "other"), ("set_adapter", "third"), ("base_model.set_adapter", "default")],
    [("base_model.set_adapter", ["other", "third"]), ("delete_adapter", "default")],
    [("base_model.set_adapter", ["other", "third"]), ("delete_adapter", "other")],
    [("set_adapter", "other"), ("delete_adapter", "other")],
])
def test_the_active_adapter_a_peft_model_keeps_is_pefts(calls):
    """PEFT's PeftModel keeps its own active_adapter (and active_peft_config): set by get_peft_model, its
    set_adapter, and a delete_adapter that leaves one adapter active; base_model.set_adapter (the widened
    fuzzer's multi-active call) leaves it unchanged. minilora answered the LoraModel's, a list where PEFT
    names one adapter, and active_peft_config raised a TypeError."""
    _, mini, twin = _both("llama", "lm", dict(target_modules=["q_proj"], r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, r in (("other", 4), ("third", 8)):
            mini.add_adapter(name, compat.LoraConfig(target_modules=["v_proj"], r=r))
            twin.add_adapter(name, peft.LoraConfig(target_modules=["v_proj"], r=r))
        for method, argument in calls:
            for model in (mini, twin):
                owner = model.base_model if method.startswith("base_model.") else model
                getattr(owner, method.removeprefix("base_model."))(argument)
            assert _names(mini) == _names(twin), (method, argument)



def _merged(model) -> dict[str, list[str]]:
    return {name: list(module.merged_adapters) for name, module in model.named_modules()
            if hasattr(module, "merged_adapters") and hasattr(module, "lora_A")}


@pytest.mark.parametrize("call", ["add_adapter", "load_adapter", "add_weighted_adapter"])
def test_a_new_adapter_unmerges_the_merged_layers_as_peft(call, tmp_path):
    """A random sequence of calls (merge_adapter, add_adapter, merge_adapter(adapter_names=[new])) gave outputs
    0.2 apart: PEFT's inject_adapter ends with set_adapter of the active adapters, which unmerges every merged
    layer (with its warning for each), so the first adapter no longer counts once the new one is merged alone;
    minilora kept it merged. The same for load_adapter and add_weighted_adapter (they inject too)."""
    base, mini, twin = _both("gpt2", "lm", dict(target_modules=["c_attn"], r=2, init_lora_weights=False))
    saved = dict(target_modules=["c_attn", "c_fc"], r=4, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (Conv1D's fan_in_fan_out)
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**saved), adapter_name="new").save_pretrained(tmp_path)
        if call == "add_weighted_adapter":
            for model, library in ((mini, compat), (twin, peft)):
                torch.manual_seed(1)
                model.add_adapter("new", library.LoraConfig(**saved))
    inputs = differential.model_inputs(ARCHITECTURES["gpt2"], "lm")
    said = []
    for model, library in ((mini, compat), (twin, peft)):
        model.merge_adapter()
        assert _merged(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(1)
            if call == "add_adapter":
                model.add_adapter("new", library.LoraConfig(**saved))
            elif call == "load_adapter":
                model.load_adapter(tmp_path / "new", adapter_name="new")
            else:
                model.add_weighted_adapter(["default", "new"], [1.0, 0.5], "mix", combination_type="cat")
        said.append([str(warning.message) for warning in caught if "merged" in str(warning.message)])
    assert _merged(mini) == _merged(twin) and not any(_merged(twin).values())  # PEFT's answer: nothing merged
    assert said[0] == said[1] and said[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (mini, twin):
            model.merge_adapter(adapter_names=["new"] if call != "add_weighted_adapter" else ["mix"])
    differential.compare_forward("forward merged", mini, twin, inputs, rtol=1e-5)


def test_an_adapter_added_again_to_layers_it_left_starts_in_train_mode_only_in_its_modules_as_peft():
    """add_adapter, delete_adapter, add_adapter of the same targets into a model in eval mode: the LoRA layers
    the first left behind (empty) are not new, so PEFT puts only the new A, B and dropout in train mode;
    minilora put the whole layer in train mode (it took a layer holding only the new adapter for a new one)."""
    _, mini, twin = _both("opt", "lm", dict(target_modules=["q_proj"], r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, library in ((mini, compat), (twin, peft)):
            model.eval()
            model.add_adapter("b", library.LoraConfig(target_modules=["fc1"], r=4))
            model.eval()
            model.delete_adapter("b")
            model.add_adapter("b", library.LoraConfig(target_modules=["fc1"], r=4))
    modes = _assert_same_modes(mini, twin)
    assert not modes["base_model.model.model.decoder.layers.0.fc1"] and modes["base_model.model.model.decoder.layers.0.fc1.lora_A.b"]


@pytest.mark.parametrize("arch, head, task, targets", [("llama", "seq_cls", "SEQ_CLS", ["q_proj"]),
                                                       ("gpt2", "qa", "QUESTION_ANS", ["c_attn"])])
def test_a_loaded_task_adapter_lists_its_heads_as_pefts_config(arch, head, task, targets, tmp_path):
    """--examples 80 --seed 191, #66 and 197, #33 (the wide half-precision save after a load): PEFT's task models
    append their heads to the modules_to_save of the config they are made or loaded with, so an adapter loaded
    from a file that lists them lists them twice (from_pretrained and load_adapter), and saves them so;
    minilora's loaded config listed them once."""
    base, mini, twin = _both(arch, head, dict(target_modules=targets, r=2, task_type=task))
    twin.save_pretrained(tmp_path / "saved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = [library.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "saved") for library in (compat, peft)]
        for model in (mini, twin):
            model.load_adapter(tmp_path / "saved", adapter_name="loaded")
    for ours, theirs, name in ((loaded[0], loaded[1], "default"), (mini, twin, "loaded")):
        listed = theirs.peft_config[name].modules_to_save
        assert len(listed) == 2 * len(set(listed))  # PEFT's answer: the heads twice
        assert ours.peft_config[name].modules_to_save == listed
    mini.save_pretrained(tmp_path / "mini", selected_adapters=["loaded"])
    twin.save_pretrained(tmp_path / "peft", selected_adapters=["loaded"])
    written = [json.loads((tmp_path / side / "loaded" / "adapter_config.json").read_text())["modules_to_save"]
               for side in ("mini", "peft")]
    assert written[0] == written[1]


def test_merging_adapters_a_tied_layer_does_not_hold_leaves_it_tied_as_peft():
    """--examples 80 --seed 201, #70: GPT-2's lm_head (tied to the input embedding) holds adapter "default" only;
    merge_adapter of the active "other" merges nothing there, and PEFT leaves it tied. minilora untied it (for a
    merge that did not happen) and, with nothing merged, unmerge did not tie it again: lm_head had a weight of
    its own (one more parameter name, a warning that said it merged there)."""
    base, mini, twin = _both("gpt2", "lm", dict(target_modules=["lm_head"], r=1, task_type="CAUSAL_LM"))
    said = []
    for model, library in ((mini, compat), (twin, peft)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.add_adapter("other", library.LoraConfig(target_modules=["c_attn"], r=4))
            model.set_adapter("other")
            model.merge_adapter()
            model.unmerge_adapter()
        said.append([str(warning.message) for warning in caught if "unties" in str(warning.message)])
        inner = model.get_base_model()
        assert inner.lm_head.base_layer.weight is inner.transformer.wte.weight  # PEFT's answer: still tied
    assert said[0] == []  # (minilora's own warning when a merge unties a layer; nothing merged there)
    differential.compare_structure("after merge and unmerge", mini, twin)


@pytest.mark.parametrize("name", ["w", "mix", "self_attn"])
def test_add_weighted_adapter_freezes_what_pefts_freezes_by_the_new_name(name):
    """A probe of random call sequences: add_weighted_adapter(..., "w") left the active adapter trainable where PEFT
    froze it. PEFT freezes the new adapter by a substring test on every parameter's name (_freeze_adapter), so a
    name found inside others ("w" in ".weight", "self_attn") freezes those parameters too; "mix" freezes only its own."""
    _, mini, twin = _both("opt", "lm", dict(target_modules=["q_proj"], r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, library in ((mini, compat), (twin, peft)):
            model.add_adapter("b", library.LoraConfig(target_modules=["q_proj", "fc1"], r=4))
            model.add_weighted_adapter(["default", "b"], [1.0, 0.5], name, combination_type="cat")
    grads = [_grads(model) for model in (mini, twin)]
    assert grads[0] == grads[1]
    assert any(grads[1].values()) == (name == "mix")  # PEFT's answer: "w" and "self_attn" froze what they name


def test_deleting_the_adapter_a_peft_model_keeps_refuses_what_peft_fails_on(tmp_path, unchanged):
    """A probe of random call sequences: base_model.set_adapter(["default", "b", "c"]), then delete_adapter("default")
    leaves "b" and "c" active while PEFT's PeftModel still names "default" (it changes its name only when one
    adapter stays active), so PEFT's forward, generate and save_pretrained fail with a KeyError; minilora ran. Now
    MiniLoraErrors, before any change. So do disable_adapter, set_requires_grad and has_active_enabled_adapter
    (PEFT's read that config too; minilora's ran, and set_requires_grad changed requires_grad)."""
    base = build_base(ARCHITECTURES["opt"], "lm")
    inputs = differential.model_inputs(ARCHITECTURES["opt"], "lm")
    models = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for library in (compat, peft):
            model = library.get_peft_model(copy.deepcopy(base), library.LoraConfig(target_modules=["q_proj"], r=2))
            for name in ("b", "c"):
                model.add_adapter(name, library.LoraConfig(target_modules=["q_proj"], r=2))
            model.base_model.set_adapter(["default", "b", "c"])
            model.delete_adapter("default")
            models.append(model)
    mini, twin = models
    calls = {"save_pretrained": lambda model, where: model.save_pretrained(tmp_path / where),
             "forward": lambda model, where: model(**inputs),
             "generate": lambda model, where: model.generate(input_ids=inputs["input_ids"], max_new_tokens=1),
             "disable_adapter": lambda model, where: model.disable_adapter().__enter__(),
             "set_requires_grad": lambda model, where: model.set_requires_grad("b"),
             "has_active_enabled_adapter": lambda model, where: model.has_active_enabled_adapter}
    for what, call in calls.items():
        with pytest.raises(KeyError):  # PEFT's answer
            call(twin, "peft")
        check = unchanged(mini)
        with pytest.raises(MiniLoraError, match=rf"delete_adapter\('default'\).*PEFT's (forward|{what}) fails"):
            call(mini, "mini")
        check()
    assert not (tmp_path / "mini").exists()


def test_saving_after_deleting_the_active_adapter_that_leaves_none_active_refuses_as_peft_fails(tmp_path):
    """The same with none left active (the first LoRA layer held no other adapter): PEFT's save_pretrained fails
    with a KeyError (its get_base_model reads the deleted adapter's config); minilora saved."""
    _, mini, twin = _both("opt", "lm", dict(target_modules=["q_proj"], r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, library in ((mini, compat), (twin, peft)):
            model.add_adapter("b", library.LoraConfig(target_modules=["fc1"], r=2))
            model.delete_adapter("default")
    assert twin.active_adapters == mini.active_adapters == []
    with pytest.raises(KeyError):
        twin.save_pretrained(tmp_path / "peft")
    with pytest.raises(MiniLoraError, match="PEFT's save_pretrained fails"):
        mini.save_pretrained(tmp_path / "mini")
    assert not (tmp_path / "mini").exists()


@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj"]), ("gpt2", ["c_attn"])])
def test_unload_of_a_merged_model_keeps_w0_plus_dw_as_peft(arch, targets):
    """A probe of random call sequences: merge_adapter(), then unload(). PEFT's unload puts the base layers back as
    they are, so merged layers keep W0 + dW (the adapted outputs); minilora's unmerged them first (the base model's
    outputs). A merged layer whose weight is tied (lm_head) is refused: PEFT merged into the shared weight."""
    base, mini, twin = _both(arch, "lm", dict(target_modules=targets, r=2, init_lora_weights=False))
    inputs = differential.model_inputs(ARCHITECTURES[arch], "lm")
    with torch.no_grad():
        adapted = differential.forward(twin.eval(), inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = []
        for model in (mini, twin):
            model.merge_adapter()
            plain.append(model.unload())
    with torch.no_grad():
        differential.compare_tensors("PEFT's unload vs its adapted outputs", differential.forward(plain[1].eval(), inputs),
                                     adapted, rtol=1e-5)  # PEFT's answer: W0 + dW
        differential.compare_tensors("unload", differential.forward(plain[0].eval(), inputs),
                                     differential.forward(plain[1].eval(), inputs))


def test_unload_of_a_merged_tied_layer_is_refused_before_anything_changes(unchanged):
    _, mini, _ = _both("gpt2", "lm", dict(target_modules=["lm_head"], r=2, init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mini.merge_adapter()
    check = unchanged(mini)
    with pytest.raises(MiniLoraError, match=r"unload\(\) of merged layers whose weight is tied"):
        mini.unload()
    check()


def test_loading_into_the_same_adapter_takes_the_other_adapters_layers_biases_as_peft(tmp_path):
    """--examples 80 --seed 233, #66: load_adapter(<its own saved files>, the same adapter_name) -- Trainer's resume --
    of a bias="lora_only" adapter saved beside another adapter: the file holds the biases of the other adapter's
    layers too (<layer>.base_layer.bias), which PEFT loads into them; minilora refused the file ("does not fit",
    unexpected keys) although it loads those keys into a fresh model."""
    base, mini, twin = _both("opt", "lm", dict(target_modules=["q_proj"], r=2, bias="lora_only"))
    inputs = differential.model_inputs(ARCHITECTURES["opt"], "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, library in ((mini, compat), (twin, peft)):
            model.add_adapter("other", library.LoraConfig(target_modules=["fc1"], r=2))
        differential.same_values(mini, twin, 1)
        twin.save_pretrained(tmp_path)
        with torch.no_grad():
            saved = differential.forward(twin.eval(), inputs)
            moved = []
            for model in (mini, twin):  # training moves the biases after the save
                for name, param in model.named_parameters():
                    if name.endswith("bias") and param.requires_grad:
                        param.add_(0.5)
                        moved.append(name)
        assert moved  # (else the reloads below compare outputs that never changed)
        for model in (mini, twin):
            model.load_adapter(tmp_path, "default")
    differential.compare_structure("load_adapter into the same adapter", mini, twin)
    with torch.no_grad():
        differential.compare_tensors("PEFT's, reloaded", differential.forward(twin.eval(), inputs), saved)
        differential.compare_tensors("minilora's, reloaded", differential.forward(mini.eval(), inputs), saved)


@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload"])
def test_merging_a_tied_target_warns_with_pefts_words(call):
    """PEFT warns before merging when the config says tie_word_embeddings and a LoRA layer is named lm_head or
    embed_tokens (its _check_merge_allowed); minilora said only its own warning (it merges into a copy)."""
    _, mini, twin = _both("gpt2", "lm", dict(target_modules=["c_attn", "lm_head"], r=2))
    said = []
    for model in (mini, twin):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            getattr(model, call)()
        said.append([str(warning.message) for warning in caught if "tie_word_embeddings=True" in str(warning.message)])
    assert said[0] == said[1] and len(said[1]) == 1 and "tied_target_modules=['lm_head']" in said[1][0]


def test_a_loaded_adapter_on_conv1d_layers_ends_with_fan_in_fan_out_as_pefts_config(tmp_path):
    """--examples 80 --seed 255, #70: a GPT-2 adapter saved with fan_in_fan_out=False (PEFT's add_adapter leaves it so
    when the layers hold another adapter already), loaded into new LoRA layers (from_pretrained, load_adapter):
    PEFT's injection sets the config's fan_in_fan_out to the Conv1D layout, True; minilora kept the file's False."""
    base, mini, twin = _both("gpt2", "lm", dict(target_modules=["c_attn"], r=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin.add_adapter("other", peft.LoraConfig(target_modules=["c_attn"], r=2))
        twin.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
        loaded = [library.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "other") for library in (compat, peft)]
        for model in (mini, twin):
            model.load_adapter(tmp_path / "other", "loaded")  # (into c_attn, which holds "default": not new)
        into_new = [library.get_peft_model(copy.deepcopy(base), library.LoraConfig(target_modules=["c_fc"], r=2))
                    for library in (compat, peft)]
        for model in into_new:
            model.load_adapter(tmp_path / "other", "loaded")
    assert loaded[1].peft_config["default"].fan_in_fan_out is True  # PEFT's answer
    assert loaded[0].peft_config["default"].fan_in_fan_out is True
    assert mini.peft_config["loaded"].fan_in_fan_out is twin.peft_config["loaded"].fan_in_fan_out is False
    assert into_new[0].peft_config["loaded"].fan_in_fan_out is into_new[1].peft_config["loaded"].fan_in_fan_out is True


def test_loading_into_the_same_adapter_of_a_half_precision_model_upcasts_it_as_peft(tmp_path):
    """The sequence fuzzer (--seed 100: bfloat16, then save_pretrained and load_adapter into the same adapter): PEFT's
    load_adapter ends with _cast_adapter_dtype, so the adapter's bfloat16 A and B become float32 even when the model
    had the adapter already; minilora's stayed bfloat16 (outputs 2e-3 apart)."""
    base, mini, twin = _both("llama", "lm", dict(target_modules=["q_proj"], r=2, init_lora_weights=False))
    inputs = differential.model_inputs(ARCHITECTURES["llama"], "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, where in ((mini, "mini"), (twin, "peft")):
            model.to(torch.bfloat16)
            model.save_pretrained(tmp_path / where)
            model.load_adapter(tmp_path / where, "default")
    layer = twin.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's answer
    differential.compare_structure("load_adapter into the same adapter, bfloat16", mini, twin)  # (dtypes too)
    differential.compare_forward("forward", mini, twin, inputs)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_new_adapters_lora_biases_train_where_an_active_bias_all_adapter_says_so_as_peft(bias):
    """The sequence fuzzer's drawn sequences: add_adapter of an adapter with lora_bias=True beside an active bias="all"
    adapter. PEFT's injection marks every parameter named *.bias trainable and restores the ones that existed, so the
    new (inactive) adapter's lora_B biases train; minilora's stayed frozen. (With "lora_only" nothing new trains.)"""
    _, mini, twin = _both("opt", "lm", dict(target_modules=["q_proj"], r=2, bias=bias))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, library in ((mini, compat), (twin, peft)):
            model.add_adapter("b", library.LoraConfig(target_modules=["q_proj", "fc1"], r=2, lora_bias=True))
    grads = [_grads(model) for model in (mini, twin)]
    new_biases = [name for name in grads[1] if ".lora_B.b.bias" in name]
    assert new_biases and all(grads[1][name] is (bias == "all") for name in new_biases)  # PEFT's answer
    assert grads[0] == grads[1]


def test_a_new_adapter_whose_file_holds_the_base_weight_of_a_merged_layer_is_refused(tmp_path, unchanged):
    """The sequence fuzzer (--seed 400 #39): lm_head (tied) holds adapter "b", merged; its file holds lm_head's base
    weight (save_embedding_layers), saved while merged. PEFT's load_adapter of it as a new adapter unmerges, then writes
    that merged weight into W0: dW stays inside W0 while unmerged (outputs 0.7 off minilora's, which loaded first and
    unmerged after). Now a MiniLoraError before any change."""
    base, mini, twin = _both("gpt2", "lm", dict(target_modules=["c_attn"], r=2))
    inputs = differential.model_inputs(ARCHITECTURES["gpt2"], "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, library in ((mini, compat), (twin, peft)):
            model.add_adapter("b", library.LoraConfig(target_modules=["c_attn", "lm_head"], r=4, init_lora_weights=False))
            model.set_adapter("b")
            model.merge_adapter()
        twin.save_pretrained(tmp_path)
        assert "base_model.model.lm_head.base_layer.weight" in safetensors.torch.load_file(
            tmp_path / "b" / "adapter_model.safetensors")
        with torch.no_grad():
            unmerged = differential.forward(twin.eval(), inputs)
        twin.load_adapter(tmp_path / "b", "loaded")
        twin.unmerge_adapter()
        with torch.no_grad():  # PEFT's answer: unmerged, yet not its unmerged outputs (dW stayed in W0)
            assert not torch.equal(differential.forward(twin.eval(), inputs)[0][1], unmerged[0][1])
    check = unchanged(mini)
    with pytest.raises(MiniLoraError, match="holds the base weights .* of layers that are merged now"):
        mini.load_adapter(tmp_path / "b", "loaded")
    check()


@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd"])
def test_a_weighted_adapter_in_a_half_precision_model_has_pefts_dtype(combination_type):
    """The sequence fuzzer (--seed 503 #13): add_weighted_adapter in a model put in bfloat16. PEFT builds the new
    adapter in the base layer's dtype (no autocast) and "cat" writes into it in place: bfloat16; minilora built it in
    float32. ("linear" and "svd" replace the tensors: the dtype of what they compute, the same on both sides.)"""
    _, mini, twin = _both("gpt2", "lm", dict(target_modules=["c_attn"], r=2, init_lora_weights=False))
    inputs = differential.model_inputs(ARCHITECTURES["gpt2"], "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, library in ((mini, compat), (twin, peft)):
            model.to(torch.bfloat16)
            torch.manual_seed(1)
            model.add_adapter("c", library.LoraConfig(target_modules=["c_attn"], r=2, init_lora_weights=False))
            model.add_weighted_adapter(["default", "c"], [1.0, 0.5], "mix", combination_type=combination_type)
            model.set_adapter("mix")
    differential.compare_structure("add_weighted_adapter in bfloat16", mini, twin)  # (dtypes too)
    differential.compare_values("add_weighted_adapter values", mini, twin)
    differential.compare_forward("forward (mix)", mini, twin, inputs)
