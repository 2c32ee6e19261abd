"""PEFT's custom-model LoRA cases (the shapes and configs of PEFT's tests/test_custom_models.py: an
MLP with nn.Linear layers, a model with an embedding and a GPT-2 Conv1D), each run operation by
operation with PEFT and with minilora.compat. After every operation the two must agree: trainable
names, state dicts, outputs (train mode with the same dropout draws, and eval), bitwise on the CPU.

Cases PEFT has that are out of minilora's scope (DoRA, Embedding targets, target_parameters) are
checked to be a MiniLoraError before anything changes.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from minilora import MiniLoraError, compat
from test_multi_adapter import state, trainable  # by minilora's keys; PEFT's without its wrapper's prefix


class MLP(nn.Module):
    """PEFT's test MLP: lin0 (10 -> 20), ReLU, dropout 0.5, lin1 (20 -> 2), log-softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x)))))


class EmbConv1D(nn.Module):
    """PEFT's test model with an embedding and a transformers Conv1D (GPT-2's layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(x))))))


MODELS = {"MLP": MLP, "EmbConv1D": EmbConv1D}
CASES = [
    ("MLP", {"target_modules": "lin0"}),
    ("MLP", {"target_modules": ["lin1"]}),
    ("MLP", {"target_modules": ["lin0", "lin1"]}),
    ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("MLP", {"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 3}}),
    ("MLP", {"target_modules": ["lin0", "lin1"], "bias": "lora_only"}),
    ("EmbConv1D", {"target_modules": ["conv1d", "lin0"], "lora_dropout": 0.1}),
]
OUT_OF_SCOPE = [
    ("MLP", {"target_modules": ["lin0"], "use_dora": True}, "use_dora"),
    ("EmbConv1D", {"target_modules": ["emb"]}, "Embedding"),
    ("EmbConv1D", {"target_modules": ["emb", "conv1d"]}, "Embedding"),
    ("MLP", {"target_parameters": ["lin0.weight"]}, "target_parameters"),
]


def inputs(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "MLP":
        return torch.randn(4, 10, generator=generator)
    return torch.randint(0, 100, (4, 10), generator=generator)  # 10 tokens: lin0 reads 10 features


class Both:
    """The same base and seed, wrapped by PEFT and by minilora.compat; ``do`` runs one operation on
    both (with the same random state) and ``check`` compares everything a test could look at."""

    def __init__(self, kind: str, config: dict) -> None:
        self.kind, self.x = kind, inputs(kind)
        torch.manual_seed(0)
        self.base = MODELS[kind]()
        self.models = {}
        for name, lib in (("peft", peft), ("mini", compat)):
            torch.manual_seed(2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.models[name] = lib.get_peft_model(copy.deepcopy(self.base),
                                                       lib.LoraConfig(init_lora_weights=False, **config))

    def do(self, step: str, operation) -> list:
        results = []
        for model in self.models.values():
            torch.manual_seed(3)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results.append(operation(model))
        return results

    def check(self, step: str) -> None:
        theirs, ours = self.models["peft"], self.models["mini"]
        assert trainable(theirs) == trainable(ours), step
        theirs_state, ours_state = state(theirs), state(ours)
        assert sorted(theirs_state) == sorted(ours_state), step
        assert all(torch.equal(theirs_state[k], ours_state[k]) for k in ours_state), step
        outputs = self.do(step, lambda model: model(self.x))  # the model's own mode (dropout draws alike)
        assert torch.equal(outputs[0], outputs[1]), f"{step}: outputs differ"


def _train_step(model: nn.Module) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(inputs_for(model)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def inputs_for(model: nn.Module) -> torch.Tensor:
    return inputs("EmbConv1D" if any(isinstance(m, nn.Embedding) for m in model.modules()) else "MLP")


@pytest.mark.parametrize("kind, config", CASES, ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(CASES)])
def test_operations_agree_with_peft(kind, config, tmp_path):
    both = Both(kind, config)
    both.check("get_peft_model")
    both.do("train step", _train_step)
    both.check("after a training step")
    both.do("eval", lambda model: model.eval())
    both.check("eval")
    both.do("merge_adapter", lambda model: model.merge_adapter())
    both.check("merge_adapter")
    both.do("unmerge_adapter", lambda model: model.unmerge_adapter())
    both.check("unmerge_adapter")
    outputs = both.do("disable_adapter", lambda model: _disabled_output(model, both.x))
    assert torch.equal(outputs[0], outputs[1]), "disable_adapter"
    both.check("after disable_adapter")
    if not config.get("modules_to_save") and config.get("bias", "none") == "none":
        second = {"target_modules": config["target_modules"], "r": 2, "init_lora_weights": False}
        both.do("add_adapter", lambda model: model.add_adapter("other", _config_for(model, second)))
        both.check("add_adapter")
        both.do("set_adapter", lambda model: model.set_adapter("other"))
        both.check("set_adapter other")
        both.do("delete_adapter", lambda model: model.delete_adapter("default"))
        both.check("delete_adapter default")
    both.do("save_pretrained", lambda model: model.save_pretrained(tmp_path / _name(model)))
    loaded_outputs = []
    for source, lib in (("mini", peft), ("peft", compat)):  # each reads the other's files
        adapter = list(both.models[source].peft_config)[0]  # "other" after delete_adapter("default")
        directory = tmp_path / source if adapter == "default" else tmp_path / source / adapter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = lib.PeftModel.from_pretrained(copy.deepcopy(both.base), directory, adapter_name=adapter)
        with torch.no_grad():
            loaded_outputs.append(loaded(both.x))
            # the saved model's W0 went through merge + unmerge (W0 + dW - dW: float32 rounding of W0 only)
            expected = both.models[source](both.x)
            assert (loaded_outputs[-1] - expected).abs().max() <= 1e-6, f"{source}'s files in the other library"
    assert torch.equal(loaded_outputs[0], loaded_outputs[1]), "PEFT reading minilora's files vs the reverse"
    plain = both.do("merge_and_unload", lambda model: model.merge_and_unload())
    assert torch.equal(plain[0](both.x), plain[1](both.x)), "merge_and_unload"
    assert [type(m).__name__ for m in plain[0].modules()] == [type(m).__name__ for m in plain[1].modules()]


def _disabled_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with model.disable_adapter():
        return model(x)


def _config_for(model: nn.Module, fields: dict):
    return (peft if isinstance(model, peft.PeftModel) else compat).LoraConfig(**fields)


def _name(model: nn.Module) -> str:
    return "peft" if isinstance(model, peft.PeftModel) else "mini"


@pytest.mark.parametrize("kind, config, what", OUT_OF_SCOPE, ids=[case[2] + str(i) for i, case in
                                                                   enumerate(OUT_OF_SCOPE)])
def test_out_of_scope_cases_are_a_minilora_error(kind, config, what):
    model = MODELS[kind]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MiniLoraError):
        compat.get_peft_model(model, compat.LoraConfig(**config))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
