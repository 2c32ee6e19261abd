"""What every probe shares: the registry (``@probe``), PEFT-model builders that work in every release,
and the short forms of errors and warnings that become a probe's answer.

The probes themselves live in ``probes.py`` (files, init, the pitfalls), ``probes_adapters.py``
(several adapters, weighted adapters, mixed batches, merge/unmerge, train/eval mode) and
``probes_targets.py`` (default targets per architecture, "all-linear"). Each runs in the virtual
environment of one PEFT release, so it may touch only APIs that release has; where a release lacks
one, the probe answers ``absent (...)`` rather than raising.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

import minilora
from parity import twins
from parity.behaviours import NOISE, _short  # the same warning filter as the behaviours check

PROBES: dict[str, str] = {}  # name -> the question it answers (filled by @probe, in registration order)
FUNCTIONS: dict[str, Callable] = {}  # name -> the function that answers it

IDS = torch.arange(12).reshape(2, 6)


def probe(question: str) -> Callable:
    def register(function: Callable) -> Callable:
        PROBES[function.__name__] = question
        FUNCTIONS[function.__name__] = function
        return function
    return register


def warnings_said(caught: list) -> list[str]:
    """The first line of each warning caught, cut to 100 characters, without deprecation noise."""
    lines = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    return [line[:100] for line in lines if not any(word in line for word in NOISE)]


def short(error: BaseException) -> str:
    return _short(error)


def absent(error: BaseException) -> str:
    """The answer for an API a release does not have: ``absent (AttributeError: ...)``."""
    return f"absent ({_short(error)})"


def peft_model(base, **fields):
    """``peft.get_peft_model`` on a copy of ``base``, seeded, from minilora's config fields."""
    import peft

    torch.manual_seed(0)
    return peft.get_peft_model(copy.deepcopy(base), twins.peft_config(minilora.LoraConfig(**fields)))


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits
