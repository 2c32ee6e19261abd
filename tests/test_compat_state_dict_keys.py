"""get_peft_model_state_dict's keys follow the object passed, as PEFT's (its model.state_dict() keys):
a PeftModel, its LoraModel, or your own model after inject_adapter_in_model; and set_peft_model_state_dict
takes back what get gave for the same kind of object."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import minilora.compat as compat


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 6)
        self.linear = nn.Linear(6, 6)
        self.linear2 = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear(self.embedding(ids)))


def build(api, kind: str):
    config = api.LoraConfig(target_modules=["linear"], modules_to_save=["linear2"])
    if kind == "injected":
        return api.inject_adapter_in_model(config, Model())
    wrapped = api.get_peft_model(Model(), config)
    return wrapped if kind == "PeftModel" else wrapped.base_model


@pytest.mark.parametrize("kind", ["PeftModel", "LoraModel", "injected"])
def test_keys_and_round_trip_as_peft(kind):
    torch.manual_seed(0)
    theirs = build(peft, kind)
    torch.manual_seed(0)
    ours = build(compat, kind)
    their_state, our_state = peft.get_peft_model_state_dict(theirs), compat.get_peft_model_state_dict(ours)
    assert sorted(our_state) == sorted(their_state)
    for key in their_state:
        assert torch.equal(our_state[key], their_state[key]), key
    torch.manual_seed(0)  # the same base weights; the adapter then gets PEFT's tensors
    fresh = build(compat, kind)
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.fill_(0.5)  # (so that a key set_peft_model_state_dict misses shows)
    compat.set_peft_model_state_dict(fresh, their_state)
    ids = torch.tensor([[1, 4, 7]])
    assert torch.equal(fresh(ids), theirs(ids))
