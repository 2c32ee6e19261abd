"""modules_to_save (minilora/saved_modules.py) and PEFT's automatic task heads, against PEFT 0.21.2.

Each case builds the same tiny model twice and applies minilora.compat.get_peft_model and
peft.get_peft_model with the same seed, then compares: trainable names and counts, the adapter and
head values, outputs (adapters on and disabled), AdamW steps, merge_and_unload, and the files both
ways. All comparisons on the CPU in float32 are bitwise.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers
from torch import nn

import minilora
from minilora import MiniLoraError, compat
from minilora.saved_modules import ModulesToSave
from parity.architectures import ARCHITECTURES
from parity.twins import peft_key

# (name, architecture whose tiny config is used, model class, task_type, extra LoraConfig fields)
CASES = [
    ("bert-seq-cls", "bert", "BertForSequenceClassification", "SEQ_CLS", {}),
    ("llama-seq-cls", "llama", "LlamaForSequenceClassification", "SEQ_CLS", {}),
    ("roberta-seq-cls", "roberta", "RobertaForSequenceClassification", "SEQ_CLS", {"target_modules": "all-linear"}),
    ("bert-token-cls", "bert", "BertForTokenClassification", "TOKEN_CLS", {}),
    ("bert-qa", "bert", "BertForQuestionAnswering", "QUESTION_ANS", {"modules_to_save": ["pooler"]}),
    ("llama-lm-head", "llama", "LlamaForCausalLM", "CAUSAL_LM", {"modules_to_save": ["lm_head"]}),
    ("bert-seq-cls-bias-lora-only", "bert", "BertForSequenceClassification", "SEQ_CLS", {"bias": "lora_only"}),
    ("bert-seq-cls-bias-all", "bert", "BertForSequenceClassification", "SEQ_CLS", {"bias": "all"}),
]
IDS = [case[0] for case in CASES]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def build(arch: str, class_name: str) -> nn.Module:
    config = ARCHITECTURES[arch].config()
    config.pad_token_id = 0  # sequence classification of a decoder finds the last token by the pad id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, class_name)(config).eval()


def twins(arch, class_name, task, fields, seed=0):
    """(minilora model, PEFT model) from the same base and seed, both in eval mode."""
    base = build(arch, class_name)
    torch.manual_seed(seed)
    mini = compat.get_peft_model(copy.deepcopy(base), compat.LoraConfig(task_type=task, r=2, **copy.deepcopy(fields)))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type=task, r=2, **copy.deepcopy(fields)))
    return base, mini.eval(), twin.eval()


def inputs(seed=0):
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(seed))
    ids[:, -1] = 5  # a non-pad token last
    return {"input_ids": ids}


def out(model, batch):
    result = model(**batch)
    return torch.cat([value.flatten() for key, value in result.items() if key.endswith("logits")])


def perturb_equally(mini, twin, seed=1):
    """The same non-zero values in every trainable tensor of both (B = 0 and an untouched head hide errors)."""
    peft_params = dict(twin.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in mini.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
                peft_params[name].copy_(param)


@pytest.mark.parametrize("name, arch, class_name, task, fields", CASES, ids=IDS)
def test_same_trainable_modules_init_and_outputs_as_peft(name, arch, class_name, task, fields):
    base, mini, twin = twins(arch, class_name, task, fields)
    mini_trainable = {n: p for n, p in mini.named_parameters() if p.requires_grad}
    peft_trainable = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    assert list(mini_trainable) == list(peft_trainable)
    assert any(".modules_to_save.default." in n for n in mini_trainable)
    assert tuple(minilora.count_parameters(mini)) == tuple(twin.get_nb_trainable_parameters())
    for key, value in mini.state_dict().items():  # same seed: same A, B, copies and originals
        assert torch.equal(value, twin.state_dict()[key]), key
    assert mini.base_model.targeted_module_names == twin.base_model.targeted_module_names

    perturb_equally(mini, twin)
    batch = inputs()
    with torch.no_grad():
        assert torch.equal(out(mini, batch), out(twin, batch))
        with mini.disable_adapter(), twin.disable_adapter():
            disabled, peft_disabled = out(mini, batch), out(twin, batch)
        assert torch.equal(disabled, peft_disabled)
        if fields.get("bias", "none") == "none":  # (trained biases stay on when disabled, in both)
            assert torch.equal(disabled, out(base, batch))  # the original modules, untouched


@pytest.mark.parametrize("name, arch, class_name, task, fields", CASES[:2] + CASES[4:5] + CASES[-1:],
                         ids=IDS[:2] + IDS[4:5] + IDS[-1:])
def test_training_steps_equal_peft(name, arch, class_name, task, fields):
    _, mini, twin = twins(arch, class_name, task, fields)
    perturb_equally(mini, twin)
    for model in (mini, twin):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)
        model.train()
        for step in range(2):
            torch.manual_seed(step)
            loss = out(model, inputs(step)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    peft_state = twin.state_dict()
    for key, value in mini.state_dict().items():
        assert torch.equal(value, peft_state[key]), key


@pytest.mark.parametrize("name, arch, class_name, task, fields", CASES, ids=IDS)
def test_merge_and_unload_keeps_the_trained_copy_as_peft(name, arch, class_name, task, fields):
    _, mini, twin = twins(arch, class_name, task, fields)
    perturb_equally(mini, twin)
    batch = inputs()
    with torch.no_grad():
        expected = out(twin, batch)
        mini_plain, peft_plain = mini.merge_and_unload(), twin.merge_and_unload()
        assert not any(isinstance(m, ModulesToSave) for m in mini_plain.modules())
        assert mini_plain.state_dict().keys() == peft_plain.state_dict().keys()
        for key, value in mini_plain.state_dict().items():
            assert torch.equal(value, peft_plain.state_dict()[key]), key
        assert torch.equal(out(mini_plain, batch), out(peft_plain, batch))
        torch.testing.assert_close(out(mini_plain, batch), expected, atol=1e-5, rtol=1e-5)  # merged ~ unmerged


def test_unload_gives_the_base_model_back_where_peft_keeps_the_trained_head():
    """PEFT's unload() ("Return the base model") keeps the trained copy of a modules_to_save module
    (measured here); minilora's unload gives the original module, i.e. the base model's outputs."""
    base, mini, twin = twins("bert", "BertForSequenceClassification", "SEQ_CLS", {})
    perturb_equally(mini, twin)
    batch = inputs()
    with torch.no_grad():
        base_out = out(base, batch)
        assert torch.equal(out(mini.unload(), batch), base_out)
        assert not torch.equal(out(twin.unload(), batch), base_out)  # PEFT: the trained head stays


@pytest.mark.parametrize("name, arch, class_name, task, fields", CASES[:1] + CASES[3:], ids=IDS[:1] + IDS[3:])
def test_files_load_both_ways(tmp_path, name, arch, class_name, task, fields):
    base, mini, twin = twins(arch, class_name, task, fields)
    perturb_equally(mini, twin)
    batch = inputs()
    mini.save_pretrained(tmp_path / "mini")
    twin.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file
    mini_file = load_file(tmp_path / "mini" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(mini_file) == sorted(peft_file)  # PEFT's key names: base_model.model.classifier.weight
    assert all(torch.equal(mini_file[key], peft_file[key]) for key in peft_file)
    mini_fields = json.loads((tmp_path / "mini" / "adapter_config.json").read_text())
    peft_fields = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert mini_fields["modules_to_save"] == peft_fields["modules_to_save"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = out(twin, batch)
        into_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
        assert torch.equal(out(into_peft, batch), expected)
        into_mini = compat.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
        assert torch.equal(out(into_mini, batch), expected)
        assert any(isinstance(m, ModulesToSave) for m in into_mini.modules())


def test_loading_into_existing_layers_fills_the_copies(tmp_path):
    base, mini, twin = twins("bert", "BertForSequenceClassification", "SEQ_CLS", {})
    perturb_equally(mini, twin)
    twin.save_pretrained(tmp_path / "peft")
    _, fresh, _ = twins("bert", "BertForSequenceClassification", "SEQ_CLS", {}, seed=5)
    head = fresh.classifier.modules_to_save["default"].weight
    minilora.load_adapter(fresh.get_base_model(), tmp_path / "peft", is_trainable=True)
    assert fresh.classifier.modules_to_save["default"].weight is head and head.requires_grad
    assert not fresh.classifier.original_module.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(out(fresh, inputs()), out(twin, inputs()))


def test_wrapper_reads_through_to_the_running_module():
    _, mini, _ = twins("bert", "BertForSequenceClassification", "SEQ_CLS", {})
    wrapper = mini.classifier
    assert wrapper.out_features == 2 and wrapper.weight is wrapper.modules_to_save["default"].weight
    with minilora.disabled(mini):
        assert wrapper.weight is wrapper.original_module.weight


def test_plain_api_modules_to_save():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    minilora.inject(model, minilora.LoraConfig(target_modules=["0"], modules_to_save=["2"]))
    assert sorted(peft_key(n) for n, p in model.named_parameters() if p.requires_grad) == [
        "base_model.model.0.lora_A.default.weight", "base_model.model.0.lora_B.default.weight",
        "base_model.model.2.modules_to_save.default.bias", "base_model.model.2.modules_to_save.default.weight"]
    minilora.unload(model)
    assert isinstance(model[2], nn.Linear)


@pytest.mark.parametrize("fields, message", [
    (dict(target_modules=["query"], modules_to_save=["nothing_like_this"]), "matches no module"),
    (dict(target_modules=["query", "dense"], modules_to_save=["ooler.dense"]), "both a LoRA target"),
    (dict(target_modules=["dense"], modules_to_save=["encoder.layer"]), "a ModuleList"),
    (dict(target_modules=["query"], modules_to_save=["pooler", "pooler.dense"]), "inside 'bert.pooler'"),
])
def test_modules_to_save_errors_leave_the_model_unchanged(fields, message):
    model = build("bert", "BertForSequenceClassification")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MiniLoraError, match=message):
        minilora.inject(model, minilora.LoraConfig(**fields))
    assert not any(isinstance(m, (ModulesToSave, minilora.LoraLinear)) for m in model.modules())
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_task_without_a_head_of_peft_names_is_refused():
    """T5ForSequenceClassification's head is `classification_head`: PEFT would leave it frozen and unsaved."""
    model = getattr(transformers, "T5ForSequenceClassification")(ARCHITECTURES["t5"].config())
    with pytest.raises(MiniLoraError, match=r"task_type=SEQ_CLS.*classification_head"):
        compat.get_peft_model(model, compat.LoraConfig(task_type="SEQ_CLS", target_modules=["q", "v"]))
    config = compat.LoraConfig(task_type="SEQ_CLS", target_modules=["q", "v"], modules_to_save=["classification_head"])
    compat.get_peft_model(model, config)
    assert any(isinstance(m, ModulesToSave) for m in model.modules())

