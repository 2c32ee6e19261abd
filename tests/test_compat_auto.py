"""minilora.compat's AutoPeftModel classes next to PEFT's: an adapter whose config names a base
model saved in a local directory loads into the same model with the same outputs, with or without a
task type, and PEFT's refusals (another task's class, a library outside the allowlist) are refused."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

from minilora import MiniLoraError, compat

from conftest import make_tiny_gpt2

TOKENS = torch.tensor([[5, 17, 42, 7]])


@pytest.fixture
def base_dir(tmp_path):
    directory = tmp_path / "base"
    make_tiny_gpt2().save_pretrained(directory)
    return directory


def trained_adapter(directory, base_dir, task_type):
    """PEFT's adapter on the saved base (its name_or_path is base_dir), with a non-zero B."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                    peft.LoraConfig(task_type=task_type, r=4, target_modules=["c_attn"],
                                                    init_lora_weights=False))
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("task_type, auto", [("CAUSAL_LM", "AutoPeftModelForCausalLM"), (None, "AutoPeftModel")])
def test_auto_peft_model_loads_what_peft_loads(tmp_path, base_dir, task_type, auto):
    adapter = trained_adapter(tmp_path / "adapter", base_dir, task_type)
    outputs = {}
    for lib in (peft, compat):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(lib, auto).from_pretrained(adapter)
        assert type(model).__name__ == ("PeftModelForCausalLM" if task_type else "PeftModel"), lib.__name__
        assert not model.training and type(model.get_base_model()).__name__ == "GPT2LMHeadModel"
        with torch.no_grad():
            outputs[lib.__name__] = model(TOKENS).logits
    assert torch.equal(outputs["minilora.compat"], outputs["peft"])


def test_auto_peft_model_refusals_are_peft_s(tmp_path, base_dir):
    adapter = trained_adapter(tmp_path / "adapter", base_dir, "CAUSAL_LM")
    for lib in (peft, compat):
        with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForCausalLM"):
            lib.AutoPeftModelForSequenceClassification.from_pretrained(adapter)
        with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
            lib.AutoPeftModel.from_pretrained(adapter)
    plain = trained_adapter(tmp_path / "plain", base_dir, None)
    fields = json.loads((plain / "adapter_config.json").read_text())
    fields["auto_mapping"]["parent_library"] = "os"
    (plain / "adapter_config.json").write_text(json.dumps(fields))
    for lib in (peft, compat):
        with pytest.raises(ValueError, match="not in the import allowlist"):
            lib.AutoPeftModel.from_pretrained(plain)
    fields["base_model_name_or_path"] = None
    (plain / "adapter_config.json").write_text(json.dumps(fields))
    with pytest.raises(MiniLoraError, match="names no base_model_name_or_path"):
        compat.AutoPeftModel.from_pretrained(plain)


def test_a_larger_saved_tokenizer_grows_the_embedding_as_peft(tmp_path, base_dir):
    """A tokenizer saved next to the adapter with more tokens than the base has embedding rows: both
    libraries grow the embedding (resize_token_embeddings, drawing the new rows) before loading."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    adapter = trained_adapter(tmp_path / "adapter", base_dir, "CAUSAL_LM")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(adapter)
    outputs = {}
    for lib in (peft, compat):
        torch.manual_seed(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.AutoPeftModelForCausalLM.from_pretrained(adapter)
        assert model.get_input_embeddings().weight.shape[0] == 70, lib.__name__  # (the base has 64)
        with torch.no_grad():
            outputs[lib.__name__] = model(torch.tensor([[68, 69, 3]])).logits
    assert torch.equal(outputs["minilora.compat"], outputs["peft"])
