"""The parity "adapters" check (parity/adapters.py): it passes on minilora as it is, and each of its
rows fails when the bug it looks for is planted in minilora (a planted-failure test per row)."""

from __future__ import annotations

import pytest
import minilora
from minilora import layer as layer_module
from minilora import mixed, multi, weighted
from parity import adapters, grid
from parity.results import FAIL, PASS

CASE = grid.Case("linear", r=4, lora_alpha=8, targets=grid.ALL_LINEAR)


@pytest.fixture(scope="module")
def bases():
    return grid.Bases()


def run(bases, tmp_path) -> dict[str, str]:
    pair = grid.make_pair(bases, CASE, "cpu")
    grid.randomize(pair)
    return {row.metric: row.status for row in adapters.check_adapters(pair, tmp_path)}


def test_all_rows_pass_on_minilora(bases, tmp_path):
    statuses = run(bases, tmp_path)
    assert len(statuses) == 9 and set(statuses.values()) == {PASS}, statuses


def _perturb_after(function, name: str, scale: float):
    """add_weighted_adapter, then adapter ``name``'s B scaled: a wrong combination."""
    def planted(model, adapters_, weights, adapter_name, *args, **kwargs):
        function(model, adapters_, weights, adapter_name, *args, **kwargs)
        if adapter_name == name:
            for _, layer in minilora.lora_layers(model):
                if name in layer.lora_A:
                    layer.lora_B[name].weight.data *= scale
    return planted


@pytest.mark.parametrize("metric, plant", [
    ("max rel err (added adapter A, B)",
     lambda mp: mp.setattr(layer_module.LoraLinear, "_init_adapter_weights",
                           _scaled_init(layer_module.LoraLinear._init_adapter_weights))),
    ("max rel err (two active adapters)",
     lambda mp: mp.setattr(layer_module.LoraLinear, "lora_update",
                           _scaled_update(layer_module.LoraLinear.lora_update, "other"))),
    ("max rel err (weighted cat A, B)",
     lambda mp: mp.setattr(minilora, "add_weighted_adapter",
                           _perturb_after(weighted.add_weighted_adapter, "weighted-cat", 1 + 1e-6))),
    ("max rel err (weighted linear A, B)",
     lambda mp: mp.setattr(minilora, "add_weighted_adapter",
                           _perturb_after(weighted.add_weighted_adapter, "weighted-linear", 1 + 1e-6))),
    ("max rel err (weighted svd dW)",
     lambda mp: mp.setattr(minilora, "add_weighted_adapter",
                           _perturb_after(weighted.add_weighted_adapter, "weighted-svd", 1 + 1e-3))),
    ("max rel err (mixed batch)",
     lambda mp: mp.setattr(mixed, "row_groups", lambda names: {name: [len(names) - 1 - i for i in rows]
                                                                for name, rows in _groups(names).items()})),
    ("several-adapter files",  # the default adapter written into a sub-folder: PEFT finds no adapter at the root
     lambda mp: mp.setattr(multi, "adapter_directory", lambda directory, name: multi.Path(directory) / name)),
    ("max rel err (merge_adapter W0)",
     lambda mp: mp.setattr(minilora, "merge", _merge_then_nudge(minilora.merge))),
    ("max rel err (unmerge_adapter W0)",
     lambda mp: mp.setattr(minilora, "unmerge", lambda model: _unmerge_all_but_last(model))),
])
def test_each_row_fails_on_its_planted_bug(bases, tmp_path, monkeypatch, metric, plant):
    plant(monkeypatch)
    statuses = run(bases, tmp_path)
    matching = {name: status for name, status in statuses.items() if name.startswith(metric) or metric in name}
    assert matching and set(matching.values()) == {FAIL}, statuses


def _groups(names):
    rows = {}
    for index, name in enumerate(names):
        rows.setdefault(name, []).append(index)
    return rows


def _scaled_init(function):
    def planted(self, adapter_name, init_lora_weights):
        function(self, adapter_name, init_lora_weights)
        if adapter_name == "other":
            self.lora_B[adapter_name].weight.data += 1e-3  # a different init for the added adapter
    return planted


def _scaled_update(function, name):
    def planted(self, x, adapter):
        out = function(self, x, adapter)
        return out * (1 + 1e-3) if adapter == name else out
    return planted


def _merge_then_nudge(function):
    def planted(model, safe=False, adapter_names=None):
        function(model, safe=safe, adapter_names=adapter_names)
        for _, layer in minilora.lora_layers(model):
            layer.base_layer.weight.data *= 1 + 1e-6
    return planted


def _unmerge_all_but_last(model):
    for _, layer in minilora.lora_layers(model):
        layer.merged_adapters = layer.merged_adapters[:-1]  # the last merged adapter stays in W0
        if layer.merged:
            layer.unmerge()
        layer.merged_adapters = []


def test_a_peft_release_without_mixed_batches_is_not_applicable_not_a_failure(bases, tmp_path, monkeypatch):
    """Before 0.10 PEFT passes adapter_names on to the model's forward, which raises a TypeError
    outside PEFT's code: the check must call that an N/A (the release lacks the feature), not a FAIL."""
    import peft
    from parity import twins

    monkeypatch.setattr(peft, "__version__", "0.9.0")
    pair = grid.make_pair(bases, CASE, "cpu")
    grid.randomize(pair)
    with pytest.raises(twins.UnsupportedByPeft, match="mixed batches"):
        adapters.check_adapters(pair, tmp_path)
