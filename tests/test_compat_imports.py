"""How minilora.compat and the files it names (compat_tasks.py, compat_auto.py) import each other:
any of them may be imported first, in a fresh interpreter; ``minilora.compat`` still offers every
name it offered before the task wrappers moved out (``from ... import``, ``import *``, ``dir``);
the classes keep their own module, so ``inspect.getsource`` finds them; and a whole wrapper saved
with ``torch.save(model)`` loads in a fresh process to the same outputs, also from a file that names
the classes by ``minilora.compat`` (what files saved before the split name)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from minilora import compat, compat_auto, compat_tasks
from minilora.models import tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]
MOVED = ["TASK_MODELS", "add_task_head", "check_head_not_targeted"]  # public before the split, not in __all__


def run_fresh(script: str, *args: str) -> str:
    """Run ``script`` in a new interpreter that imports minilora from this checkout; its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("first", ["minilora.compat_tasks", "minilora.compat_auto"])
def test_each_file_imports_first_in_a_fresh_interpreter(first):
    out = run_fresh(f"""
import sys
import {first}
import minilora.compat as compat, minilora.compat_tasks as tasks, minilora.compat_auto as auto
assert compat.PeftModelForCausalLM is tasks.PeftModelForCausalLM and compat.TASK_MODELS is tasks.TASK_MODELS
assert compat.AutoPeftModelForCausalLM is auto.AutoPeftModelForCausalLM
assert issubclass(tasks.PeftModelForCausalLM, compat.PeftModel)
print(sorted(name for name in sys.modules if name.startswith("minilora.compat")))
""")
    assert "'minilora.compat_auto', 'minilora.compat_config'" in out and "'minilora.compat_tasks'" in out


def test_from_import_and_import_star_in_a_fresh_interpreter():
    out = run_fresh("""
import sys
from minilora.compat import PeftModelForCausalLM, TASK_MODELS, add_task_head
namespace = {}
exec("from minilora.compat import *", namespace)
import minilora.compat as compat
missing = [name for name in compat.__all__ if namespace.get(name) is not getattr(compat, name)]
assert not missing, missing
assert TASK_MODELS["CAUSAL_LM"] is PeftModelForCausalLM is namespace["PeftModelForCausalLM"]
print(PeftModelForCausalLM.__module__, add_task_head.__module__, namespace["AutoPeftModel"].__module__)
""")
    assert out.split() == ["minilora.compat_tasks", "minilora.compat_tasks", "minilora.compat_auto"]


def test_dir_lists_the_names_from_the_other_files():
    listed = set(dir(compat))
    assert set(compat.__all__) | set(MOVED) <= listed, sorted(set(compat.__all__) | set(MOVED) - listed)
    for name in listed:  # every listed name is there
        getattr(compat, name)
    with pytest.raises(AttributeError, match="has no attribute 'PeftModelForNothing'"):
        compat.PeftModelForNothing


def test_the_classes_keep_their_module_and_source():
    for cls in (*compat.TASK_MODELS.values(), compat.AutoPeftModelForCausalLM):
        module = compat_auto if cls.__name__.startswith("Auto") else compat_tasks
        assert cls.__module__ == module.__name__ and getattr(module, cls.__name__) is cls
        assert inspect.getsource(cls).startswith(f"class {cls.__name__}("), cls.__name__
    assert inspect.getsource(compat.PeftModelForSequenceClassification.forward).startswith("def _forward_with_labels(")


def _qa_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2ForQuestionAnswering

    torch.manual_seed(0)
    config = tiny_gpt2().config.to_dict()
    return GPT2ForQuestionAnswering(GPT2Config(**config)).eval()


LOAD = """
import sys, torch
outputs = {}
for path in sys.argv[2:]:
    model = torch.load(path, weights_only=False)
    out = model(input_ids=torch.tensor([[1, 5, 9, 3]]))
    outputs[path] = out.logits if hasattr(out, "logits") else out.start_logits
    print(type(model).__module__, type(model).__name__)
torch.save(outputs, sys.argv[1])
"""


def test_a_whole_wrapper_saved_loads_in_a_fresh_process(tmp_path, monkeypatch):
    """torch.save(model) here, torch.load(weights_only=False) in a new interpreter: the same outputs,
    bitwise. ``old.pt`` is pickled with the names files saved before the split hold
    (``minilora.compat.PeftModelForCausalLM``, ``minilora.compat._forward_with_labels``)."""
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        causal = compat.get_peft_model(tiny_gpt2(), compat.LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                      init_lora_weights=False)).eval()
        qa = compat.get_peft_model(_qa_model(), compat.LoraConfig(task_type="QUESTION_ANS", r=2,
                                                                  target_modules=["c_attn"],
                                                                  init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = {"causal.pt": causal(input_ids=ids).logits, "old.pt": causal(input_ids=ids).logits,
                    "qa.pt": qa(input_ids=ids).start_logits}
    torch.save(causal, tmp_path / "causal.pt")
    torch.save(qa, tmp_path / "qa.pt")
    with monkeypatch.context() as patch:  # pickled by the old names (compat's __getattr__ finds the same objects)
        patch.setattr(compat.PeftModelForCausalLM, "__module__", "minilora.compat")
        patch.setattr(compat_tasks._forward_with_labels, "__module__", "minilora.compat")
        patch.setattr(compat.PeftModelForCausalLM, "forward", compat_tasks._forward_with_labels)  # (its forward then)
        causal._show_model_signature(causal.get_base_model())  # (the instance's forward: a partial of the class's)
        torch.save(causal, tmp_path / "old.pt")
    pickled = {}
    for name in expected:  # the pickle inside torch.save's zip file: protocol 2 names a global "module\nname\n"
        with zipfile.ZipFile(tmp_path / name) as archive:
            pickled[name] = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    assert b"minilora.compat\nPeftModelForCausalLM\n" in pickled["old.pt"]
    assert b"minilora.compat\n_forward_with_labels\n" in pickled["old.pt"] and b"compat_tasks" not in pickled["old.pt"]
    assert b"minilora.compat_tasks\nPeftModelForCausalLM\n" in pickled["causal.pt"]
    assert b"minilora.compat_tasks\nPeftModelForQuestionAnswering\n" in pickled["qa.pt"]

    paths = [str(tmp_path / name) for name in expected]
    out = run_fresh(LOAD, str(tmp_path / "outputs.pt"), *paths)
    assert out.splitlines() == ["minilora.compat_tasks PeftModelForCausalLM"] * 2 + \
        ["minilora.compat_tasks PeftModelForQuestionAnswering"]
    loaded = torch.load(tmp_path / "outputs.pt")
    for name, path in zip(expected, paths):
        print(name, "max |diff|", (loaded[path] - expected[name]).abs().max().item())
        assert torch.equal(loaded[path], expected[name]), name
