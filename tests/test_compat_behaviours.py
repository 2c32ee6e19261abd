"""minilora.compat does what PEFT does in the places a script can notice: the random numbers it
draws, the train/eval mode of new layers, the warnings PEFT gives, unknown config fields, and
adapters named by a Hugging Face hub id (from a pre-populated cache, offline). PEFT is the oracle:
each test runs the same calls with both libraries.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import minilora
from minilora import MiniLoraError, compat

ROOT = Path(__file__).resolve().parents[1]


class LinearModel(nn.Module):
    """The model of the PEFT issue #2115 article: one nn.Linear(10, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def double_wrap_script(lib, directory: Path) -> dict[str, list[float]]:
    """PEFT issue #2115's double wrap, step by step, recording every number the script prints and
    the random numbers it draws after each library call (seed 42, r=4, alpha=16, one Adam step)."""
    record = {}
    torch.manual_seed(42)
    config = lib.LoraConfig(r=4, lora_alpha=16, target_modules=["linear"], lora_dropout=0.1)
    model = lib.get_peft_model(LinearModel(), config)
    x = torch.randn(1, 10)
    record["original"] = model(x).tolist()  # train mode: PEFT's new layers are in train mode, dropout draws
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    nn.MSELoss()(model(x), torch.randn(1, 1)).backward()
    optimizer.step()
    record["trained"] = model(x).tolist()
    model.save_pretrained(directory)
    record["after save"] = torch.rand(3).tolist()

    again = lib.get_peft_model(LinearModel(), config)
    record["after second get_peft_model"] = torch.rand(3).tolist()
    again = lib.PeftModel.from_pretrained(again, directory)  # pitfall 1: PEFT wraps again, draws a new init
    record["after from_pretrained on it"] = torch.rand(3).tolist()
    record["double-wrapped output"] = again(torch.randn(1, 10)).tolist()
    loaded = lib.PeftModel.from_pretrained(LinearModel(), directory, is_trainable=True)
    record["after from_pretrained"] = torch.rand(3).tolist()
    record["loaded output (train mode)"] = loaded(torch.randn(2, 10)).tolist()
    return record


def test_random_stream_is_peft_s(tmp_path):
    """Every compat call draws from the default generator exactly what the PEFT call draws, so the
    script's later random numbers are PEFT's. The one difference is the point of minilora: the
    double-wrapped model gives the trained output, where PEFT's has re-initialised its adapter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "missing adapter keys" warning for the double wrap
        theirs = double_wrap_script(peft, tmp_path / "peft")
        ours = double_wrap_script(compat, tmp_path / "mini")
    different = {key for key in theirs if theirs[key] != ours[key]}
    assert different == {"double-wrapped output"}, different  # PEFT's re-initialised B = 0; minilora loaded it


def article_script(lib, directory: Path) -> dict[str, float]:
    """The script of the PEFT issue #2115 article (Hoper-J, "AI-Guide-and-Demos"), call for call:
    seed 42, LinearModel(10, 1), r=4, alpha=16, one Adam step on 100 random rows, save, then
    method 1 (get_peft_model, then PeftModel.from_pretrained) and method 2 (from_pretrained on the
    untouched base), and the four outputs on one torch.randn(1, 10) drawn after both loads."""
    torch.manual_seed(42)
    model = LinearModel()
    original = copy.deepcopy(model)
    config = lib.LoraConfig(inference_mode=False, r=4, lora_alpha=16, target_modules=["linear"])
    trained = lib.get_peft_model(model, config)
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)
    inputs, targets = torch.randn(100, 10), torch.randn(100, 1)
    trained.train()
    optimizer.zero_grad()
    nn.MSELoss()(trained(inputs), targets).backward()
    optimizer.step()
    trained.save_pretrained(directory)
    method_1 = lib.PeftModel.from_pretrained(lib.get_peft_model(copy.deepcopy(original), config), directory)
    method_2 = lib.PeftModel.from_pretrained(copy.deepcopy(original), directory)
    test_input = torch.randn(1, 10)
    models = {"original": original, "trained": trained, "method 1": method_1, "method 2": method_2}
    return {name: m(test_input).item() for name, m in models.items()}


def test_article_script_prints_the_article_s_numbers(tmp_path):
    """The article prints -0.03600371 (original) and -0.03428639 (trained). PEFT's method 1 gives
    the original (its second wrap re-initialises B = 0); compat's gives the trained one, and every
    other number is the article's, so compat drew exactly PEFT's random numbers on the way."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "missing adapter keys" warning for method 1
        theirs = article_script(peft, tmp_path / "peft")
        ours = article_script(compat, tmp_path / "mini")
    original, trained = -0.03600371, -0.03428639  # printed by the article (numpy float32, 8 digits)
    article = {"original": original, "trained": trained, "method 1": original, "method 2": trained}
    assert theirs == pytest.approx(article, abs=5e-9)
    assert ours == pytest.approx({**article, "method 1": trained}, abs=5e-9)


def test_new_layers_start_in_train_mode_as_peft():
    """PEFT leaves new LoRA layers in train mode inside an eval() model; compat does the same, the
    native inject follows the model's mode (README, "Train and eval mode")."""
    for lib in (peft, compat):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
        wrapped = lib.get_peft_model(model, lib.LoraConfig(r=2, target_modules=["0"], lora_dropout=0.5))
        layer = wrapped.get_submodule("base_model.model.0")
        assert layer.training and layer.lora_dropout["default"].training, lib.__name__
        assert not layer.base_layer.training, lib.__name__
        wrapped.add_adapter("other", lib.LoraConfig(r=2, target_modules=["0", "1"], lora_dropout=0.5))
        assert layer.lora_dropout["other"].training, lib.__name__
    native = minilora.inject(nn.Sequential(nn.Linear(4, 4)).eval(), minilora.LoraConfig(r=2, target_modules=["0"]))
    assert not native[0].training and not native[0].lora_dropout["default"].training


def test_unknown_config_fields_are_a_minilora_error():
    with pytest.raises(MiniLoraError, match=r"fields minilora does not know: \['lora_future', 'lora_rank'\]"):
        compat.LoraConfig(r=4, lora_future=None, lora_rank=8)
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert {f.name for f in dataclasses.fields(compat.LoraConfig)} >= peft_fields - {"peft_type", "runtime_config"}
    compat.LoraConfig(r=4, eva_config=None, lora_ga_config=None, target_parameters=[])  # PEFT's "not used" values
    assert compat.LoraConfig(r=4, task_type="CAUSAL_LM").r == 4


# ------------------------------------------------------------------------------------------------
# PEFT's warnings
# ------------------------------------------------------------------------------------------------
def _pair(**config):
    models = []
    for lib in (peft, compat):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.append(lib.get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                                             lib.LoraConfig(r=2, target_modules=["0", "1"], **config)))
    return models


def test_disabling_adapters_that_train_biases_warns_as_peft():
    for model in _pair(bias="all"):
        with pytest.warns(UserWarning, match="Careful, disabling adapter layers with bias configured to be 'all' "
                                             "does not produce the same output"):
            model.disable_adapter_layers()


def test_leaving_disable_adapter_from_a_mixed_state_warns_as_peft():
    theirs, ours = _pair()
    theirs.base_model.model[0].enable_adapters(False)
    ours.base_model.model[0].disabled = True
    for model in (theirs, ours):
        with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
            with model.disable_adapter():
                pass
    assert [s.enabled for s in theirs.get_layer_status()] == [s.enabled for s in ours.get_layer_status()] == \
        [True, True]


# ------------------------------------------------------------------------------------------------
# Hub ids, resolved through huggingface_hub's cache (offline)
# ------------------------------------------------------------------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _populate_cache(cache: Path, repo_id: str, adapter: Path, subfolder: str | None = None) -> None:
    """The layout huggingface_hub's download leaves: refs/main -> a commit, snapshots/<commit>/files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT / (subfolder or "")
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in adapter.iterdir():
        if file.is_file():
            (snapshot / file.name).write_bytes(file.read_bytes())


LOAD_SCRIPT = """
import json, sys, torch
from torch import nn
from minilora import MiniLoraError
from minilora.compat import PeftModel
for model_id, kwargs in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    try:
        model = PeftModel.from_pretrained(model, model_id, **kwargs)
        print(json.dumps(model(torch.ones(1, 4)).tolist()))
    except MiniLoraError as error:
        print("MiniLoraError:", str(error).replace(chr(10), " "))
"""


def _load_offline(cache: Path, calls: list) -> list[str]:
    """Run PeftModel.from_pretrained for each (model_id, kwargs) in one fresh process, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(calls)], env=env,
                            capture_output=True, text=True, timeout=300, cwd=cache)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_hub_ids_load_from_the_cache_offline(tmp_path):
    torch.manual_seed(0)
    model = compat.get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                                  compat.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    expected = model(torch.ones(1, 4)).tolist()
    cache = tmp_path / "cache"
    _populate_cache(cache, "someone/tiny-adapter", tmp_path / "adapter")
    _populate_cache(cache, "someone/several", tmp_path / "adapter", subfolder="nested")

    plain, nested, missing, local = _load_offline(cache, [
        ["someone/tiny-adapter", {}], ["someone/several", {"subfolder": "nested"}],
        ["someone/not-in-cache", {}], ["./no-such-directory", {}]])
    assert json.loads(plain) == expected
    assert json.loads(nested) == expected
    assert missing.startswith("MiniLoraError:") and "not a local directory" in missing and "HF_HUB_OFFLINE" in missing
    assert local.startswith("MiniLoraError:") and "does not exist" in local
