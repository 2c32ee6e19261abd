"""The offline stand-ins for the hub models of PEFT's model tests (parity/peft_offline_models.py).

Every id in the table is built and loaded through ``from_pretrained`` in a subprocess whose network is cut
(any connection or address look-up raises): the Auto class and the model class give bitwise the weights
of ``build(id)``, twice, named by the hub id; ``AutoConfig`` gives the same config; kwargs work as for a
download (``num_labels``, another head on the same checkpoint). The subprocess's weights are compared
with this process's ``build``: the same id gives the same weights in every process, so in both of
``python -m parity peft-tests``'s modes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity import peft_offline_models
from parity.peft_offline_models import STAND_INS

REPO_ROOT = Path(__file__).resolve().parents[1]

LOADS = r'''
import hashlib, json, socket, sys, warnings
import torch, transformers

def cut(*args, **kwargs):
    raise OSError("test: no network")

socket.socket.connect = cut
socket.getaddrinfo = cut
warnings.simplefilter("ignore")
transformers.utils.logging.set_verbosity_error()
from parity import peft_offline_models as m

replaced = m.install()
AUTO = {"CausalLM": "AutoModelForCausalLM", "LMHeadModel": "AutoModelForCausalLM",
        "ConditionalGeneration": "AutoModelForSeq2SeqLM", "SequenceClassification": "AutoModelForSequenceClassification"}

def digest(model):
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode()); h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

out = {"replaced": replaced, "models": {}}
for hub_id, stand_in in m.STAND_INS.items():
    auto = getattr(transformers, next((a for k, a in AUTO.items() if stand_in.class_name.endswith(k)), "AutoModel"))
    first, second = auto.from_pretrained(hub_id), getattr(transformers, stand_in.class_name).from_pretrained(hub_id)
    config = transformers.AutoConfig.from_pretrained(hub_id)
    out["models"][hub_id] = {
        "class": type(first).__name__, "digests": [digest(first), digest(second)],
        "names": [first.name_or_path, first.config._name_or_path, second.name_or_path, config._name_or_path],
        "config": config.to_diff_dict() == first.config.to_diff_dict()}
bert = transformers.AutoModelForTokenClassification.from_pretrained("peft-internal-testing/tiny-random-RobertaModel",
                                                                    num_labels=11)
out["token_classifier"] = [type(bert).__name__, bert.classifier.out_features, bert.name_or_path]
out["used"] = m.used()
print(json.dumps(out))
'''


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def loaded():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", LOADS], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_id_loads_offline_as_its_seeded_build(loaded):
    assert set(loaded["models"]) == set(STAND_INS) and loaded["used"] == sorted(STAND_INS)
    for hub_id, stand_in in STAND_INS.items():
        got = loaded["models"][hub_id]
        built = peft_offline_models.build(hub_id)
        assert got["class"] == type(built).__name__ == stand_in.class_name, hub_id
        assert got["digests"] == [digest(built)] * 2, f"{hub_id}: other weights in another call or process"
        assert got["names"] == [hub_id] * 4 and got["config"], hub_id
    assert loaded["token_classifier"] == ["RobertaForTokenClassification", 11,
                                          "peft-internal-testing/tiny-random-RobertaModel"]
    assert len(loaded["replaced"]) == 4


def test_builds_are_tiny_distinct_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    digests = {}
    for hub_id in STAND_INS:
        model = peft_offline_models.build(hub_id)
        assert sum(p.numel() for p in model.parameters()) < 100_000 and not model.training, hub_id
        digests[hub_id] = digest(model)
    assert torch.equal(torch.rand(3), expected)
    assert len(set(digests.values())) == len(STAND_INS)  # two ids of one class are two random models
    assert peft_offline_models.seed_of("a") == peft_offline_models.seed_of("a") != peft_offline_models.seed_of("b")


def test_unknown_ids_and_local_folders_are_left_to_transformers(tmp_path, monkeypatch):
    """Only the table's ids are stood in: another id fails as before (offline), and a local folder named
    like a known id (a user's own download) is loaded as it is."""
    import transformers

    from parity.peft_offline_models import _known

    assert not _known("peft-internal-testing/not-in-the-table") and not _known(None)
    hub_id = "peft-internal-testing/tiny-random-BertModel"
    assert _known(hub_id)
    monkeypatch.chdir(tmp_path)
    transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                                   intermediate_size=8, vocab_size=16)).save_pretrained(hub_id)
    assert not _known(hub_id)
