"""minilora.compat: a PEFT article's code, run unchanged with PEFT's imports and with minilora's.

The article (``article`` below) is written once and run twice: with ``from peft import ...`` and
with ``from minilora.compat import ...``. Same seed, so the same printed lines (the trainable-parameter
line and Trainer's loss logs), the same generated tokens, and merged logits equal to 1e-5.
"""

from __future__ import annotations

import contextlib
import copy
import io
import types
import warnings

import pytest
import torch

import minilora
from minilora import MiniLoraError
from conftest import make_tiny_gpt2
from minilora.compat import LoraConfig, PeftModel, TaskType, get_peft_model
from parity.twins import max_abs_diff


def article(api, workdir, tiny_gpt2_factory):
    """The PEFT quicktour's flow on a tiny GPT-2: inject, print, count, train, save, load, merge, generate."""
    get_peft_model, LoraConfig, TaskType, PeftModel = api.get_peft_model, api.LoraConfig, api.TaskType, api.PeftModel
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)  # the adapter's init draws
    model = tiny_gpt2_factory()
    peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32,
                             lora_dropout=0.1, target_modules=["c_attn"])
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    print("<model>")
    print(model)
    print("</model>")

    tokens = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(1))
    train_dataset = [{"input_ids": ids, "labels": ids} for ids in tokens]
    args = TrainingArguments(output_dir=str(workdir / "run"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no", seed=0,
                             disable_tqdm=True, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.save_pretrained(str(workdir / "adapter"))

    base = tiny_gpt2_factory()
    model = PeftModel.from_pretrained(base, str(workdir / "adapter"))
    model = model.merge_and_unload()
    prompt = torch.tensor([[5, 17, 42]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=63)
    print(generated.tolist())
    with torch.no_grad():
        logits = model(prompt).logits
    return model, losses, logits


def _run(api, workdir):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = article(api, workdir, make_tiny_gpt2)
    return (stdout.getvalue(), *result)


def _without_model_and_timings(text: str) -> tuple[list[str], str]:
    """(lines to compare, the printed model): drop print(model)'s block (PEFT's is a wrapper) and run times."""
    before, _, rest = text.partition("<model>\n")
    printed_model, _, after = rest.partition("</model>\n")
    lines = [line for line in (before + after).splitlines() if "train_runtime" not in line]
    return lines, printed_model


def test_article_runs_unchanged_and_prints_what_peft_prints(tmp_path):
    import peft

    peft_api = types.SimpleNamespace(get_peft_model=peft.get_peft_model, LoraConfig=peft.LoraConfig,
                                     TaskType=peft.TaskType, PeftModel=peft.PeftModel)
    ours_api = types.SimpleNamespace(get_peft_model=get_peft_model, LoraConfig=LoraConfig, TaskType=TaskType,
                                     PeftModel=PeftModel)
    peft_out, _, peft_losses, peft_logits = _run(peft_api, tmp_path / "peft")
    ours_out, model, ours_losses, ours_logits = _run(ours_api, tmp_path / "ours")

    peft_lines, _ = _without_model_and_timings(peft_out)
    ours_lines, printed_model = _without_model_and_timings(ours_out)
    print("\n".join(ours_lines))
    assert ours_lines[0] == peft_lines[0] == "trainable params: 2,048 || all params: 30,592 || trainable%: 6.6946"
    assert ours_lines == peft_lines  # Trainer's loss logs and the generated tokens included
    assert "(c_attn): LoraLinear(" in printed_model and "r=8, lora_alpha=32" in printed_model
    assert len(ours_losses) == 4 and ours_losses == pytest.approx(peft_losses, rel=1e-5)
    print(f"merged logits: max |minilora - PEFT| = {max_abs_diff(ours_logits, peft_logits):.3g}")
    assert max_abs_diff(ours_logits, peft_logits) <= 1e-5
    assert type(model).__name__ == "GPT2LMHeadModel" and not list(minilora.lora_layers(model))
    assert (tmp_path / "ours" / "adapter" / "adapter_model.safetensors").is_file()


def test_gpt2_trainable_line_matches_peft(gpt2_pair):
    """GPT-2 small, the article's config: the same printed line and the same counts as PEFT."""
    import peft

    ours, theirs = gpt2_pair
    printed = []
    for api, model in ((peft, theirs), (minilora.compat, ours)):
        config = api.LoraConfig(task_type=api.TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32,
                                lora_dropout=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT: fan_in_fan_out corrected for Conv1D
            model = api.get_peft_model(model, config)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            model.print_trainable_parameters()
        printed.append((stdout.getvalue(), model.get_nb_trainable_parameters()))
    assert printed[1] == printed[0]
    assert printed[1][0] == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364\n"


def test_get_peft_model_wraps_like_peft(tiny_gpt2):
    """A PeftModel around a LoraModel around the model, as PEFT's: the same classes by task, the same
    state-dict keys (base_model.model.<layer>.lora_A.default.weight), the model reachable the same ways."""
    import peft

    theirs = peft.get_peft_model(copy.deepcopy(tiny_gpt2), peft.LoraConfig(task_type="CAUSAL_LM", r=4,
                                                                             target_modules=["c_attn"]))
    model = get_peft_model(tiny_gpt2, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]))
    assert type(model).__name__ == type(theirs).__name__ == "PeftModelForCausalLM"
    assert isinstance(model, PeftModel) and type(model.base_model).__name__ == type(theirs.base_model).__name__
    assert model.get_base_model() is model.base_model.model is tiny_gpt2
    assert list(model.state_dict()) == list(theirs.state_dict())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert model.config is tiny_gpt2.config and model.prefix == theirs.prefix == "lora_"  # __getattr__ falls through
    assert model.active_adapter == theirs.active_adapter == "default" and not model._is_prompt_learning
    assert type(get_peft_model(make_tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))) is PeftModel
    with pytest.raises(MiniLoraError, match="already has minilora layers"):
        get_peft_model(tiny_gpt2, LoraConfig(r=4, target_modules=["c_attn"]))  # PEFT stacks a second wrapper
    with pytest.raises(MiniLoraError, match="wrapping it again"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"]))


def test_peft_methods(tiny_gpt2, tmp_path):
    model = get_peft_model(tiny_gpt2, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    x = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        adapted = model(x).logits
        with model.disable_adapter():
            base = model(x).logits
    assert max_abs_diff(adapted, base) > 1e-4

    # transformers.Trainer saves checkpoints with these arguments.
    model.save_pretrained(tmp_path / "ckpt", state_dict=model.state_dict(), is_main_process=True)
    model.save_pretrained(tmp_path / "skipped", is_main_process=False)
    assert not (tmp_path / "skipped").exists()
    with pytest.raises(MiniLoraError, match="takes no"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.raises(MiniLoraError, match="invalid `selected_adapters`"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["other"])

    copied = copy.deepcopy(model)  # the methods must act on the copy, not on the original
    with torch.no_grad():
        copied.get_submodule("transformer.h.0.attn.c_attn").lora_B["default"].weight.mul_(2)
    copied.save_pretrained(tmp_path / "copy")
    reloaded = PeftModel.from_pretrained(make_tiny_gpt2(), tmp_path / "copy")
    with torch.no_grad():
        assert max_abs_diff(reloaded(x).logits, copied(x).logits) <= 1e-6
        assert max_abs_diff(reloaded(x).logits, adapted) > 1e-4

    merged = model.merge_and_unload()
    assert "save_pretrained" not in merged.__dict__  # transformers' own save_pretrained again
    with torch.no_grad():
        assert max_abs_diff(merged(x).logits, adapted) <= 1e-5


def test_from_pretrained_like_peft(tiny_gpt2, tmp_path):
    """is_trainable=False (PEFT's default): frozen adapter, eval mode; True: A and B train."""
    model = get_peft_model(copy.deepcopy(tiny_gpt2), LoraConfig(r=4, target_modules=["c_attn"]))
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(copy.deepcopy(tiny_gpt2).train(), tmp_path)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(tiny_gpt2, tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, _ in trainable.named_parameters() if ".lora_" in n}


def test_inference_mode_freezes(tiny_gpt2):
    model = get_peft_model(tiny_gpt2, LoraConfig(r=4, target_modules=["c_attn"], inference_mode=True))
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("call, message", [
    (lambda m: get_peft_model(m, LoraConfig(r=4, target_modules=["c_attn"]), adapter_name="a.b"),
     "without dots"),
    (lambda m: get_peft_model(m, LoraConfig(r=4, target_modules=["c_attn"]), mixed=True), "LoRA only"),
    (lambda m: PeftModel(m, LoraConfig(r=4, target_modules=["c_attn"]), autocast_adapter_dtype="no"), "a bool"),
    (lambda m: PeftModel.from_pretrained(m, "somewhere", device_map="auto"), "does not dispatch"),
    (lambda m: PeftModel.from_pretrained(m, "somewhere", key_mapping={"a": "b"}), "key_mapping"),
    (lambda m: PeftModel.from_pretrained(m, "somewhere", push_to_hub=True), "takes no"),
], ids=["adapter-name", "mixed", "autocast-flag", "device-map", "key-mapping", "from-pretrained-kwargs"])
def test_compat_call_errors(call, message, tiny_gpt2, unchanged):
    check = unchanged(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=message):
        call(tiny_gpt2)
    check()


@pytest.mark.parametrize("fields, message", [
    ({"use_dora": True}, r"cannot honour use_dora=True"),
    ({"modules_to_save": "classifier"}, r"modules_to_save must be None or a list"),
    ({"lora_bias": True, "init_lora_weights": "gaussian"}, r"The argument lora_bias=True is only supported with init_lora_weights=True or"),
    ({"task_type": "CAUSAL"}, r"task_type='CAUSAL' is not one of PEFT's task types"),
    ({"r": 0}, r"r must be a positive int"),
    ({"target_parameters": ["lin0.weight"]}, r"cannot honour target_parameters=\['lin0.weight'\] \(LoRA on bare"),
    ({"velora_config": {"mode": "random"}}, r"cannot honour velora_config=.* \(VeLoRA\)"),
    ({"trainable_token_indices": [1, 2]}, r"cannot honour trainable_token_indices"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is one of PEFT's"),
    ({"init_lora_weights": "mica"}, r"init_lora_weights='mica' is one of PEFT's"),
    ({"ensure_weight_tying": 1}, r"ensure_weight_tying must be True or False"),  # True: test_compat_tying.py
], ids=["dora", "modules_to_save", "lora_bias", "task_type", "r", "target_parameters", "velora", "trainable_tokens",
        "pissa", "mica", "weight_tying"])
def test_config_errors(fields, message):
    with pytest.raises(MiniLoraError, match=message):
        LoraConfig(**fields)


def test_a_peft_config_is_refused_clearly(tiny_gpt2, unchanged):
    import peft

    check = unchanged(tiny_gpt2)
    with pytest.raises(MiniLoraError, match=r"needs minilora\.compat\.LoraConfig, got peft\..*LoraConfig"):
        get_peft_model(tiny_gpt2, peft.LoraConfig(r=4, target_modules=["c_attn"]))
    check()
