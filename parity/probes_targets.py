"""Probes about which layers PEFT adapts: its default targets per architecture, and "all-linear".

Each architecture is a tiny random model built from its config (no download), so the answer is what
``get_peft_model`` really wraps in that release. Where the release's transformers cannot build the
architecture (Mistral arrived in transformers 4.34), the answer is read from PEFT's own table
instead, and says so.
"""

from __future__ import annotations

import copy

import torch

from parity.probing import absent, probe

SIZES = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=32)


def _build(architecture: str):
    """A tiny random model of ``architecture``, or None where this transformers has no such model."""
    import transformers

    if architecture in ("llama", "mistral"):
        name = "Llama" if architecture == "llama" else "Mistral"
        if not hasattr(transformers, f"{name}Config"):
            return None
        config = getattr(transformers, f"{name}Config")(**SIZES, num_key_value_heads=2)
        return getattr(transformers, f"{name}ForCausalLM")(config)
    if architecture == "bert":
        return transformers.BertModel(transformers.BertConfig(**SIZES))
    if architecture == "t5":
        config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                       decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(config)
    raise ValueError(f"no tiny builder for {architecture}")


def _wrapped(model) -> str:
    """The last name part of every module PEFT gave LoRA to, sorted: ``q_proj,v_proj``."""
    return ",".join(sorted({name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}))


def _peft_table() -> dict:
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except ImportError:
        from peft.utils.other import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    return table


def default_targets_of(architecture: str) -> str:
    import peft
    import transformers

    torch.manual_seed(0)
    model = _build(architecture)
    if model is None:
        listed = _peft_table().get(architecture)
        return (f"no {architecture} in transformers {transformers.__version__}; PEFT's table: "
                + (",".join(sorted(listed)) if listed else "no entry"))
    try:
        return _wrapped(peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)))
    except Exception as error:  # noqa: BLE001 - no default for this architecture is an answer
        return f"raises {type(error).__name__}: {str(error).strip().splitlines()[0][:90]}"


@probe("which layers get LoRA when target_modules is not given (llama)")
def default_targets_llama(base) -> str:
    return default_targets_of("llama")


@probe("which layers get LoRA when target_modules is not given (mistral)")
def default_targets_mistral(base) -> str:
    return default_targets_of("mistral")


@probe("which layers get LoRA when target_modules is not given (bert)")
def default_targets_bert(base) -> str:
    return default_targets_of("bert")


@probe("which layers get LoRA when target_modules is not given (t5)")
def default_targets_t5(base) -> str:
    return default_targets_of("t5")


@probe('target_modules="all-linear" on a tiny Llama (and on GPT-2\'s Conv1D): which layers')
def all_linear(base) -> str:
    import peft

    answers = []
    for name, model in (("llama", _build("llama")), ("gpt2", base)):
        try:
            wrapped = _wrapped(peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")))
        except Exception as error:  # noqa: BLE001 - before "all-linear" existed it was read as a module name
            return absent(error)
        answers.append(f"{name}: {wrapped or 'nothing'}")
    return "; ".join(answers)
