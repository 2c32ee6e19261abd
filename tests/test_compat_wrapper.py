"""minilora.compat's PeftModel wrapper next to PEFT's: each test makes the same calls with both
libraries on the same base and seed and compares what a script can see (attributes, keys, outputs,
the random numbers drawn afterwards, errors)."""

from __future__ import annotations

import contextlib
import copy
import warnings

import peft
import pytest
import torch
from torch import nn

from minilora import MiniLoraError, compat


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.relu, self.lin1 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


X = torch.arange(12, dtype=torch.float32).reshape(2, 6) / 10


def base() -> MLP:
    torch.manual_seed(0)
    return MLP()


def wrap(lib, **fields):
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(base(), lib.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False,
                                                         **fields))


@pytest.fixture
def saved(tmp_path):
    """A directory PEFT saved, and the outputs of the model it came from."""
    model = wrap(peft).eval()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        return tmp_path, model(X)


def test_the_wrapper_s_attributes_are_peft_s():
    theirs, ours = wrap(peft), wrap(compat)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.get_base_model() is ours.base_model.model and type(ours.base_model.model) is MLP
    for name in ("prefix", "active_adapter", "active_adapters", "_is_prompt_learning", "modules_to_save",
                 "targeted_module_names", "has_active_enabled_adapter"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.peft_type == theirs.peft_type == "LORA"
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():
        assert torch.equal(ours(X), theirs(X))
        assert torch.equal(ours.base_model(X), theirs.base_model(X))  # forward through LoraModel too
    assert [s.name for s in ours.get_layer_status()] == [s.name for s in theirs.get_layer_status()]
    deep = copy.deepcopy(ours)
    assert type(deep) is type(ours) and list(deep.state_dict()) == list(ours.state_dict())


def test_from_pretrained_options_as_peft(saved):
    directory, expected = saved
    for lib in (peft, compat):
        torch.manual_seed(3)
        model = lib.PeftModel.from_pretrained(base(), directory, torch_device="cpu", device_map={"": "cpu"})
        after = torch.rand(2)
        with torch.no_grad():
            assert torch.equal(model(X), expected), lib.__name__
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        keys = model.load_adapter(directory, adapter_name="other")
        assert keys.missing_keys == [] and keys.unexpected_keys == [], lib.__name__
        if lib is peft:
            peft_after = after
    assert torch.equal(after, peft_after)  # the same random numbers drawn on the way


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_into_an_existing_name_as_peft(saved, is_trainable):
    """load_adapter(directory, "default") on a model that has "default" (what transformers.Trainer does to
    resume and to reload the best checkpoint): the saved weights; the config object, requires_grad and
    the random generator as they were; eval mode unless is_trainable, as PEFT."""
    directory, expected = saved
    seen = {}
    for lib in (peft, compat):
        model = wrap(lib, lora_dropout=0.1).train()
        config = model.peft_config["default"]
        model.base_model.model.lin1.requires_grad_(True)  # a parameter the script chose to train
        torch.manual_seed(3)
        model.load_adapter(directory, "default", is_trainable=is_trainable)
        with torch.no_grad():
            outputs = model.eval()(X) if is_trainable else model(X)
        seen[lib.__name__] = (torch.rand(2), model.training, {n: p.requires_grad for n, p in model.named_parameters()},
                              model.peft_config["default"] is config, config.inference_mode)
        assert torch.equal(outputs, expected), lib.__name__
    assert torch.equal(seen["minilora.compat"][0], seen["peft"][0])
    assert seen["minilora.compat"][1:] == seen["peft"][1:]


def test_load_adapter_into_an_existing_name_with_another_config_is_refused(saved, unchanged):
    """PEFT loads A and B and keeps the model's lora_alpha (another scaling than the saved adapter's)."""
    directory, _ = saved
    model = wrap(compat, lora_alpha=16)
    check = unchanged(model)
    with pytest.raises(MiniLoraError, match=r"differs from adapter 'default' in the model in \['lora_alpha'\]"):
        model.load_adapter(directory, "default")
    check()


def test_low_cpu_mem_usage_draws_nothing_as_peft(saved):
    directory, expected = saved
    draws = {}
    for lib in (peft, compat):
        torch.manual_seed(3)
        model = lib.PeftModel.from_pretrained(base(), directory, low_cpu_mem_usage=True)
        model.load_adapter(directory, adapter_name="other", low_cpu_mem_usage=True)
        draws[lib.__name__] = torch.rand(2)
        with torch.no_grad():
            assert torch.equal(model(X), expected), lib.__name__
    torch.manual_seed(3)
    base()
    nothing = torch.rand(2)
    assert torch.equal(draws["peft"], nothing) and torch.equal(draws["minilora.compat"], nothing)


def _two_adapters(lib):
    model = wrap(lib)
    model.add_adapter("b", lib.LoraConfig(target_modules=["lin1"], r=2, init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("setup", ["disable_adapter_layers", "none_active_in_disable_adapter", "in_disable_adapter",
                                   "after_disable_adapter"])
def test_has_active_enabled_adapter_and_the_adapter_names_checks_it_guards_are_peft_s(setup):
    """PEFT's has_active_enabled_adapter is ``not _adapters_disabled or not active_adapters``, where
    ``_adapters_disabled`` is set only inside ``with model.disable_adapter():``. minilora answered "is some LoRA
    layer enabled", False after base_model.disable_adapter_layers() (PEFT: True), so forward skipped the
    adapter_names checks that PEFT runs there: training mode and unknown names ran instead of failing."""
    answers = {}
    for lib in (peft, compat):
        model = _two_adapters(lib)
        with contextlib.ExitStack() as stack:
            if setup == "disable_adapter_layers":
                model.base_model.disable_adapter_layers()
            elif setup == "none_active_in_disable_adapter":
                model.base_model.set_adapter([])
                stack.enter_context(model.disable_adapter())
            elif setup == "in_disable_adapter":
                stack.enter_context(model.disable_adapter())
            else:
                with model.disable_adapter():
                    pass
            answer = [model.has_active_enabled_adapter]
            with torch.no_grad():
                answer.append(model(X, adapter_names=["default", "b"]))
            for train, names in ((False, ["default", "zzz"]), (True, ["default", "b"])):
                model.train(train)
                try:
                    with torch.no_grad():
                        answer.append(model(X, adapter_names=names))
                except (ValueError, MiniLoraError) as error:
                    answer.append(str(error).split(":")[0].rstrip("."))
            answers[lib.__name__] = answer
    theirs, ours = answers["peft"], answers["minilora.compat"]
    assert theirs[0] == ours[0], (theirs[0], ours[0])
    assert len(theirs) == len(ours) == 4
    for their, our in zip(theirs[1:], ours[1:]):
        if isinstance(their, str):
            assert isinstance(our, str) and our.startswith(their), (their, our)
        else:
            assert torch.equal(their, our), (their, our)


@pytest.mark.parametrize("names", [["default"], ("default",), [], ["default", "b"]])
def test_peft_model_set_adapter_takes_one_name_as_peft(names):
    """PEFT's PeftModel.set_adapter takes one name: a list or tuple fails (a TypeError or ValueError) before any
    change. minilora's made several adapters active (then active_adapter was a list). Now a MiniLoraError that
    points to base_model.set_adapter, before any change."""
    theirs, ours = _two_adapters(peft), _two_adapters(compat)
    with pytest.raises((TypeError, ValueError)):
        theirs.set_adapter(names)
    with pytest.raises(MiniLoraError, match=r"takes one adapter name.*base_model\.set_adapter"):
        ours.set_adapter(names)
    assert ours.active_adapter == theirs.active_adapter == "default"
    assert ours.active_adapters == theirs.active_adapters == ["default"]


def test_get_peft_model_and_add_adapter_low_cpu_mem_usage_leave_placeholders_as_peft(saved):
    """low_cpu_mem_usage=True in get_peft_model / add_adapter: A and B on the meta device, as PEFT's, nothing
    drawn; set_peft_model_state_dict then fills them, and the model gives the saved adapter's outputs."""
    directory, expected = saved
    state = peft.utils.load_peft_weights(str(directory))
    for lib in (peft, compat):
        torch.manual_seed(3)
        model = lib.get_peft_model(base(), lib.LoraConfig(target_modules=["lin0"], r=2), low_cpu_mem_usage=True)
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"], r=2), low_cpu_mem_usage=True)
        after = torch.rand(2)
        devices = {name: p.device.type for name, p in model.named_parameters() if "lora_" in name}
        assert set(devices.values()) == {"meta"} and len(devices) == 4, lib.__name__
        torch.manual_seed(3)
        base()
        assert torch.equal(after, torch.rand(2)), lib.__name__
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
        devices = {name.split(".lora_")[1].split(".")[1]: p.device.type for name, p in model.named_parameters()
                   if "lora_" in name}
        assert devices == {"default": "cpu", "other": "meta"}, lib.__name__
        with torch.no_grad():
            assert torch.equal(model(X), expected), lib.__name__


@pytest.mark.parametrize("how", ["get_peft_model", "add_adapter", "inject_adapter_in_model"])
def test_a_forward_through_meta_placeholders_refuses_until_they_are_loaded(saved, how):
    """low_cpu_mem_usage=True leaves A and B on the meta device: PEFT's forward then adds whatever the
    placeholders give (numbers that mean nothing), minilora's gave W0 x for the layer. Now a MiniLoraError
    that says to load them, before any change; once set_peft_model_state_dict loads them, PEFT's outputs."""
    directory, expected = saved
    state = peft.utils.load_peft_weights(str(directory))
    outputs = []
    for lib in (compat, peft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if how == "inject_adapter_in_model":
                model = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0"], r=2), base(),
                                                    low_cpu_mem_usage=True)
                load = lambda: lib.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)  # noqa: E731
            elif how == "get_peft_model":
                model = lib.get_peft_model(base(), lib.LoraConfig(target_modules=["lin0"], r=2),
                                           low_cpu_mem_usage=True)
                load = lambda: lib.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)  # noqa: E731
            else:
                model = lib.get_peft_model(base(), lib.LoraConfig(target_modules=["lin1"], r=2))
                model.add_adapter("new", lib.LoraConfig(target_modules=["lin0"], r=2), low_cpu_mem_usage=True)
                model.set_adapter("new")
                load = lambda: lib.set_peft_model_state_dict(model, state, adapter_name="new",  # noqa: E731
                                                             low_cpu_mem_usage=True)
        if lib is compat:
            before = {key: value.clone() for key, value in model.state_dict().items() if not value.is_meta}
            with pytest.raises(MiniLoraError, match="placeholders on the meta device.*set_peft_model_state_dict"):
                model(X)
            after = model.state_dict()
            assert all(torch.equal(after[key], value) for key, value in before.items())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load()
        with torch.no_grad():
            outputs.append(model(X))
    assert torch.equal(outputs[0], outputs[1])
    if how != "add_adapter":
        assert torch.equal(outputs[0], expected)


def test_config_given_to_from_pretrained_becomes_the_adapter_s(saved):
    directory, _ = saved
    for lib in (peft, compat):
        config = lib.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False, lora_dropout=0.25)
        model = lib.PeftModel.from_pretrained(base(), directory, config=config)
        assert model.peft_config["default"] is config and config.inference_mode, lib.__name__
        assert model.base_model.model.lin0.lora_dropout["default"].p == 0.25, lib.__name__  # the config's dropout
    with pytest.raises(MiniLoraError, match=r"config= differs .* \['r'"):
        compat.PeftModel.from_pretrained(base(), directory, config=compat.LoraConfig(target_modules=["lin0"], r=4))
    with pytest.raises(MiniLoraError, match=r"config= differs .* \['init_lora_weights'\]"):  # (PEFT's draws)
        compat.PeftModel.from_pretrained(base(), directory, config=compat.LoraConfig(target_modules=["lin0"], r=2))


def test_task_types_choose_peft_s_classes(saved):
    from peft.peft_model import PeftModelForFeatureExtraction

    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING as peft_classes

    assert {task: cls.__name__ for task, cls in compat.TASK_MODELS.items()} == \
        {task: cls.__name__ for task, cls in peft_classes.items()}
    theirs, ours = wrap(peft, task_type="FEATURE_EXTRACTION"), wrap(compat, task_type="FEATURE_EXTRACTION")
    assert isinstance(theirs, PeftModelForFeatureExtraction) and type(ours) is compat.PeftModelForFeatureExtraction
    directory, _ = saved
    assert type(compat.PeftModel.from_pretrained(base(), directory)) is compat.PeftModel  # no task type saved


def test_errors_name_what_peft_names():
    ours = wrap(compat)
    with pytest.raises(MiniLoraError, match="Adapter unknown does not exist"):  # PEFT's words
        ours.delete_adapter("unknown")
    with pytest.raises(MiniLoraError, match="Adapter with name 'default' already exists"):
        ours.add_adapter("default", compat.LoraConfig(target_modules=["lin1"]))
    with pytest.raises(MiniLoraError, match="does not push to a hub"):
        ours.push_to_hub("user/repo")
    with pytest.raises(MiniLoraError, match="training mode"):  # PEFT: a ValueError, before any forward
        ours(X, adapter_names=["default", "__base__"])
    with pytest.raises(MiniLoraError, match="activated LoRA"):
        ours(X, alora_offsets=[1, 1])


def test_mixed_batch_through_the_wrapper_is_peft_s():
    theirs, ours = wrap(peft).eval(), wrap(compat).eval()
    names = ["default", "__base__"]
    with torch.no_grad():
        assert torch.equal(ours(X, adapter_names=names), theirs(X, adapter_names=names))
        assert torch.equal(ours.base_model.model(X), theirs.base_model.model(X))  # the block was left


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_trainer_sees_the_model_s_columns_as_with_peft(tmp_path, task_type):
    """transformers.Trainer keeps the batch columns the forward's signature names (your model's, for
    PEFT's wrappers): with or without a task type, both libraries train on the same batches."""
    from transformers import Trainer, TrainingArguments

    from conftest import make_tiny_gpt2

    tokens = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": ids, "labels": ids, "position_ids": torch.arange(12)} for ids in tokens]
    losses = {}
    for lib in (peft, compat):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(make_tiny_gpt2(), lib.LoraConfig(task_type=task_type, r=4,
                                                                        target_modules=["c_attn"]))
            args = TrainingArguments(output_dir=str(tmp_path / lib.__name__), per_device_train_batch_size=4,
                                     max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none",
                                     save_strategy="no", disable_tqdm=True, seed=0)
            trainer = Trainer(model=model, args=args, train_dataset=dataset)
            trainer.train()
        losses[lib.__name__] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses["peft"]) == 2 and losses["minilora.compat"] == losses["peft"]


def test_mixed_batch_runs_each_row_s_modules_to_save_copy_as_peft():
    """modules_to_save in a mixed batch: each row goes through its adapter's copy ("__base__": the
    original module), as PEFT's _mixed_batch_forward; the copies differ, so a shared one would show."""
    models = []
    for lib in (peft, compat):
        torch.manual_seed(1)
        model = lib.get_peft_model(base(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], r=2,
                                                          init_lora_weights=False))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], r=2,
                                                  init_lora_weights=False))
        with torch.no_grad():
            for name in ("default", "other"):
                model.base_model.model.lin1.modules_to_save[name].weight.mul_(2 if name == "default" else -1)
        models.append(model.eval())
    names = ["other", "__base__", "default"]
    x = torch.cat([X, X[:1]])
    with torch.no_grad():
        theirs, ours = models[0](x, adapter_names=names), models[1](x, adapter_names=names)
        assert torch.equal(ours, theirs)
        assert not torch.equal(ours[0], ours[2]) and not torch.equal(ours[1], ours[2])
        assert torch.equal(models[1](x), models[0](x))  # the block was left: one copy for all rows again


def test_set_requires_grad_as_peft():
    models = []
    for lib in (peft, compat):
        torch.manual_seed(1)
        model = lib.get_peft_model(base(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], r=2))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"], r=2))
        model.set_requires_grad("other")
        model.set_requires_grad(["default"], requires_grad=False)
        models.append(sorted(n for n, p in model.named_parameters() if p.requires_grad))
    assert models[1] == models[0] and any(".modules_to_save.other." in n for n in models[0])
    with pytest.raises(MiniLoraError, match="no adapter named 'nope'"):
        wrap(compat).set_requires_grad("nope")  # PEFT ignores an unknown name


@pytest.mark.parametrize("adapter_names", [["other"], ["default", "other"], None])
def test_merge_and_unload_of_named_adapters_as_peft(adapter_names):
    """merge_and_unload(adapter_names=[...]) folds in those adapters only (active or not), as PEFT."""
    merged = []
    for lib in (peft, compat):
        model = wrap(lib)
        torch.manual_seed(2)
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False))
        merged.append(model.merge_and_unload(adapter_names=adapter_names))
    with torch.no_grad():
        assert torch.equal(merged[1](X), merged[0](X))
    assert merged[1].state_dict().keys() == merged[0].state_dict().keys()
    with pytest.raises(MiniLoraError, match="adapter_names must be a list of the model's adapters"):
        wrap(compat).merge_and_unload(adapter_names=["nope"])


def test_from_pretrained_into_a_wrapper_runs_the_loaded_adapter(saved):
    """Pitfall 1 under another adapter name: PEFT wraps twice and (its keys not found) does not run
    the saved adapter; compat adds it to the same wrapper and runs it."""
    directory, expected = saved
    outputs = {}
    for lib in (peft, compat):
        model = wrap(lib)
        with torch.no_grad():
            model.base_model.model.lin0.lora_B["default"].weight.add_(1)  # "default" is not the saved adapter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(4)
            loaded = lib.PeftModel.from_pretrained(model, directory, adapter_name="other")
            outputs[f"{lib.__name__} draws"] = torch.rand(3)  # the same random numbers drawn on the way
        with torch.no_grad():
            outputs[lib.__name__] = loaded(X)
        if lib is compat:
            assert loaded is model and model.active_adapters == ["other"] and not model.training
            assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(outputs["minilora.compat"], expected)
    assert not torch.equal(outputs["peft"], expected)
    assert torch.equal(outputs["minilora.compat draws"], outputs["peft draws"])


@pytest.mark.parametrize("target_modules", [None, "all-linear", ["c_attn"], ["c_attn", "c_fc"]])
def test_config_target_modules_after_injection_as_peft(tmp_path, target_modules):
    """PEFT keeps a list of target names as a set, and writes the names that None (the architecture's
    default) and "all-linear" stand for into the config when it injects; the file lists them too."""
    import json

    from conftest import make_tiny_gpt2

    seen = {}
    for lib in (peft, compat):
        config = lib.LoraConfig(target_modules=copy.copy(target_modules), r=2)
        created = config.target_modules
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(make_tiny_gpt2(), config)
            model.add_adapter("other", lib.LoraConfig(target_modules=copy.copy(target_modules), r=2))
            model.save_pretrained(tmp_path / lib.__name__)
        saved = json.loads((tmp_path / lib.__name__ / "adapter_config.json").read_text())["target_modules"]
        seen[lib.__name__] = (created, config.target_modules, model.peft_config["other"].target_modules,
                              sorted(saved) if isinstance(saved, list) else saved)
    assert seen["minilora.compat"] == seen["peft"]


@pytest.mark.parametrize("default", [["lin0"], "lin0"])
def test_registered_default_targets_written_as_peft(monkeypatch, default):
    """A default registered for a new model type in both tables: PEFT writes a list default into the
    config as a set and keeps a one-regex default as that string (not the set of its characters)."""
    from peft.tuners.lora.model import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    import minilora.targets

    monkeypatch.setitem(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "toy-mlp", default)
    monkeypatch.setitem(minilora.targets.DEFAULT_TARGET_MODULES, "toy-mlp", default)
    seen = {}
    for lib in (peft, compat):
        model = base()
        model.config = {"model_type": "toy-mlp"}
        wrapped = lib.get_peft_model(model, lib.LoraConfig(r=2))
        seen[lib.__name__] = (wrapped.peft_config["default"].target_modules, wrapped.targeted_module_names)
    assert seen["minilora.compat"] == seen["peft"]
    assert seen["peft"][0] == ({"lin0"} if isinstance(default, list) else "lin0")


class DeepMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.lin1(self.lin0(x).relu()))


def many_calls(lib, directory) -> list[float]:
    """A script of wrapper calls, recording a random number after each: it shows what each call drew."""
    drawn = []
    torch.manual_seed(0)
    model = lib.get_peft_model(DeepMLP(), lib.LoraConfig(target_modules=["lin0"], r=2, lora_dropout=0.2,
                                                         modules_to_save=["lin2"]))
    calls = [
        lambda: model.add_adapter("g", lib.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights="gaussian")),
        lambda: model.add_adapter("f", lib.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False)),
        lambda: model(torch.ones(2, 6)),  # train mode: dropout draws
        lambda: model.set_adapter("g"),
        lambda: model.save_pretrained(directory),
        lambda: model.load_adapter(directory / "f", adapter_name="f2"),
        lambda: model.add_weighted_adapter(["g", "f"], [0.5, 0.5], "cat", combination_type="cat"),
        lambda: model.add_weighted_adapter(["g", "f"], [0.5, 0.5], "svd", combination_type="svd"),
        lambda: model.delete_adapter("svd"),
        lambda: model.merge_adapter(),
        lambda: model.unmerge_adapter(),
        lambda: lib.PeftModel.from_pretrained(DeepMLP(), directory),
        lambda: model.merge_and_unload(),
    ]
    drawn.append(torch.rand(1).item())
    for call in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
        drawn.append(torch.rand(1).item())
    return drawn


def test_every_wrapper_call_draws_peft_s_random_numbers(tmp_path):
    assert many_calls(compat, tmp_path / "ours") == many_calls(peft, tmp_path / "peft")


def test_prepare_model_for_gradient_checkpointing_as_peft():
    """A model that does not checkpoint yet gets no hook from the wrapper; the public method adds PEFT's
    (input embeddings' output requires grad), returns what PEFT's returns, and then checkpointing trains
    the adapters: the same gradients with both libraries."""
    from conftest import make_tiny_gpt2

    ids = torch.tensor([[1, 2, 3, 4]])
    grads, returned, required = {}, {}, {}
    for lib in (peft, compat):
        torch.manual_seed(0)
        model = lib.get_peft_model(make_tiny_gpt2(), lib.LoraConfig(r=2, target_modules=["c_attn"],
                                                                     init_lora_weights=False))
        embeddings = model.get_base_model().get_input_embeddings()
        before = embeddings(ids).requires_grad
        returned[lib] = model.prepare_model_for_gradient_checkpointing(model.get_base_model())
        required[lib] = (before, embeddings(ids).requires_grad)
        model.train()
        model.gradient_checkpointing_enable({"use_reentrant": True})
        (model(input_ids=ids).logits ** 2).sum().backward()
        grads[lib] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert returned[compat] is returned[peft] is None
    assert required[compat] == required[peft] == (False, True)
    assert grads[compat].keys() == grads[peft].keys() and len(grads[peft]) == 4
    for name, grad in grads[peft].items():
        assert grad is not None and grad.abs().sum() > 0 and torch.equal(grads[compat][name], grad), name
