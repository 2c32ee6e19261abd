"""The model everything runs on by default, and how to load a saved model of any architecture.

Weights cannot be downloaded here, so the default is GPT-2 small built from ``GPT2Config()`` with
a fixed seed: the same architecture and parameter counts as the pretrained ``gpt2`` (124,439,808
parameters), random values. Users with real weights pass a hub name or a local directory.
"""

from __future__ import annotations

import os
import urllib.parse

import torch
from torch import nn

from .config import MiniLoraError

DEFAULT_MODEL = "default"  # the name that means "GPT-2 small, random init, fixed seed"
DEFAULT_SEED = 0


TINY_GPT2 = dict(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=64, bos_token_id=63, eos_token_id=63)


def tiny_gpt2(seed: int = 0, **config_overrides) -> nn.Module:
    """GPT2LMHeadModel at toy size (2 blocks, width 32, vocab 64): GPT-2's Conv1D layers and tied
    embeddings, built in milliseconds, in eval mode. For tests and quick runs where GPT-2 small's
    size is not the point. Keyword arguments override GPT2Config fields (e.g. n_embd=64)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**{**TINY_GPT2, **config_overrides}))
    return model.eval()


def load_model(name_or_path: str | None = None, seed: int = DEFAULT_SEED, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> nn.Module:
    """A transformers model in eval mode: the embedded GPT-2 small, or the saved model's own class.

    Args:
        name_or_path: None or "default" for the embedded random GPT-2 small (GPT2LMHeadModel);
            otherwise a hub name (``"gpt2"`` if cached) or a local directory, loaded as the class its
            config.json names (``model_class``): a T5ForConditionalGeneration comes back as one, a
            BertForMaskedLM as a BertForMaskedLM.
        seed: the seed of the random init (default model only).
        dtype: cast the model to this dtype.
        device: where to put it; None leaves it where it was built (torch's default device).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if name_or_path in (None, DEFAULT_MODEL):
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(GPT2Config())
    else:
        model = _from_pretrained(name_or_path)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def model_class(name_or_path: str) -> type:
    """The transformers class a saved model's config names (``config.architectures[0]``, which
    ``save_pretrained`` records), or ``AutoModelForCausalLM`` for a config that names none.

    Raises:
        MiniLoraError: if the config names a class this transformers does not have (custom code).
        OSError / ValueError: from transformers, for a missing or unreadable config.json.
    """
    import transformers

    architectures = transformers.AutoConfig.from_pretrained(name_or_path).architectures or []
    if not architectures:
        return transformers.AutoModelForCausalLM
    cls = getattr(transformers, architectures[0], None)
    if not isinstance(cls, type):
        raise MiniLoraError(
            f"{name_or_path!r}: config.json names the class {architectures[0]!r}, which transformers "
            f"{transformers.__version__} does not have (custom modelling code?). Load the model yourself and "
            "use the Python API: minilora.load_adapter(model, directory)."
        )
    return cls


def _from_pretrained(name_or_path: str) -> nn.Module:
    """``model_class(...).from_pretrained`` for a local directory, or a hub name from the cache; without a
    cached copy, the hub is asked only if it can be reached, so that an offline machine gets an answer
    in seconds (transformers alone retries for about a minute)."""

    def load(**kwargs):
        try:
            return model_class(name_or_path).from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as error:  # missing files; a config.json transformers can't read
            raise MiniLoraError(
                f"Could not load model {name_or_path!r}: {error}\nPass a local directory that holds "
                "config.json and the weights, or leave --model out to use the embedded default."
            ) from error

    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise MiniLoraError(f"Model path {name_or_path!r} is a file; pass the directory that holds config.json "
                                "and the weights (what save_pretrained wrote).")
        return load()
    if os.path.isabs(path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1 \
            or "\\" in name_or_path:
        raise MiniLoraError(f"Model path {name_or_path!r} does not exist. Pass an existing local directory that holds "
                            "config.json and the weights, or a Hugging Face hub name such as gpt2.")
    from huggingface_hub import constants, try_to_load_from_cache

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if not constants.HF_HUB_OFFLINE and _reachable(host):
        return load()
    cached = try_to_load_from_cache(name_or_path, "config.json")  # a path in the cache's snapshot, or not
    if isinstance(cached, str):
        name_or_path = os.path.dirname(cached)  # a local directory: no network calls (and no retries)
        return load()
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{host} cannot be reached from here"
    raise MiniLoraError(
        f"Model {name_or_path!r} is not in your Hugging Face cache, and {why}. Download it on a machine with "
        f"network access (huggingface-cli download {name_or_path}) and copy the cache, or pass a local "
        "directory with config.json and the weights, or leave --model out to use the embedded default."
    )


def _reachable(host: str, seconds: float = 3.0) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``seconds`` (name lookup included)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=seconds).close()
        return True
    except OSError:
        return False
