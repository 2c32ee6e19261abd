"""merge_and_unload and ``config.tie_word_embeddings`` (minilora/tied_config.py), against PEFT 0.21.

After merge_and_unload the output embedding can hold a weight of its own (a trained ``modules_to_save``
copy of lm_head; W0 + dW of a LoRA on a tied lm_head). PEFT then sets ``tie_word_embeddings=False``.
minilora does the same where the flag ties only the output embedding (GPT-2, BERT, ...: PEFT's config,
PEFT's warning, PEFT's outputs), and keeps it where the flag also ties the encoder/decoder embeddings
(BART, T5, Switch Transformers): there PEFT's merged Switch Transformers is not its own unmerged model,
and PEFT's saved BART / Switch Transformers load with a newly initialised embedding. The reference for
every output is PEFT's *unmerged* adapted model; tolerance 1e-5 of the largest output (merging sums in
another order).
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers

from minilora import compat
from minilora.tied_config import UNTIED_WARNING
from parity.architectures import ARCHITECTURES
from parity.differential import build_base, forward, model_inputs, same_values

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL = 1e-5


def relative_difference(outputs, reference) -> float:
    """max |a - b| / max |b| over the output tensors (logits, encoder states, ...)."""
    assert [name for name, _ in outputs] == [name for name, _ in reference]
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
               for (_, a), (_, b) in zip(outputs, reference, strict=True))


def adapted_pair(arch: str, fields: dict):
    """The same LoRA config on the same tiny model with PEFT and with minilora.compat, equal random values
    in every adapter and trained copy, and PEFT's unmerged outputs (the reference)."""
    spec = ARCHITECTURES[arch]
    base, inputs = build_base(spec, "lm"), model_inputs(spec, "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields)).eval()
        mini = compat.get_peft_model(copy.deepcopy(base), compat.LoraConfig(**fields)).eval()
    same_values(mini, twin, seed=3)
    with torch.no_grad():
        reference = forward(twin, inputs)
        assert relative_difference(forward(mini, inputs), reference) <= RTOL
    return base, inputs, mini, twin, reference


def merge_and_unload(model):
    """(the plain merged model, the messages of the warnings that name tie_word_embeddings after merging; PEFT's
    warning before any merge of a tied target is left out: test_differential_wide.py compares it with PEFT's)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    return merged, [str(w.message) for w in caught if "tie_word_embeddings" in str(w.message)
                    and not str(w.message).startswith("Model with `tie_word_embeddings=True` and the tied_target")]


def saved_and_loaded(model, directory):
    model.save_pretrained(directory)
    transformers.logging.set_verbosity_error()  # (transformers warns that it does not tie differing weights)
    try:
        return type(model).from_pretrained(directory).eval()
    finally:
        transformers.logging.set_verbosity_warning()


SAVED_LM_HEAD = dict(target_modules=["q", "v"], modules_to_save=["lm_head"], r=4)


def test_peft_merged_switch_transformers_is_not_its_unmerged_model_minilora_is():
    """A trained copy of lm_head (modules_to_save) in Switch Transformers, whose forward scales the decoder
    output by d_model**-0.5 only while tie_word_embeddings is True: PEFT's merge sets it False (with its
    warning) and its logits move far from its own unmerged ones; minilora keeps it (saying why)."""
    _, inputs, mini, twin, reference = adapted_pair("switch_transformers", SAVED_LM_HEAD)
    peft_merged, peft_words = merge_and_unload(twin)
    mini_merged, mini_words = merge_and_unload(mini)
    with torch.no_grad():
        peft_outputs, mini_outputs = forward(peft_merged, inputs), forward(mini_merged, inputs)
    assert peft_words == [UNTIED_WARNING] and peft_merged.config.tie_word_embeddings is False
    assert relative_difference(peft_outputs, reference) > 0.5  # measured 4.7 (the logits, 1/sqrt(d_model) apart)
    assert mini_merged.config.tie_word_embeddings is True
    assert len(mini_words) == 1 and "stays True" in mini_words[0] and "encoder.embed_tokens.weight" in mini_words[0]
    assert relative_difference(mini_outputs, reference) <= RTOL
    # and the formula: with the flag off, the logits are the merged model's times sqrt(d_model) (no rescale)
    scale = mini_merged.config.d_model ** 0.5
    with torch.no_grad():
        assert peft_outputs[0][0] == mini_outputs[0][0] == "logits"
        assert relative_difference([peft_outputs[0]], [("logits", mini_outputs[0][1] * scale)]) <= RTOL


def test_with_transformers_4_merge_sets_the_flag_false_as_peft_in_every_model(monkeypatch):
    """transformers 4 ties whatever tie_word_embeddings says when loading, which would drop the merged
    lm_head: without transformers 5's get_expanded_tied_weights_keys minilora does what PEFT does,
    even in Switch Transformers (flag False, PEFT's warning, PEFT's merged outputs)."""
    _, inputs, mini, twin, _ = adapted_pair("switch_transformers", SAVED_LM_HEAD)
    peft_merged, peft_words = merge_and_unload(twin)
    monkeypatch.delattr(transformers.PreTrainedModel, "get_expanded_tied_weights_keys")
    assert not hasattr(mini.get_base_model(), "get_expanded_tied_weights_keys")
    mini_merged, mini_words = merge_and_unload(mini)
    assert mini_words == peft_words == [UNTIED_WARNING]
    assert mini_merged.config.tie_word_embeddings is peft_merged.config.tie_word_embeddings is False
    with torch.no_grad():
        assert relative_difference(forward(mini_merged, inputs), forward(peft_merged, inputs)) <= RTOL


@pytest.mark.parametrize("arch, fields", [
    ("gpt2", dict(target_modules=["c_attn"], modules_to_save=["lm_head"], r=4)),
    ("bert", dict(target_modules=["query"], modules_to_save=["decoder"], r=4)),
    ("whisper", dict(target_modules=["q_proj"], modules_to_save=["proj_out"], r=4)),
])
def test_where_the_flag_ties_only_the_output_embedding_merge_sets_it_false_as_peft(arch, fields):
    _, inputs, mini, twin, reference = adapted_pair(arch, fields)
    peft_merged, peft_words = merge_and_unload(twin)
    mini_merged, mini_words = merge_and_unload(mini)
    assert mini_words == peft_words == [UNTIED_WARNING]
    assert mini_merged.config.tie_word_embeddings is peft_merged.config.tie_word_embeddings is False
    with torch.no_grad():
        assert relative_difference(forward(mini_merged, inputs), forward(peft_merged, inputs)) <= RTOL
        assert relative_difference(forward(mini_merged, inputs), reference) <= RTOL


@pytest.mark.parametrize("arch, fields, peft_reloads", [
    ("gpt2", dict(target_modules=["c_attn"], modules_to_save=["lm_head"], r=4), True),
    ("t5", SAVED_LM_HEAD, True),
    ("switch_transformers", SAVED_LM_HEAD, False),
    ("bart", dict(target_modules=["q_proj"], modules_to_save=["lm_head"], r=4), False),
])
def test_merged_model_saved_and_loaded_gives_the_unmerged_outputs(tmp_path, arch, fields, peft_reloads):
    """merge_and_unload -> save_pretrained -> from_pretrained: the trained lm_head copy is loaded, not tied
    to the input embedding again, and every other weight is the saved one: PEFT's unmerged outputs. PEFT's
    own round trip (peft_reloads) holds for GPT-2 and T5 (whose config keeps tying anyway) and loses the
    encoder's embedding for BART and Switch Transformers (transformers: "MISSING ... newly initialized")."""
    _, inputs, mini, twin, reference = adapted_pair(arch, fields)
    peft_merged, _ = merge_and_unload(twin)
    mini_merged, _ = merge_and_unload(mini)
    mini_loaded = saved_and_loaded(mini_merged, tmp_path / "mini")
    peft_loaded = saved_and_loaded(peft_merged, tmp_path / "peft")
    out = mini_loaded.get_output_embeddings().weight
    assert out.data_ptr() != mini_loaded.get_input_embeddings().weight.data_ptr()
    assert torch.equal(out, mini_merged.get_output_embeddings().weight)
    with torch.no_grad():
        assert relative_difference(forward(mini_loaded, inputs), reference) <= RTOL
        assert (relative_difference(forward(peft_loaded, inputs), reference) <= RTOL) is peft_reloads


@pytest.mark.parametrize("arch", ["gpt2", "switch_transformers", "bart"])
def test_a_lora_on_a_tied_lm_head_merged_saved_and_loaded_gives_the_unmerged_outputs(tmp_path, arch):
    """minilora unties a tied lm_head to merge it (README; PEFT merges into the shared weight, a documented
    difference). Before tied_config.py, merge_and_unload then set tie_word_embeddings=False everywhere:
    Switch Transformers' merged logits moved by 4.7x (the rescale) and BART's reloaded ones by 1.3x (the
    encoder's embedding). Reference: PEFT's unmerged outputs."""
    fields = dict(target_modules=["lm_head"], r=4)
    _, inputs, mini, _, reference = adapted_pair(arch, fields)
    merged, words = merge_and_unload(mini)
    assert merged.config.tie_word_embeddings is (arch != "gpt2")
    assert len(words) == 1 and (words[0] == UNTIED_WARNING) is (arch == "gpt2")
    loaded = saved_and_loaded(merged, tmp_path)
    with torch.no_grad():
        assert relative_difference(forward(merged, inputs), reference) <= RTOL
        assert relative_difference(forward(loaded, inputs), reference) <= RTOL
