"""Where PEFT raises or warns, minilora.compat says PEFT's words first (scripts and tests match them),
then its own explanation. Each case runs PEFT 0.21.2 and compat on the same model and config."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

import minilora.compat as compat
from minilora import MiniLoraError


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 5)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(5, 3)
        self.head = nn.Sequential(nn.Linear(3, 3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.relu(self.lin0(x))))


def outcome(api, **fields):
    """(the error's message or None, the warnings' messages) of api.get_peft_model(MLP(), LoraConfig(**fields))."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            api.get_peft_model(MLP(), api.LoraConfig(**fields))
            error = None
        except ValueError as raised:  # (MiniLoraError is a ValueError, as PEFT's errors here)
            error = str(raised)
    return error, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("fields", [
    dict(target_modules=["lin0", "lin1", "relu", "head"], exclude_modules=["lin0", "lin1", "relu", "head"]),
    dict(target_modules=["no_such_layer"]),
    dict(target_modules=["no_such_layer"], layers_to_transform=[0], layers_pattern="head"),
    dict(target_modules=["lin0", "no_such_layer"], exclude_modules=["lin0"]),
    dict(target_modules=["head.0"], modules_to_save=["head"]),
    dict(target_modules=".*lin9"),
], ids=["all-excluded", "not-found", "not-found-layers", "excluded-and-unmatched", "only-saved", "regex"])
def test_nothing_targeted_starts_with_pefts_words(fields):
    theirs, _ = outcome(peft, **fields)
    ours, _ = outcome(compat, **fields)
    assert theirs is not None and ours is not None
    # PEFT's message, sets printed in their order: compare up to the set, then the rest after it
    words = theirs.split("{")[0]
    assert ours.startswith(words), (ours, theirs)
    assert ours.startswith(theirs) or "{" in theirs, (ours, theirs)
    with pytest.raises(MiniLoraError):
        compat.get_peft_model(MLP(), compat.LoraConfig(**fields))


@pytest.mark.parametrize("fields,warns", [
    (dict(target_modules=["lin1"], exclude_modules=["no_such_layer"]), True),
    (dict(target_modules=["lin1"], exclude_modules=["no_such_layer"], modules_to_save=["lin0"]), False),
    (dict(target_modules=["lin1"], exclude_modules=["lin0"]), False),  # used
])
def test_unused_exclude_modules_warns_as_peft(fields, warns):
    theirs, their_warnings = outcome(peft, **fields)
    ours, our_warnings = outcome(compat, **fields)
    assert theirs is None and ours is None
    assert our_warnings == their_warnings and bool(their_warnings) == warns
