"""Tiny random builds of the architectures PEFT users run: the parity suite's architecture axis.

Each ``Architecture`` names a transformers ``model_type``, the model class a user would load for
it, and the config fields that make it tiny (width 32, 2 layers, vocabulary 128). ``build`` makes
the model from its config with a fixed seed: no download, a few milliseconds each. ``inputs``
gives a small batch the model accepts (token ids, decoder ids, pixels or audio features).

The sizes are chosen to be tiny, not realistic: what the checks compare (which layers PEFT picks,
same-seed adapters, outputs, files) does not depend on width or depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

# Fields most transformers configs accept directly or through their attribute_map.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Encoder-decoder models name their sizes per stack.
SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=0)
T5_SIZES = dict(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2,
                relative_attention_num_buckets=8, decoder_start_token_id=0)
BERT_LIKE = dict(type_vocab_size=2)

VOCAB = TINY["vocab_size"]


@dataclass(frozen=True)
class Architecture:
    """One architecture: its model_type, the class users load, and the config overrides that make it tiny.

    ``kind`` says what it eats: "causal" (input_ids, and generate()), "masked" (input_ids),
    "seq2seq" (input_ids + decoder_input_ids, and generate()), "vision" (pixel_values),
    "speech" (input_features + decoder_input_ids, and generate()).
    """

    name: str
    model_type: str
    class_name: str
    kind: str = "causal"
    overrides: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()  # TINY fields this config refuses (e.g. a read-only property)

    def config(self):
        from transformers import AutoConfig

        fields = {k: v for k, v in TINY.items() if k not in self.drop}
        return AutoConfig.for_model(self.model_type, **{**fields, **self.overrides})

    def build(self, seed: int = 0) -> nn.Module:
        """The tiny model with random weights (seed ``seed``), in eval mode, on the CPU in float32."""
        import transformers

        config = self.config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = getattr(transformers, self.class_name)(config)
        return model.eval()

    def inputs(self, seed: int = 0, batch: int = 2, tokens: int = 8) -> dict[str, torch.Tensor]:
        """A small batch for ``model(**inputs)``; the same seed gives the same batch."""
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (batch, tokens), generator=generator)
        if self.kind in ("causal", "masked"):
            return {"input_ids": ids}
        if self.kind == "seq2seq":
            decoder = torch.randint(3, VOCAB, (batch, tokens // 2), generator=generator)
            return {"input_ids": ids, "decoder_input_ids": decoder}
        if self.kind == "vision":
            size = self.overrides["image_size"]
            return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
        if self.kind == "speech":
            frames = 2 * self.overrides["max_source_positions"]
            features = torch.randn(batch, self.overrides["num_mel_bins"], frames, generator=generator)
            decoder = torch.randint(3, VOCAB, (batch, tokens // 2), generator=generator)
            return {"input_features": features, "decoder_input_ids": decoder}
        raise ValueError(f"unknown kind {self.kind!r}")

    @property
    def generates(self) -> bool:
        """True when ``model.generate`` applies (a decoder that produces tokens)."""
        return self.kind in ("causal", "seq2seq", "speech")


def _causal(name: str, model_type: str, class_name: str, **overrides) -> Architecture:
    return Architecture(name, model_type, class_name, "causal", overrides)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    # decoder-only language models
    _causal("llama", "llama", "LlamaForCausalLM"),
    _causal("mistral", "mistral", "MistralForCausalLM"),
    _causal("qwen2", "qwen2", "Qwen2ForCausalLM"),
    _causal("qwen3", "qwen3", "Qwen3ForCausalLM"),
    _causal("gemma", "gemma", "GemmaForCausalLM"),
    _causal("gemma2", "gemma2", "Gemma2ForCausalLM"),
    _causal("gemma3", "gemma3_text", "Gemma3ForCausalLM"),
    _causal("phi", "phi", "PhiForCausalLM"),
    _causal("phi3", "phi3", "Phi3ForCausalLM"),
    _causal("stablelm", "stablelm", "StableLmForCausalLM"),
    _causal("opt", "opt", "OPTForCausalLM", ffn_dim=64, word_embed_proj_dim=32),
    _causal("gpt_neox", "gpt_neox", "GPTNeoXForCausalLM"),
    _causal("gpt_neo", "gpt_neo", "GPTNeoForCausalLM", attention_types=[[["global", "local"], 1]], window_size=16),
    _causal("gptj", "gptj", "GPTJForCausalLM", rotary_dim=8),
    _causal("gpt_bigcode", "gpt_bigcode", "GPTBigCodeForCausalLM"),
    _causal("codegen", "codegen", "CodeGenForCausalLM", rotary_dim=8, n_ctx=64),
    Architecture("falcon", "falcon", "FalconForCausalLM", drop=("head_dim",)),
    _causal("bloom", "bloom", "BloomForCausalLM"),
    _causal("mpt", "mpt", "MptForCausalLM"),
    _causal("gpt2", "gpt2", "GPT2LMHeadModel"),
    _causal("olmo", "olmo", "OlmoForCausalLM"),
    _causal("olmo2", "olmo2", "Olmo2ForCausalLM"),
    _causal("starcoder2", "starcoder2", "Starcoder2ForCausalLM"),
    _causal("granite", "granite", "GraniteForCausalLM"),
    _causal("cohere", "cohere", "CohereForCausalLM"),
    _causal("biogpt", "biogpt", "BioGptForCausalLM"),
    _causal("mixtral", "mixtral", "MixtralForCausalLM", num_local_experts=2, num_experts_per_tok=1),
    _causal("gemma4", "gemma4_text", "Gemma4ForCausalLM", vocab_size_per_layer_input=128,
            hidden_size_per_layer_input=16, sliding_window=16),
    # encoders (masked language models), PEFT's SEQ_CLS / TOKEN_CLS bases
    Architecture("bert", "bert", "BertForMaskedLM", "masked", BERT_LIKE),
    Architecture("roberta", "roberta", "RobertaForMaskedLM", "masked", BERT_LIKE),
    Architecture("xlm-roberta", "xlm-roberta", "XLMRobertaForMaskedLM", "masked", BERT_LIKE),
    Architecture("electra", "electra", "ElectraForMaskedLM", "masked", dict(embedding_size=32)),
    Architecture("deberta-v2", "deberta-v2", "DebertaV2ForMaskedLM", "masked"),
    Architecture("deberta", "deberta", "DebertaForMaskedLM", "masked"),
    Architecture("distilbert", "distilbert", "DistilBertForMaskedLM", "masked", dict(hidden_dim=64)),
    Architecture("modernbert", "modernbert", "ModernBertForMaskedLM", "masked",
                 dict(cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2, local_attention=16)),
    Architecture("albert", "albert", "AlbertForMaskedLM", "masked", dict(embedding_size=16)),
    # encoder-decoders
    Architecture("t5", "t5", "T5ForConditionalGeneration", "seq2seq", T5_SIZES),
    Architecture("mt5", "mt5", "MT5ForConditionalGeneration", "seq2seq", T5_SIZES),
    Architecture("umt5", "umt5", "UMT5ForConditionalGeneration", "seq2seq", T5_SIZES),
    Architecture("longt5", "longt5", "LongT5ForConditionalGeneration", "seq2seq", T5_SIZES),
    Architecture("switch_transformers", "switch_transformers", "SwitchTransformersForConditionalGeneration",
                 "seq2seq", {**T5_SIZES, "num_experts": 2, "num_sparse_encoder_layers": 1,
                             "num_sparse_decoder_layers": 1}),
    Architecture("bart", "bart", "BartForConditionalGeneration", "seq2seq", SEQ2SEQ),
    Architecture("mbart", "mbart", "MBartForConditionalGeneration", "seq2seq", SEQ2SEQ),
    Architecture("pegasus", "pegasus", "PegasusForConditionalGeneration", "seq2seq", SEQ2SEQ),
    Architecture("whisper", "whisper", "WhisperForConditionalGeneration", "speech",
                 {**SEQ2SEQ, "num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 32,
                  "decoder_start_token_id": 1, "suppress_tokens": None, "begin_suppress_tokens": None}),
    # vision
    Architecture("vit", "vit", "ViTForImageClassification", "vision", dict(image_size=16, patch_size=8)),
]}


def resolve(names: str) -> list[Architecture]:
    """``"llama,bert"`` -> those architectures; ``"all"`` -> every one in the table.

    Raises:
        ValueError: naming the unknown architectures and listing the known ones.
    """
    if names.strip() == "all":
        return list(ARCHITECTURES.values())
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in ARCHITECTURES]
    if unknown or not wanted:
        raise ValueError(f"unknown architecture(s) {unknown or names!r}; known: {', '.join(ARCHITECTURES)} (or all)")
    return [ARCHITECTURES[name] for name in wanted]


def find(name: str) -> Optional[Architecture]:
    return ARCHITECTURES.get(name)
