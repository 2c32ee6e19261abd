"""transformers.Trainer with minilora.compat does what it does with PEFT (compat_trainer.py).

One Trainer script, run with ``peft`` and with ``minilora.compat`` on a tiny tied GPT-2 (2 blocks, width
32, vocab 128), same seed: checkpoints every 2 steps, evaluation every 2 steps, the best model
reloaded at the end. Compared bitwise (same op order): every file in every checkpoint (names; the
adapter's keys, shapes and tensors; the optimizer's and scheduler's state), the logged losses and
eval_loss, the reloaded best adapter, and a run resumed from a checkpoint. Without compat_trainer.py,
Trainer saves the whole state dict (on GPT-2 it fails: tied weights) and, without a task_type, has no
``label_names`` and so no eval_loss.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import Trainer, TrainingArguments

import minilora.compat as compat
from conftest import make_tiny_gpt2

TINY = dict(vocab_size=128, bos_token_id=127, eos_token_id=127)
STEPS, EVERY = 4, 2
TIMINGS = ("runtime", "per_second")  # logged durations differ between any two runs
# compat first, so that PEFT's runs show that registering compat's classes leaves PEFT's models alone.
# (peft is imported by name: one test runs this file's script in a process without peft.)
LIBRARIES = ("minilora.compat", "peft")


def dataset(rows: int = 16) -> list[dict]:
    tokens = torch.randint(0, 128, (rows, 12), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids, "labels": ids} for ids in tokens]


def trainer_for(lib, output_dir: Path, task_type=None, **arguments) -> Trainer:
    """The script: get_peft_model with ``lib`` (peft or minilora.compat), then a Trainer over it."""
    torch.manual_seed(0)
    model = lib.get_peft_model(make_tiny_gpt2(**TINY), lib.LoraConfig(task_type=task_type, r=4, lora_alpha=8,
                                                                      lora_dropout=0.1, target_modules=["c_attn"]))
    args = dict(output_dir=str(output_dir), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                max_steps=STEPS, learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=EVERY,
                eval_strategy="steps", eval_steps=EVERY, report_to="none", disable_tqdm=True, seed=0, use_cpu=True,
                dataloader_pin_memory=False)
    return Trainer(model=model, args=TrainingArguments(**{**args, **arguments}), train_dataset=dataset(),
                   eval_dataset=dataset(8))


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def logs(trainer: Trainer) -> list[dict]:
    """Trainer's log history without durations."""
    return [{key: value for key, value in entry.items() if not any(word in key for word in TIMINGS)}
            for entry in trainer.state.log_history]


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(directory / "adapter_model.safetensors"))


def assert_same_adapter(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(theirs) and ours and all(".lora_" in key for key in ours)  # no base weights
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and torch.equal(ours[key], theirs[key]), key


def assert_same_checkpoint(ours: Path, theirs: Path) -> None:
    """The same files; the adapter's and the optimizer's tensors bitwise; the configs and states alike."""
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    assert "model.safetensors" not in os.listdir(ours)  # the adapter only, as PEFT's
    assert_same_adapter(adapter_tensors(ours), adapter_tensors(theirs))
    config, their_config = (json.loads((path / "adapter_config.json").read_text()) for path in (ours, theirs))
    assert {key: their_config.get(key) for key in config} == config  # (minilora writes the fields it reads)
    for name in ("optimizer.pt", "scheduler.pt"):
        state, their_state = (torch.load(path / name, weights_only=True) for path in (ours, theirs))
        flat, their_flat = (torch.utils._pytree.tree_flatten(s) for s in (state, their_state))
        assert flat[1] == their_flat[1], name  # the same structure (parameter order, keys)
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(flat[0], their_flat[0])), name
    state, their_state = (json.loads((path / "trainer_state.json").read_text()) for path in (ours, theirs))
    for s in (state, their_state):
        s["best_model_checkpoint"] = Path(s["best_model_checkpoint"] or "").name
        s["log_history"] = [{k: v for k, v in entry.items() if not any(word in k for word in TIMINGS)}
                            for entry in s["log_history"]]
    assert state == their_state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"minilora.compat": trainer, "peft": trainer}: the script trained, without a task_type,
    keeping the best checkpoint by eval_loss (the default metric)."""
    root = tmp_path_factory.mktemp("trainer")
    trainers = {}
    for name in LIBRARIES:
        trainers[name] = trainer_for(importlib.import_module(name), root / name, load_best_model_at_end=True)
        quietly(trainers[name].train)
        trainers[name].logs_when_trained = logs(trainers[name])  # (evaluate() adds to the history)
    return trainers


def test_checkpoints_hold_pefts_files(runs):
    ours, theirs = Path(runs["minilora.compat"].args.output_dir), Path(runs["peft"].args.output_dir)
    checkpoints = sorted(path.name for path in theirs.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert sorted(path.name for path in ours.glob("checkpoint-*")) == checkpoints
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= set(os.listdir(theirs / "checkpoint-2"))
    for name in checkpoints:
        assert_same_checkpoint(ours / name, theirs / name)


def test_losses_and_eval_loss_as_peft(runs):
    ours, theirs = runs["minilora.compat"], runs["peft"]
    assert theirs.label_names == ["labels"] and ours.label_names == ["labels"]  # no task_type: from GPT-2's forward
    eval_losses = [entry["eval_loss"] for entry in logs(ours) if "eval_loss" in entry]
    assert len(eval_losses) == STEPS // EVERY
    assert logs(ours) == logs(theirs)  # losses, grad norms, eval losses: bitwise
    metrics, their_metrics = ({k: v for k, v in quietly(trainer.evaluate).items() if not any(w in k for w in TIMINGS)}
                              for trainer in (ours, theirs))
    assert "eval_loss" in their_metrics and metrics == their_metrics


def test_best_model_is_reloaded_as_with_peft(runs):
    """load_best_model_at_end: Trainer reads the best checkpoint's adapter back with load_adapter; the
    model ends with its weights, and PEFT's trainability, mode and config."""
    ours, theirs = runs["minilora.compat"], runs["peft"]
    assert Path(ours.state.best_model_checkpoint).name == Path(theirs.state.best_model_checkpoint).name
    model, their_model = ours.model, theirs.model
    their_weights = {key: value for key, value in their_model.state_dict().items() if ".lora_" in key}
    weights = {key: value for key, value in model.state_dict().items() if ".lora_" in key}
    assert_same_adapter(weights, their_weights)
    best = adapter_tensors(Path(theirs.state.best_model_checkpoint))
    assert all(torch.equal(weights[key.replace(".weight", ".default.weight")], best[key]) for key in best)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in their_model.named_parameters()}
    assert model.training == their_model.training
    assert model.peft_config["default"].inference_mode == their_model.peft_config["default"].inference_mode


def test_save_model_writes_pefts_files(runs, tmp_path):
    for name, trainer in runs.items():
        quietly(trainer.save_model, str(tmp_path / name))
    ours, theirs = tmp_path / "minilora.compat", tmp_path / "peft"
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    assert_same_adapter(adapter_tensors(ours), adapter_tensors(theirs))


def test_resume_from_checkpoint_as_peft(runs, tmp_path):
    """A new model and Trainer, resumed from checkpoint-2 of the run above: Trainer loads the adapter
    (and the optimizer) back and trains steps 3 and 4 as PEFT's does."""
    resumed = {}
    for name in LIBRARIES:
        resumed[name] = trainer_for(importlib.import_module(name), tmp_path / name)
        quietly(resumed[name].train, resume_from_checkpoint=str(Path(runs[name].args.output_dir) / "checkpoint-2"))
    ours, theirs = resumed["minilora.compat"], resumed["peft"]
    assert [entry["step"] for entry in logs(theirs) if "loss" in entry] == [1, 2, 3, 4]  # 1, 2 from the checkpoint
    assert logs(ours) == logs(theirs)
    assert_same_checkpoint(tmp_path / "minilora.compat" / "checkpoint-4", tmp_path / "peft" / "checkpoint-4")


@pytest.mark.parametrize("arguments", [dict(gradient_checkpointing=True), dict(neftune_noise_alpha=5.0)])
def test_gradient_checkpointing_and_neftune_as_peft(tmp_path, arguments):
    """gradient_checkpointing: the frozen embedding's output must require grad (PEFT's wrapper and
    compat's both see to it), or no gradient reaches the adapters. NEFTune: Trainer puts its noise
    hook on your model's embedding, found through the PEFT wrapper."""
    trained = {}
    for name in LIBRARIES:
        trained[name] = trainer_for(importlib.import_module(name), tmp_path / name, task_type="CAUSAL_LM", max_steps=2,
                                    save_strategy="no", eval_strategy="no", **arguments)
        quietly(trained[name].train)
    ours, theirs = trained["minilora.compat"], trained["peft"]
    assert logs(ours) == logs(theirs) and all(entry["grad_norm"] > 0 for entry in logs(theirs) if "loss" in entry)


def test_real_peft_models_are_still_recognised(runs):
    from transformers.trainer_utils import _is_peft_model, unwrap_peft_model

    for trainer in runs.values():
        assert _is_peft_model(trainer.model)
        assert unwrap_peft_model(trainer.model) is trainer.model.get_base_model()
    assert not _is_peft_model(make_tiny_gpt2())


def test_a_trainer_that_looks_elsewhere_is_left_as_it_was_with_a_warning(monkeypatch):
    """When Trainer's own _is_peft_model does not recognise the wrapper after the change (a transformers
    laid out otherwise), its names are put back and a warning says what Trainer will do instead."""
    import transformers.trainer as trainer_module
    import transformers.trainer_utils as utils_module

    from minilora import compat_trainer

    monkeypatch.setattr(compat_trainer, "_recognised", False)
    for module in (trainer_module, utils_module):
        monkeypatch.setattr(module, "PeftModel", module.PeftModel)  # (put back after the test)
        monkeypatch.setattr(module, "_is_peft_model", lambda model: False)  # a check that reads other names
    before = (trainer_module.PeftModel, utils_module.PeftModel)
    with pytest.warns(UserWarning, match="could not be made to treat minilora.compat's PeftModel"):
        compat.get_peft_model(make_tiny_gpt2(**TINY), compat.LoraConfig(r=4, target_modules=["c_attn"]))
    assert (trainer_module.PeftModel, utils_module.PeftModel) == before


WITHOUT_PEFT = """
import json, sys, warnings
sys.modules["peft"] = None  # as if peft were not installed: importing it fails, find_spec finds nothing
sys.path.insert(0, sys.argv[2])
import conftest, test_compat_trainer as script
import minilora.compat as compat
from transformers.utils import is_peft_available
assert not is_peft_available()
warnings.simplefilter("ignore")
trainer = script.trainer_for(compat, script.Path(sys.argv[1]), load_best_model_at_end=True)
trainer.train()
assert "peft" not in [name.split(".")[0] for name, m in sys.modules.items() if m is not None]
print(json.dumps({"logs": script.logs(trainer), "label_names": trainer.label_names}))
"""


def test_without_peft_installed_trainer_does_the_same(runs, tmp_path):
    """In a process where peft cannot be imported (transformers' is_peft_available() is False), the
    same script gives the same checkpoints and logs as above, so the same as PEFT's."""
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", WITHOUT_PEFT, str(tmp_path), str(tests)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    theirs = runs["peft"]
    assert result["label_names"] == ["labels"]
    assert result["logs"] == json.loads(json.dumps(theirs.logs_when_trained))
    for name in ("checkpoint-2", "checkpoint-4"):
        assert_same_checkpoint(tmp_path / name, Path(theirs.args.output_dir) / name)
