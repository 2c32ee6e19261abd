"""save_embedding_layers (minilora/saved_embeddings.py) next to PEFT: where PEFT's adapter files hold
the embedding layers' own weights (an adapter on lm_head; a resized vocabulary; True), minilora's hold
the same keys and tensors (bitwise), with the same warnings, and each library loads the other's files
to the same outputs. Tiny GPT-2s: tied (lm_head is wte), untied, and resized (loaded from a local
directory, vocabulary 64 -> 70, so that "auto" finds the change in the saved config.json)."""

from __future__ import annotations

import copy
import os
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import minilora
from minilora import MiniLoraError, compat
from minilora.models import tiny_gpt2
from minilora.saved_embeddings import NO_BASE_CONFIG, NOT_TRANSFORMERS, RESIZED, TARGETED

IDS = torch.tensor([[1, 5, 63, 7, 2], [60, 3, 0, 9, 4]])  # (B, T); token 63 is the last of the old vocabulary
NEW_IDS = torch.tensor([[66, 1, 69, 5]])  # tokens only the resized vocabulary has
TARGETS = {"lm_head": ["c_attn", "lm_head"], "regex": r".*\.c_attn|lm_head", "none": ["c_attn"]}
KINDS = ["tied", "untied", "resized"]
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    """A tiny GPT-2 saved to a local directory: the base model_name_or_path that "auto" compares with."""
    path = tmp_path_factory.mktemp("base")
    tiny_gpt2().save_pretrained(path)
    return str(path)


def base(kind: str, saved: str) -> nn.Module:
    """A fresh base model of ``kind``; the same values on every call."""
    if kind == "tied":
        return tiny_gpt2()
    if kind == "untied":
        return tiny_gpt2(tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(saved).eval()
    torch.manual_seed(3)
    model.resize_token_embeddings(70)  # (new rows drawn from the generator: seeded)
    return model


def train_like(model: nn.Module) -> None:
    """What training leaves: every B non-zero, and the embedding rows changed (a resized vocabulary's
    new rows are trained), the same on twins whatever the library."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            layer.weight.add_(torch.randn(layer.weight.shape, generator=generator) * 0.01)


def wrapped(lib, kind: str, saved: str, targets, **fields) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (tying and fan_in_fan_out warnings: tested elsewhere)
        model = lib.get_peft_model(base(kind, saved), lib.LoraConfig(target_modules=targets, r=4, **fields))
    train_like(model)
    return model


def recorded(call) -> tuple[object, list[tuple[type, str]]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [(w.category, str(w.message)) for w in caught if not issubclass(w.category, FutureWarning)]


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------------------------
# Saving: the same keys, tensors and warnings as PEFT
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save_embedding_layers", ["auto", True, False])
@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_writes_what_peft_writes(kind, targets, save_embedding_layers, saved_base, tmp_path):
    files, said = {}, {}
    for lib in (peft, compat):
        model = wrapped(lib, kind, saved_base, TARGETS[targets])
        _, said[lib] = recorded(lambda: model.save_pretrained(tmp_path / lib.__name__,
                                                              save_embedding_layers=save_embedding_layers))
        files[lib] = load_file(tmp_path / lib.__name__ / WEIGHTS)
    assert_same_tensors(files[compat], files[peft])
    assert said[compat] == said[peft]
    extra = sorted(key for key in files[peft] if ".lora_" not in key)
    embedded = save_embedding_layers is True or (save_embedding_layers == "auto" and (
        targets != "none" or kind == "resized"))
    if not embedded:
        assert extra == [] and said[peft] == []
    elif targets != "none":  # a targeted lm_head: its base weight only
        assert extra == ["base_model.model.lm_head.base_layer.weight"]
    else:  # both embedding layers, whole (tied: the same values twice)
        assert extra == ["base_model.model.lm_head.weight", "base_model.model.transformer.wte.weight"]
    if save_embedding_layers == "auto" and embedded:
        assert said[peft] == [(UserWarning, TARGETED if targets != "none" else RESIZED)]


@pytest.mark.parametrize("save_embedding_layers", ["auto", True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_get_peft_model_state_dict_as_peft(kind, save_embedding_layers, saved_base):
    theirs, ours = (wrapped(lib, kind, saved_base, TARGETS["lm_head"]) for lib in (peft, compat))
    expected, their_words = recorded(lambda: peft.get_peft_model_state_dict(
        theirs, save_embedding_layers=save_embedding_layers))
    got, our_words = recorded(lambda: compat.get_peft_model_state_dict(
        ours, save_embedding_layers=save_embedding_layers))
    assert list(got) == list(expected) and our_words == their_words
    assert_same_tensors(got, expected)
    given = {key: value * 2 for key, value in theirs.state_dict().items()}  # Trainer passes its own state dict
    assert_same_tensors(compat.get_peft_model_state_dict(ours, state_dict=given, save_embedding_layers=True),
                        peft.get_peft_model_state_dict(theirs, state_dict=given, save_embedding_layers=True))


@pytest.mark.parametrize("save_embedding_layers", ["auto", True])
@pytest.mark.parametrize("kind", KINDS)
def test_native_save_adapter_writes_what_peft_writes(kind, save_embedding_layers, saved_base, tmp_path):
    """minilora.save_adapter takes the same argument, with PEFT's default "auto"."""
    theirs = wrapped(peft, kind, saved_base, TARGETS["lm_head"])
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=save_embedding_layers)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minilora.inject(base(kind, saved_base), minilora.LoraConfig(target_modules=TARGETS["lm_head"], r=4))
    train_like(ours)
    _, said = recorded(lambda: minilora.save_adapter(ours, tmp_path / "ours",
                                                     save_embedding_layers=save_embedding_layers))
    assert_same_tensors(load_file(tmp_path / "ours" / WEIGHTS), load_file(tmp_path / "peft" / WEIGHTS))
    assert said == ([(UserWarning, TARGETED)] if save_embedding_layers == "auto" else [])


def test_two_adapters_each_save_their_own(saved_base, tmp_path):
    """PEFT decides per adapter: "default" targets lm_head and saves its base weight, "other" does not."""
    for lib in (peft, compat):
        model = wrapped(lib, "untied", saved_base, TARGETS["lm_head"])
        torch.manual_seed(5)
        model.add_adapter("other", lib.LoraConfig(target_modules=["c_attn"], r=2))
        _, said = recorded(lambda: model.save_pretrained(tmp_path / lib.__name__))
        assert said == [(UserWarning, TARGETED)], lib.__name__
    for folder in ("", "other"):
        assert_same_tensors(load_file(tmp_path / "minilora.compat" / folder / WEIGHTS),
                            load_file(tmp_path / "peft" / folder / WEIGHTS))
    assert "base_model.model.lm_head.base_layer.weight" not in load_file(tmp_path / "peft" / "other" / WEIGHTS)


def test_auto_without_the_base_config_warns_as_peft(tmp_path):
    """base_model_name_or_path names no local config.json and the hub is offline (as in every test):
    PEFT warns that it assumes an unchanged vocabulary, and saves no embeddings."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    said = {}
    for lib in (peft, compat):
        model = tiny_gpt2()
        model.name_or_path = str(tmp_path / "gone")  # (a directory deleted since the model was loaded)
        model = lib.get_peft_model(model, lib.LoraConfig(target_modules=["c_attn"]))
        _, said[lib] = recorded(lambda: model.save_pretrained(tmp_path / lib.__name__))
        assert sorted(load_file(tmp_path / lib.__name__ / WEIGHTS)) == sorted(
            load_file(tmp_path / "peft" / WEIGHTS))
    assert said[compat] == said[peft] == [(UserWarning, NO_BASE_CONFIG.format(tmp_path / "gone"))]


class NotTransformers(nn.Module):
    """No get_input_embeddings: PEFT cannot find the embedding layers."""

    def __init__(self):
        super().__init__()
        self.body, self.lm_head = nn.Linear(4, 4), nn.Linear(4, 6)

    def forward(self, x):
        return self.lm_head(self.body(x))


@pytest.mark.parametrize("save_embedding_layers", ["auto", True])
def test_a_model_without_embedding_accessors_warns_as_peft(save_embedding_layers):
    results = {}
    for lib in (peft, compat):
        torch.manual_seed(0)
        model = lib.get_peft_model(NotTransformers(), lib.LoraConfig(target_modules=["body", "lm_head"]))
        results[lib] = recorded(lambda: lib.get_peft_model_state_dict(
            model, save_embedding_layers=save_embedding_layers))
    assert_same_tensors(results[compat][0], results[peft][0])
    assert results[compat][1] == results[peft][1] == (
        [(UserWarning, TARGETED)] if save_embedding_layers == "auto" else []) + [(UserWarning, NOT_TRANSFORMERS)]


# --------------------------------------------------------------------------------------------
# Loading such files, both ways: the same outputs
# --------------------------------------------------------------------------------------------
def loaded(lib, kind: str, saved: str, directory) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(base(kind, saved), directory)


@pytest.mark.parametrize("save_embedding_layers", ["auto", True])
@pytest.mark.parametrize("targets", ["lm_head", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_loads_the_others_file_to_the_same_outputs(kind, targets, save_embedding_layers, saved_base, tmp_path):
    trained = {}
    for lib in (peft, compat):
        trained[lib] = wrapped(lib, kind, saved_base, TARGETS[targets])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trained[lib].save_pretrained(tmp_path / lib.__name__, save_embedding_layers=save_embedding_layers)
    ids = torch.cat([IDS[:, :4], NEW_IDS]) if kind == "resized" else IDS
    reference = logits(loaded(peft, kind, saved_base, tmp_path / "peft"), ids)  # PEFT's own round trip
    for source in (peft, compat):
        for lib in (peft, compat):
            assert torch.equal(logits(loaded(lib, kind, saved_base, tmp_path / source.__name__), ids), reference), \
                (source.__name__, lib.__name__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            native = minilora.load_adapter(base(kind, saved_base), tmp_path / source.__name__)
        assert torch.equal(logits(native, ids), reference)
    embedded = save_embedding_layers is True or targets != "none" or kind == "resized"
    if embedded and (kind != "untied" or targets == "none"):  # the file holds every changed weight
        assert torch.allclose(reference, logits(trained[peft], ids), atol=1e-5)  # (merged vs unmerged order)
    else:  # the untied wte's training is not in the file (PEFT's choice): the reload differs, the same in both
        assert not torch.allclose(reference, logits(trained[peft], ids), atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dicts_with_embeddings_load_back_as_peft(kind, saved_base):
    """get_peft_model_state_dict(..., True) -> set_peft_model_state_dict into a fresh twin, each library."""
    state = peft.get_peft_model_state_dict(wrapped(peft, kind, saved_base, TARGETS["none"]), save_embedding_layers=True)
    outputs = []
    for lib in (peft, compat):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = lib.get_peft_model(base(kind, saved_base), lib.LoraConfig(target_modules=TARGETS["none"], r=4))
        lib.set_peft_model_state_dict(fresh, state)
        outputs.append(logits(fresh))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["q_proj"]])
def test_a_llama_with_embed_tokens_saves_and_loads_as_peft(targets, tmp_path):
    """Another naming (model.embed_tokens, an untied lm_head), with save_embedding_layers=True."""
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=50)

    def llama():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()

    for lib in (peft, compat):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(llama(), lib.LoraConfig(target_modules=targets, r=2))
        train_like(model)
        model.save_pretrained(tmp_path / lib.__name__, save_embedding_layers=True)
    theirs, ours = (load_file(tmp_path / name / WEIGHTS) for name in ("peft", "minilora.compat"))
    assert_same_tensors(ours, theirs)
    assert sorted(key for key in theirs if ".lora_" not in key) == (
        ["base_model.model.lm_head.base_layer.weight"] if "lm_head" in targets else
        ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"])
    ids = torch.tensor([[3, 49, 7, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = logits(peft.PeftModel.from_pretrained(llama(), tmp_path / "peft"), ids)
        assert torch.equal(logits(compat.PeftModel.from_pretrained(llama(), tmp_path / "peft"), ids), reference)
        assert torch.equal(logits(peft.PeftModel.from_pretrained(llama(), tmp_path / "minilora.compat"), ids),
                           reference)


# --------------------------------------------------------------------------------------------
# Embedding layers in modules_to_save (PEFT's recipe for adding tokens): resize, then
# modules_to_save=[the input embedding, lm_head]. PEFT's file holds, per layer, the trained copy
# (<name>.weight) and the wrapper's inner keys (<name>.original_module.weight, which its loading puts
# into the original, <name>.modules_to_save.weight, which its loading ignores).
# --------------------------------------------------------------------------------------------
SAVED_EMBEDDINGS = {"llama": ["embed_tokens", "lm_head"], "gpt2": ["wte", "lm_head"]}


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory):
    """A tiny Llama (untied lm_head, vocabulary 40) and a tiny GPT-2 (tied, 64), saved to local folders."""
    path = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(path / "llama")
    tiny_gpt2().save_pretrained(path / "gpt2")
    return path


def resized(saved_bases, model: str, seed: int = 3) -> nn.Module:
    """The saved base, its vocabulary grown by 4 (the new rows drawn from the generator seeded with ``seed``)."""
    base_model = transformers.AutoModelForCausalLM.from_pretrained(saved_bases / model).eval()
    torch.manual_seed(seed)
    base_model.resize_token_embeddings(base_model.config.vocab_size + 4)
    return base_model


def with_saved_embeddings(lib, saved_bases, model: str) -> nn.Module:
    """PEFT's recipe, then training-like changes: B non-zero, each copy of the embeddings changed."""
    names = SAVED_EMBEDDINGS[model]
    config = lib.LoraConfig(r=2, target_modules=["q_proj"] if model == "llama" else ["c_attn"], modules_to_save=names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tying warning for GPT-2: tested elsewhere)
        wrapped_model = lib.get_peft_model(resized(saved_bases, model), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in sorted(wrapped_model.named_parameters()):
            if ".lora_B." in name or ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return wrapped_model


@pytest.mark.parametrize("save_embedding_layers", ["auto", True, False])
@pytest.mark.parametrize("model", list(SAVED_EMBEDDINGS))
def test_embedding_layers_in_modules_to_save_are_saved_as_peft(model, save_embedding_layers, saved_bases, tmp_path):
    results = {}
    for lib in (peft, compat):
        trained = with_saved_embeddings(lib, saved_bases, model)
        results[lib] = recorded(lambda: trained.save_pretrained(tmp_path / lib.__name__,
                                                                save_embedding_layers=save_embedding_layers))
    theirs, ours = (load_file(tmp_path / name / WEIGHTS) for name in ("peft", "minilora.compat"))
    assert_same_tensors(ours, theirs)
    assert results[compat][1] == results[peft][1]
    prefix = "base_model.model."
    inner = {"llama": ["lm_head", "model.embed_tokens"], "gpt2": ["lm_head", "transformer.wte"]}[model]
    parts = ["original_module.weight", "modules_to_save.weight", "weight"] if save_embedding_layers else ["weight"]
    assert sorted(key for key in theirs if ".lora_" not in key) == sorted(
        f"{prefix}{name}.{part}" for name in inner for part in parts)
    if save_embedding_layers == "auto":
        assert (UserWarning, RESIZED) in results[peft][1]


@pytest.mark.parametrize("save_embedding_layers", ["auto", False])
@pytest.mark.parametrize("model", list(SAVED_EMBEDDINGS))
def test_embedding_layers_in_modules_to_save_load_both_ways(model, save_embedding_layers, saved_bases, tmp_path):
    """Each library loads each file (onto a base whose new rows were drawn differently: the file's
    original_module.weight replaces them, as in PEFT) to PEFT's logits, bitwise, with the adapter and
    without it (disable_adapter: the originals run)."""
    for lib in (peft, compat):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with_saved_embeddings(lib, saved_bases, model).save_pretrained(
                tmp_path / lib.__name__, save_embedding_layers=save_embedding_layers)
    old = {"llama": 40, "gpt2": 64}[model]
    ids = torch.tensor([[1, 5, old - 1, old, old + 3, 2]])  # (B, T); old.. are new tokens

    def outputs(lib, directory) -> tuple[torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded_model = lib.PeftModel.from_pretrained(resized(saved_bases, model, seed=11), directory)
        with loaded_model.disable_adapter():
            disabled = logits(loaded_model, ids)
        return logits(loaded_model, ids), disabled

    reference = outputs(peft, tmp_path / "peft")  # PEFT's own round trip
    for source in ("peft", "minilora.compat"):
        for lib in (peft, compat):
            got = outputs(lib, tmp_path / source)
            assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1]), (source, lib.__name__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            native = minilora.load_adapter(resized(saved_bases, model, seed=11), tmp_path / source)
        assert torch.equal(logits(native, ids), reference[0]), source
    base_logits = logits(resized(saved_bases, model, seed=11), ids)
    # the file's original_module.weight replaced the base's new rows (drawn with another seed) only when saved
    assert torch.equal(reference[1], base_logits) is (save_embedding_layers is False)


# --------------------------------------------------------------------------------------------
# Refused: what minilora cannot write or load as PEFT does
# --------------------------------------------------------------------------------------------
def test_a_resized_file_on_a_base_of_the_old_size_is_refused_with_a_hint(saved_base, tmp_path):
    wrapped(peft, "resized", saved_base, TARGETS["none"]).save_pretrained(tmp_path / "a")  # (warns: resized)
    with pytest.raises(RuntimeError, match="size mismatch"):  # PEFT fails too
        loaded(peft, "tied", saved_base, tmp_path / "a")
    model = tiny_gpt2()
    before = copy.deepcopy(model.state_dict())
    for load in (lambda: minilora.load_adapter(model, tmp_path / "a"),
                 lambda: compat.PeftModel.from_pretrained(model, tmp_path / "a")):
        with pytest.raises(MiniLoraError, match=r"wte\.weight.*\(70, 32\).*resize_token_embeddings\(70\)"):
            load()
        assert list(model.state_dict()) == list(before)  # nothing changed
        assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


@pytest.mark.parametrize("value", ["false", 1, None])
def test_save_embedding_layers_other_than_true_false_auto_is_refused(value, saved_base, tmp_path):
    model = wrapped(compat, "tied", saved_base, TARGETS["lm_head"])
    with pytest.raises(MiniLoraError, match="save_embedding_layers must be True, False or 'auto'"):
        model.save_pretrained(tmp_path / "a", save_embedding_layers=value)
    assert not (tmp_path / "a").exists()
    with pytest.raises(MiniLoraError, match="save_embedding_layers must be"):
        compat.get_peft_model_state_dict(model, save_embedding_layers=value)

