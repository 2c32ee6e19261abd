"""Shared fixtures: the embedded GPT-2 (built once, copied per test) and the devices to test on."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import minilora  # noqa: E402

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


# Hypothesis: no per-example deadline (2 shared cores make timings noisy); a modest example count.
from hypothesis import settings  # noqa: E402

settings.register_profile("minilora", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("minilora")
