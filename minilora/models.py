"""The model everything runs on by default, and how to use real GPT-2 weights instead.

Weights cannot be downloaded here, so the default is GPT-2 small built from ``GPT2Config()`` with
a fixed seed: the same architecture and parameter counts as the pretrained ``gpt2`` (124,439,808
parameters), random values. Users with real weights pass a hub name or a local directory.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MiniLoraError

DEFAULT_MODEL = "default"  # the name that means "GPT-2 small, random init, fixed seed"
DEFAULT_SEED = 0


def load_model(name_or_path: str | None = None, seed: int = DEFAULT_SEED, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> nn.Module:
    """A GPT2LMHeadModel in eval mode.

    Args:
        name_or_path: None or "default" for the embedded random GPT-2 small; otherwise anything
            ``transformers.AutoModelForCausalLM.from_pretrained`` accepts (``"gpt2"`` if cached, a
            local directory).
        seed: the seed of the random init (default model only).
        dtype: cast the model to this dtype.
        device: where to put it; None leaves it where it was built (torch's default device).
    """
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if name_or_path in (None, DEFAULT_MODEL):
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(GPT2Config())
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:  # missing files; a config.json transformers can't read
            raise MiniLoraError(
                f"Could not load model {name_or_path!r}: {error}\nPass a local directory that holds "
                "config.json and the weights, or leave --model out to use the embedded default."
            ) from error
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()
