"""Shared fixtures: the embedded GPT-2 (built once, copied per test) and the devices to test on."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import minilora  # noqa: E402
from minilora.models import tiny_gpt2 as tiny_gpt2_model  # noqa: E402

CUDA_REASON = "cuda: not available"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)),
]


@pytest.fixture(scope="session")
def _gpt2_pristine():
    return minilora.load_model()


@pytest.fixture
def gpt2(_gpt2_pristine):
    """A fresh copy of the embedded random GPT-2 small (eval mode, float32, CPU)."""
    return copy.deepcopy(_gpt2_pristine)


@pytest.fixture
def gpt2_pair(_gpt2_pristine):
    """Two independent copies of the same GPT-2: one for minilora, one for PEFT."""
    return copy.deepcopy(_gpt2_pristine), copy.deepcopy(_gpt2_pristine)


make_tiny_gpt2 = tiny_gpt2_model  # GPT-2 at toy size, eval mode: see minilora.models.tiny_gpt2


@pytest.fixture
def tiny_gpt2():
    """A fresh ``make_tiny_gpt2()``."""
    return make_tiny_gpt2()


def record_model(model):
    """``check = record_model(model)``; ``check()`` asserts the model is exactly as recorded: module
    names and types, every state_dict tensor (bitwise), requires_grad, train/eval mode, and its
    attribute names (e.g. the minilora config). For "a failed call leaves the model as it was"."""

    def state(m):
        return ([(n, type(x)) for n, x in m.named_modules()],
                {k: v.detach().clone() for k, v in m.state_dict().items()},
                {n: p.requires_grad for n, p in m.named_parameters()},
                m.training, [(name, id(config)) for name, config in getattr(m, "minilora_configs", {}).items()],
                sorted(vars(m)))

    before = state(model)

    def check():
        after = state(model)
        assert after[0] == before[0], "module names or types changed"
        assert after[1].keys() == before[1].keys(), "state_dict keys changed"
        changed = [k for k in before[1] if not torch.equal(after[1][k], before[1][k])]
        assert not changed, f"tensors changed: {changed[:5]}"
        assert after[2] == before[2], "requires_grad changed"
        assert after[3] == before[3], "train/eval mode changed"
        assert after[4] == before[4], "minilora_configs changed"
        assert after[5] == before[5], "model attributes changed"

    return check


@pytest.fixture
def unchanged():
    """The fixture form of ``record_model``: ``check = unchanged(model)``, later ``check()``."""
    return record_model


# Hypothesis: no per-example deadline (2 shared cores make timings noisy); a modest example count.
from hypothesis import settings  # noqa: E402

settings.register_profile("minilora", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("minilora")


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is several times faster on shared cores. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
