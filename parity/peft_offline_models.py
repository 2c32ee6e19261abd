"""Offline stand-ins for the tiny hub models that PEFT's model test files load (``python -m parity peft-tests``).

PEFT's ``test_decoder_models.py``, ``test_encoder_decoder_models.py``, ``test_feature_extraction_models.py``
and ``test_seq_classifier.py`` start with ``AutoModelForCausalLM.from_pretrained(
"peft-internal-testing/tiny-random-OPTForCausalLM")`` and the like. There is no network here, so for
each hub id in ``STAND_INS`` a tiny random model of the same architecture is built instead:

    config  = the architecture's tiny config (parity/architectures.py: width 32, 2 layers, vocabulary 128)
    weights = the class's own initialisation under torch.manual_seed(seed_of(hub_id))   (a fork of the RNG)

It is saved once per process into a scratch folder (``materialize``), and ``from_pretrained`` of the hub
id (on any model class, an Auto class, ``AutoConfig`` or a config class) loads that folder instead
(``install``). transformers then does everything it does for a downloaded repository (``num_labels=11``,
``tie_word_embeddings=True``, ``dtype=...``, another head on the same checkpoint), and the model's
``name_or_path`` is set back to the hub id, as after a download, so PEFT's configs record the id.

Same id -> bitwise the same weights: in every call (the same files) and in both modes' processes (the
same seed, built on the CPU in float32). Ids not in the table are left alone (they fail offline, so
PEFT's own run fails them and the test is N/A). No tokenizer is stood in: the LoRA tests of these files
need none; a test that loads one fails with PEFT too (N/A, "fails with PEFT").
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parity.architectures import ARCHITECTURES


@dataclass(frozen=True)
class StandIn:
    """A hub id's stand-in: an architecture of parity/architectures.py, the class the repository holds,
    and config fields changed from that architecture's tiny config."""

    architecture: str
    class_name: str
    overrides: dict = field(default_factory=dict)


# Every hub id that PEFT's four model test files (v0.20.0) load for their LoRA tests, plus the two that
# only their prompt-learning tests use (Mistral, tiny-random-gpt2). Not stood in: tiny-Qwen3ForCausalLM and
# tiny-random-gemma4-E2B (prefix tuning only).
STAND_INS: dict[str, StandIn] = {
    # test_decoder_models.py
    "peft-internal-testing/tiny-random-OPTForCausalLM": StandIn("opt", "OPTForCausalLM"),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": StandIn("gpt2", "GPT2LMHeadModel"),
    "hf-internal-testing/tiny-random-gpt2": StandIn("gpt2", "GPT2LMHeadModel"),
    "peft-internal-testing/tiny-random-GPTJForCausalLM": StandIn("gptj", "GPTJForCausalLM"),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": StandIn("llama", "LlamaForCausalLM"),
    "peft-internal-testing/tiny-dummy-qwen2": StandIn("qwen2", "Qwen2ForCausalLM"),
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": StandIn("gemma3", "Gemma3ForCausalLM"),
    "hf-internal-testing/tiny-random-MistralForCausalLM": StandIn("mistral", "MistralForCausalLM"),
    # test_encoder_decoder_models.py
    "peft-internal-testing/tiny-random-T5ForConditionalGeneration-calibrated":
        StandIn("t5", "T5ForConditionalGeneration"),
    "peft-internal-testing/tiny-random-BartForConditionalGeneration": StandIn("bart", "BartForConditionalGeneration"),
    # test_feature_extraction_models.py (and test_encoder_decoder_models.py's token classifier on RobertaModel)
    "peft-internal-testing/tiny-random-BertModel": StandIn("bert", "BertModel"),
    "peft-internal-testing/tiny-random-RobertaModel": StandIn("roberta", "RobertaModel"),
    "peft-internal-testing/tiny-random-DebertaModel": StandIn("deberta", "DebertaModel"),
    "peft-internal-testing/tiny-random-DebertaV2Model": StandIn("deberta-v2", "DebertaV2Model"),
    # test_seq_classifier.py
    "peft-internal-testing/tiny-random-BertForSequenceClassification":
        StandIn("bert", "BertForSequenceClassification"),
    "peft-internal-testing/tiny-random-RobertaForSequenceClassification":
        StandIn("roberta", "RobertaForSequenceClassification"),
    "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": StandIn("llama", "LlamaForSequenceClassification"),
}


def seed_of(hub_id: str) -> int:
    """A seed from the id alone (not Python's salted hash): the same in every process."""
    return int.from_bytes(hashlib.sha256(hub_id.encode()).digest()[:4], "little")


def build(hub_id: str) -> torch.nn.Module:
    """The stand-in model for ``hub_id``: tiny, random (seeded from the id), float32, on the CPU.

    Raises:
        KeyError: ``hub_id`` is not in STAND_INS.
    """
    import transformers

    stand_in = STAND_INS[hub_id]
    architecture = ARCHITECTURES[stand_in.architecture]
    config = architecture.config()
    for name, value in stand_in.overrides.items():
        setattr(config, name, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(hub_id))
        model = getattr(transformers, stand_in.class_name)(config)
    return model.eval()


_folders: dict[str, str] = {}
_scratch: tempfile.TemporaryDirectory | None = None


def materialize(hub_id: str) -> str:
    """The folder holding ``hub_id``'s stand-in (config.json + model.safetensors), built on first use."""
    global _scratch
    if hub_id not in _folders:
        if _scratch is None:
            _scratch = tempfile.TemporaryDirectory(prefix="parity-offline-models-")
        folder = Path(_scratch.name, *hub_id.split("/"))
        build(hub_id).save_pretrained(folder)
        _folders[hub_id] = str(folder)
    return _folders[hub_id]


def used() -> list[str]:
    """The hub ids whose stand-ins this process has built, sorted."""
    return sorted(_folders)


def _known(name: object) -> bool:
    # a local folder of that name (a user's checkout of the repository) wins, as in transformers
    return isinstance(name, str) and name in STAND_INS and not os.path.isdir(name)


def _redirected(original, names_model: bool):
    """``original`` (a classmethod's function) loading the stand-in's folder for a known hub id."""

    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        if not _known(pretrained_model_name_or_path):
            return original(cls, pretrained_model_name_or_path, *args, **kwargs)
        hub_id = pretrained_model_name_or_path
        loaded = original(cls, materialize(hub_id), *args, **kwargs)
        # as after a download: the model and its config are named by the hub id
        configs = [loaded[0] if isinstance(loaded, tuple) else loaded]
        if names_model:
            configs = [getattr(configs[0], "config", None)]
            if hasattr(loaded, "name_or_path"):
                loaded.name_or_path = hub_id
        for config in configs:
            if config is not None and hasattr(config, "_name_or_path"):
                config._name_or_path = hub_id
        return loaded

    from_pretrained.__wrapped__ = original
    return from_pretrained


def install() -> list[str]:
    """Make ``from_pretrained`` of every hub id in STAND_INS load its stand-in; the methods replaced."""
    from transformers import AutoConfig, PreTrainedModel
    from transformers.configuration_utils import PreTrainedConfig
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    replaced = []
    for owner, names_model in ((PreTrainedModel, True), (_BaseAutoModelClass, True), (PreTrainedConfig, False),
                               (AutoConfig, False)):
        original = owner.__dict__["from_pretrained"].__func__
        owner.from_pretrained = classmethod(_redirected(original, names_model))
        replaced.append(f"{owner.__module__}.{owner.__qualname__}.from_pretrained")
    return replaced
