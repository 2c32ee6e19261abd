"""modules_to_save with several adapters (minilora/saved_modules.py), against PEFT 0.21.2.

PEFT's ModulesToSaveWrapper keeps one copy of the original module per adapter; the active adapter's
copy runs and trains, the others wait. Every step here is made with minilora's native API and with
PEFT on the same base and seed, and compared: state-dict keys and values, trainable names, outputs,
a training step, the files both ways, delete, merge_and_unload, layer status and mixed batches
through the wrapper. All in float32 on the CPU, bitwise.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import peft
import pytest
import torch
from torch import nn

import minilora
from conftest import record_model
from minilora import LoraConfig, MiniLoraError, compat
from minilora.mixed import row_groups
from minilora.saved_modules import ModulesToSave

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
PREFIX = "base_model.model."
X = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))


class Net(nn.Module):
    """lin0 gets LoRA; head and norm are trained in full (modules_to_save)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 8)
        self.head = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(torch.relu(self.lin0(x))))


def base() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()


FIRST = dict(r=4, target_modules=["lin0"], modules_to_save=["head"], init_lora_weights=False)
SECOND = dict(r=2, lora_alpha=4, target_modules=["lin0"], modules_to_save=["head", "norm"], init_lora_weights=False)


def pair(second: dict = SECOND, seed: int = 1) -> tuple[nn.Module, nn.Module]:
    """(PEFT model, minilora model): "default" (FIRST), then "other" (``second``) added, same seeds."""
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**FIRST))
    theirs.add_adapter("other", peft.LoraConfig(**second))
    torch.manual_seed(seed)
    ours = minilora.inject(base(), LoraConfig(**FIRST))
    minilora.add_adapter(ours, "other", LoraConfig(**second))
    return theirs, ours


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key.removeprefix(PREFIX): value for key, value in model.state_dict().items() if ".lora_merged." not in key}


def trainable(model: nn.Module) -> list[str]:
    return sorted(name.removeprefix(PREFIX) for name, param in model.named_parameters() if param.requires_grad)


def assert_same(theirs: nn.Module, ours: nn.Module) -> None:
    """Same keys, values, trainable names and outputs."""
    theirs_state, ours_state = state(theirs), state(ours)
    assert sorted(theirs_state) == sorted(ours_state)
    assert [key for key in ours_state if not torch.equal(theirs_state[key], ours_state[key])] == []
    assert trainable(theirs) == trainable(ours)
    with torch.no_grad():
        assert torch.equal(theirs(X), ours(X))


def set_both(theirs: nn.Module, ours: nn.Module, names) -> None:
    theirs.base_model.set_adapter(names)  # (PeftModel.set_adapter takes one name only)
    minilora.set_adapter(ours, names)


def test_added_adapter_gets_its_own_copies_as_peft():
    """A new adapter's copies are copies of the original, frozen, and unused until it is set."""
    theirs, ours = pair()
    assert_same(theirs, ours)
    assert sorted(ours.head.modules_to_save) == ["default", "other"] and list(ours.norm.modules_to_save) == ["other"]
    assert ours.head.active_adapters == ["default"] and ours.norm.active_adapters == []
    for name in ("other", "default", "other"):
        set_both(theirs, ours, name)
        assert_same(theirs, ours)


def test_each_adapter_trains_its_own_copy_as_peft():
    theirs, ours = pair()
    for name in ("other", "default"):
        set_both(theirs, ours, name)
        for model in (theirs, ours):
            model.train()
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
            model(X).square().mean().backward()
            optimizer.step()
            model.eval()
        assert_same(theirs, ours)
    assert not torch.equal(ours.head.modules_to_save["default"].weight, ours.head.modules_to_save["other"].weight)
    assert torch.equal(ours.head.original_module.weight, base().head.weight), "the original never trains"


def test_two_active_copies_of_one_module_are_refused_as_peft():
    """Both adapters copy ``head``: forward could run only one of them, so PEFT raises; so does minilora,
    before anything changes."""
    theirs, ours = pair()
    message = "Only one adapter can be set at a time for ModulesToSaveWrapper"  # PEFT's words (its tests match them)
    with pytest.raises(ValueError, match=message):
        theirs.base_model.set_adapter(["default", "other"])
    check = record_model(ours)
    with pytest.raises(MiniLoraError, match=message):
        minilora.set_adapter(ours, ["default", "other"])
    check()


def test_two_active_adapters_with_separate_modules_to_save():
    theirs, ours = pair(second=dict(SECOND, modules_to_save=["norm"]))
    set_both(theirs, ours, ["default", "other"])
    assert ours.head.active_adapters == ["default"] and ours.norm.active_adapters == ["other"]
    assert_same(theirs, ours)


@pytest.mark.parametrize("deleted", ["default", "other"])
def test_delete_adapter_removes_its_copies_as_peft(deleted):
    theirs, ours = pair()
    set_both(theirs, ours, "other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's and minilora's "was active, now ..." notice
        theirs.delete_adapter(deleted)
        minilora.delete_adapter(ours, deleted)
    assert_same(theirs, ours)
    assert deleted not in ours.head.modules_to_save and deleted not in ours.norm.modules_to_save
    assert isinstance(ours.norm, ModulesToSave)  # kept without copies, as PEFT keeps its wrapper


def test_files_with_several_adapters_load_both_ways(tmp_path):
    """Each adapter's file holds its own copies under the module's name (``head.weight``)."""
    theirs, ours = pair()
    with torch.no_grad():
        for model in (theirs, ours):  # trained copies, different per adapter
            for module in model.modules():
                if isinstance(module, ModulesToSave) or type(module).__name__ == "ModulesToSaveWrapper":
                    for index, copy_ in enumerate(module.modules_to_save.values()):
                        for param in copy_.parameters():
                            param.add_(0.25 * (index + 1))
    theirs.save_pretrained(tmp_path / "peft")
    minilora.save_adapters(ours, tmp_path / "mini")
    for directory in ("peft", "mini"):
        from safetensors.torch import load_file
        keys = sorted(load_file(tmp_path / directory / "other" / "adapter_model.safetensors"))
        assert [key for key in keys if ".lora_" not in key] == [f"{PREFIX}head.bias", f"{PREFIX}head.weight",
                                                               f"{PREFIX}norm.bias", f"{PREFIX}norm.weight"]
    for source in ("peft", "mini"):
        theirs_loaded = peft.PeftModel.from_pretrained(base(), tmp_path / source)
        theirs_loaded.load_adapter(tmp_path / source / "other", adapter_name="other")
        ours_loaded = minilora.load_adapter(base(), tmp_path / source)
        minilora.load_adapter(ours_loaded, tmp_path / source / "other", adapter_name="other")
        for name in ("default", "other"):
            set_both(theirs_loaded, ours_loaded, name)
            set_both(theirs, ours, name)
            with torch.no_grad():
                assert torch.equal(theirs_loaded(X), ours_loaded(X)), (source, name)
                assert torch.equal(ours_loaded(X), ours(X)), (source, name)


@pytest.mark.parametrize("active", ["default", "other"])
def test_merge_and_unload_keeps_the_active_copy_as_peft(active):
    theirs, ours = pair(second=dict(SECOND, modules_to_save=["norm"]))
    with torch.no_grad():
        ours.norm.modules_to_save["other"].weight.add_(1.0)
        theirs.base_model.model.norm.modules_to_save["other"].weight.add_(1.0)
    set_both(theirs, ours, active)
    plain, ours_plain = theirs.merge_and_unload(), minilora.merge_and_unload(ours)
    assert {k: type(m) for k, m in plain.named_modules()} == {k: type(m) for k, m in ours_plain.named_modules()}
    assert all(torch.equal(v, ours_plain.state_dict()[k]) for k, v in plain.state_dict().items())
    assert torch.equal(ours_plain.norm.weight, base().norm.weight) == (active == "default")


def test_layer_status_of_the_wrappers_as_peft():
    theirs, ours = pair()
    set_both(theirs, ours, "other")
    peft_rows = [row for row in theirs.get_layer_status() if row.module_type == "ModulesToSaveWrapper"]
    ours_rows = [row for row in minilora.layer_status(ours) if row.module_type == "ModulesToSaveWrapper"]
    assert len(ours_rows) == 2
    for row, peft_row in zip(ours_rows, peft_rows):
        peft_names = {"name": peft_row.name.removeprefix("model.")}  # (PEFT's names start at its LoraModel)
        assert dataclasses.asdict(row) == {**dataclasses.asdict(peft_row), **peft_names}


def test_mixed_batch_rows_through_the_wrapper_as_peft():
    """Each row runs its adapter's copy, "__base__" rows the original (PEFT's _mixed_batch_forward)."""
    theirs, ours = pair()
    with torch.no_grad():
        for model in (theirs.base_model.model, ours):
            model.head.modules_to_save["other"].weight.add_(1.0)
    names = ["other", "__base__", "default", "other", "__base__", "default"]
    h = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    ours.head.mixed_rows = row_groups(names)
    try:
        with torch.no_grad():
            got = ours.head(h)
    finally:
        ours.head.mixed_rows = None
    with torch.no_grad():
        expected = theirs.base_model.model.head(h, adapter_names=names)
        rows = [(ours.head.original_module if n == "__base__" else ours.head.modules_to_save[n])(h[i:i + 1])
                for i, n in enumerate(names)]
    assert torch.equal(got, expected)
    assert torch.allclose(got, torch.cat(rows), atol=1e-6)  # each row as if alone (batch size may reorder sums)


def test_mixed_batch_through_a_wrapper_errors_as_peft():
    """PEFT raises TypeError for a module type it cannot split by rows, KeyError for an adapter without a copy."""
    theirs, ours = pair(second=dict(SECOND, modules_to_save=["norm"]))
    names = ["other", "default", "__base__"]
    for module, peft_module, x, error, message in (
            (ours.norm, theirs.base_model.model.norm, torch.randn(3, 3), TypeError, "Mixed batching is only supported"),
            (ours.head, theirs.base_model.model.head, torch.randn(3, 8), KeyError, "no copy")):
        with pytest.raises(error, match=message if error is TypeError else None):
            peft_module(x, adapter_names=names)
        module.mixed_rows = row_groups(names)
        try:
            with pytest.raises(MiniLoraError, match=message) as raised:
                module(x)
            assert isinstance(raised.value, error) or error is KeyError  # (TypeError: PEFT's type as well)
        finally:
            module.mixed_rows = None


def test_copy_is_deep_and_independent_of_the_original():
    ours = minilora.inject(base(), LoraConfig(**FIRST))
    minilora.add_adapter(ours, "other", LoraConfig(**SECOND))
    copies = [ours.head.original_module, *ours.head.modules_to_save.values()]
    assert len({id(module.weight) for module in copies}) == 3
    assert all(torch.equal(module.weight, copies[0].weight) for module in copies)
    assert copy.deepcopy(ours.head).active_adapters == ["default"]


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("first_trainable", [False, True])
def test_loaded_adapter_trains_its_copies_as_peft(tmp_path, first_trainable, is_trainable):
    """load_adapter of a new adapter: its A, B and modules_to_save copies train iff ``is_trainable`` (PEFT
    0.21.2; it is not active, so it changes no output), the adapters already there keep their state."""
    _, ours = pair()
    minilora.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path, is_trainable=first_trainable)
    theirs.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    ours = minilora.load_adapter(base(), tmp_path, is_trainable=first_trainable)
    minilora.load_adapter(ours, tmp_path, adapter_name="other", is_trainable=is_trainable)
    assert trainable(theirs) == trainable(ours)
    assert ("head.modules_to_save.other.weight" in trainable(ours)) == is_trainable


def test_peft_walks_the_wrapper_tables_by_peft_s_names():
    """PEFT's code (and tests) read ``adapter_layer_names`` to find each adapter's copy and its requires_grad."""
    theirs, ours = pair()
    for wrapper, peft_wrapper in ((ours.head, theirs.base_model.model.head), (ours.norm, theirs.base_model.model.norm)):
        assert wrapper.adapter_layer_names == peft_wrapper.adapter_layer_names
        for table in wrapper.adapter_layer_names:
            assert grads(getattr(wrapper, table)) == grads(getattr(peft_wrapper, table))


def grads(modules: nn.ModuleDict) -> dict[str, list[bool]]:
    return {name: [param.requires_grad for param in module.parameters()] for name, module in modules.items()}


@pytest.mark.parametrize("modules_to_save", [["head"], None])
def test_set_adapter_of_no_adapter_is_refused_where_peft_refuses_it(modules_to_save):
    """PEFT's LoraModel.set_adapter([]) fails where the model has a modules_to_save wrapper ("Please specify at
    least one adapter to set", its ModulesToSaveWrapper.check_set_adapter; after changing the LoRA layers);
    minilora made no adapter active. Now a MiniLoraError in PEFT's words, before any change; without such a
    module both make none active."""
    answers = []
    for lib in (peft, compat):
        torch.manual_seed(0)
        model = lib.get_peft_model(base(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=modules_to_save))
        try:
            model.base_model.set_adapter([])
            answers.append(("ran", list(model.base_model.active_adapters)))
        except ValueError as error:
            answers.append(("refused", str(error).split(" (PEFT's words)")[0], list(model.base_model.active_adapters)))
    if modules_to_save:
        assert answers[0][:2] == answers[1][:2] == ("refused", "Please specify at least one adapter to set")
        assert answers[1][2] == ["default"]  # minilora: unchanged (PEFT's LoRA layers changed before it failed)
    else:
        assert answers[0] == answers[1] == ("ran", [])
