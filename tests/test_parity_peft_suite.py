"""``python -m parity peft-tests`` (parity/peft_suite.py) on a small fake PEFT tests folder written here.

The fake folder holds parametrized tests in PEFT's style (``from peft import get_peft_model, LoraConfig``):
one that both libraries pass, one that checks the names swapped in minilora mode (peft.tuners.lora's
LoraConfig, isinstance of LoraLayer / BaseTunerLayer), one planted to pass with PEFT and fail with
minilora.compat (it must be a "differ" and make the exit status 1), a DoRA case that minilora refuses,
a test PEFT skips, one that reaches for the network (which the runs do not have), one that loads a hub
model twice (the runner's offline stand-in, the same in both modes), and a case on a Conv2d model (outside
the default scope). The run starts two pytest
subprocesses; the rest of the file tests the classification and the report without any.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from parity import peft_plugin, peft_suite
from parity.peft_suite import AGREE, DIFFER, NA, REFUSED, classify, out_of_scope_feature

FAKE_TESTS = '''
import pytest
from torch import nn

from peft import LoraConfig, get_peft_model


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.lin1(self.lin0(x).relu())


class ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(1, 2, 3)


MODELS = {"MLP": MLP, "Conv2d": ConvModel}
CASES = [
    ("MLP lin0", "MLP", LoraConfig, {"target_modules": ["lin0"]}),
    ("MLP DoRA", "MLP", LoraConfig, {"target_modules": ["lin0"], "use_dora": True}),
    ("Conv2d", "Conv2d", LoraConfig, {"target_modules": ["conv2d"]}),
]


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs", CASES)
def test_trainable_names(test_name, model_id, config_cls, config_kwargs):
    model = get_peft_model(MODELS[model_id](), config_cls(**config_kwargs))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs", CASES)
def test_peft_names(test_name, model_id, config_cls, config_kwargs):
    from peft.tuners import lora
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert lora.LoraConfig is config_cls
    model = get_peft_model(MODELS[model_id](), config_cls(**config_kwargs))
    assert any(isinstance(module, lora.LoraLayer) and isinstance(module, BaseTunerLayer) for module in model.modules())


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs", CASES)
def test_planted_peft_class(test_name, model_id, config_cls, config_kwargs):
    model = get_peft_model(MODELS[model_id](), config_cls(**config_kwargs))
    assert type(model).__module__.startswith("peft."), "planted: only PEFT's own class passes"


@pytest.mark.parametrize("test_name, model_id, config_cls, config_kwargs", CASES)
def test_needs_gpu(test_name, model_id, config_cls, config_kwargs):
    pytest.skip("planted: needs a GPU")


@pytest.mark.parametrize("config_cls", [LoraConfig])
def test_reaches_the_network(config_cls):
    import socket

    socket.create_connection(("10.255.255.1", 80), timeout=60)


@pytest.mark.parametrize("config_cls", [LoraConfig])
def test_loads_a_hub_model_twice(config_cls):
    import torch
    from transformers import AutoModelForCausalLM

    hub_id = "peft-internal-testing/tiny-random-OPTForCausalLM"  # offline: the runner's stand-in
    model, again = AutoModelForCausalLM.from_pretrained(hub_id), AutoModelForCausalLM.from_pretrained(hub_id)
    model = get_peft_model(model, config_cls(target_modules=["q_proj"]))
    assert model.peft_config["default"].base_model_name_or_path == hub_id
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_not_a_lora_case():
    pass
'''


@pytest.fixture(scope="module")
def peft_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-src")
    (root / "tests").mkdir()
    (root / "tests" / "__init__.py").write_text("")
    (root / "tests" / "test_custom_models.py").write_text(textwrap.dedent(FAKE_TESTS))
    (root / "src" / "peft").mkdir(parents=True)
    (root / "src" / "peft" / "__init__.py").write_text('__version__ = "9.9.9.dev0"\n')
    (root / "tests" / "test_broken.py").write_text("def test_x(:\n")  # a syntax error: pytest cannot collect it
    return root


def verdicts(path) -> dict[str, tuple[str, str]]:
    rows = json.loads(path.read_text())["tests"]
    return {f"{row['function']}[{row['case']}]": (row["verdict"], row["detail"]) for row in rows}


def test_fake_suite_differ_refused_and_na(peft_src, tmp_path, capsys):
    out = tmp_path / "out.json"
    code = peft_suite.main(["--peft-src", str(peft_src), "--json", str(out), "--markdown", str(tmp_path / "out.md"),
                            "--quiet"])
    printed = capsys.readouterr().out
    got = verdicts(out)
    assert code == 1, printed
    assert {name: verdict for name, (verdict, _) in got.items()} == {
        "test_trainable_names[MLP lin0]": AGREE,
        "test_trainable_names[MLP DoRA]": REFUSED,
        "test_peft_names[MLP lin0]": AGREE,  # peft.tuners.lora.LoraConfig and LoraLayer are minilora's there
        "test_peft_names[MLP DoRA]": REFUSED,
        "test_planted_peft_class[MLP lin0]": DIFFER,
        "test_planted_peft_class[MLP DoRA]": REFUSED,
        "test_needs_gpu[MLP lin0]": NA,
        "test_needs_gpu[MLP DoRA]": NA,
        "test_reaches_the_network[LoraConfig]": NA,  # fails with PEFT: no network in the runs
        "test_loads_a_hub_model_twice[LoraConfig]": AGREE,  # the hub id is a stand-in, in both modes
    }  # the Conv2d model is outside the default scope; test_not_a_lora_case is no LoRA case
    assert got["test_planted_peft_class[MLP lin0]"][1].startswith("AssertionError: planted: only PEFT's own class")
    assert got["test_trainable_names[MLP DoRA]"][1].startswith("DoRA: ")
    assert "skipped with PEFT: planted: needs a GPU" == got["test_needs_gpu[MLP lin0]"][1]
    assert "no network in these runs" in got["test_reaches_the_network[LoraConfig]"][1]
    assert "10 tests: 3 agree, 1 differ, 3 refused (out of scope), 3 N/A" in printed
    assert "AssertionError: planted" in printed and "refused (out of scope): DoRA 3" in printed
    page = (tmp_path / "out.md").read_text()
    assert "| test_planted_peft_class | 2 | 0 | 1 | 1 | 0 |" in page and "planted: only PEFT's own class" in page
    assert not list(peft_src.rglob("__pycache__")), "the user's checkout must not be written to"
    assert json.loads(out.read_text())["tests_from"] == "peft 9.9.9.dev0 (src/peft/__init__.py)"
    assert json.loads(out.read_text())["stand_ins"] == ["peft-internal-testing/tiny-random-OPTForCausalLM"]
    assert "`peft-internal-testing/tiny-random-OPTForCausalLM`" in page


def test_without_offline_models_the_hub_id_is_not_found(peft_src, tmp_path, monkeypatch):
    """--no-offline-models: transformers looks for the id as it is (offline, an empty cache): PEFT fails it, N/A."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    out = tmp_path / "out.json"
    peft_suite.main(["--peft-src", str(peft_src), "--json", str(out), "--quiet", "--no-offline-models",
                     "-k", "hub_model"])
    verdict, detail = verdicts(out)["test_loads_a_hub_model_twice[LoraConfig]"]
    assert verdict == NA and detail.startswith("fails with PEFT") and json.loads(out.read_text())["stand_ins"] == []


def test_nothing_differs_exits_0(peft_src, tmp_path, monkeypatch, capsys):
    """The exit status comes from the comparison: two runs that agree (or refuse) give 0 (no subprocess here)."""
    record = {"id": "tests/test_custom_models.py::test_a[x]", "function": "test_a", "test_name": "x", "outcome": "passed"}
    refused = {**record, "id": record["id"].replace("[x]", "[y]"), "test_name": "y"}
    runs = {"peft": peft_suite.ModeRun("peft", selected=2, records={r["id"]: r for r in (record, refused)}),
            "minilora": peft_suite.ModeRun("minilora", selected=2, records={
                record["id"]: record, refused["id"]: {**refused, **failed("minilora cannot honour use_dora=True", True)}})}
    monkeypatch.setattr(peft_suite, "run_mode", lambda mode, *args, **kwargs: runs[mode])
    assert peft_suite.main(["--peft-src", str(peft_src), "--quiet"]) == 0
    assert "2 tests: 1 agree, 0 differ, 1 refused (out of scope), 0 N/A" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--peft-src", "/no/such/peft"], "no such directory"),
    (["--peft-src", "EMPTY"], "no tests found"),
    (["--peft-src", "SRC", "--file", "test_missing.py"], "--file test_missing.py: not found"),
    (["--peft-src", "SRC", "--json", "A_FILE/x.json"], "--json"),
    (["--peft-src", "SRC", "--file", "test_broken.py"], "with PEFT, pytest cannot collect tests/test_broken.py: "),
])
def test_usage_errors_exit_2_with_one_line(argv, message, peft_src, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    argv = [str(peft_src) if a == "SRC" else str(tmp_path) if a == "EMPTY" else a.replace("A_FILE", str(tmp_path / "a-file"))
            for a in argv]
    assert peft_suite.main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_help_mentions_the_verdicts(capsys):
    with pytest.raises(SystemExit) as exit_:
        peft_suite.main(["--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert all(word in printed for word in ("agree", "differ", "refused", "N/A", "exit status", "--no-offline-models",
                                            "stand-in"))


# ------------------------------------------------------------------------------------------------
# the classification, record by record
# ------------------------------------------------------------------------------------------------
PASSED = {"outcome": "passed"}


def failed(message: str, refusal: bool, type_: str = "MiniLoraError") -> dict:
    return {"outcome": "failed", "error": {"type": type_, "message": message, "refusal": refusal, "where": ""}}


@pytest.mark.parametrize("message, feature", [
    ("LoraConfig: minilora cannot honour use_dora=True (DoRA (weight-decomposed LoRA)).", "DoRA"),
    ("target 'emb' is a Embedding; LoRA here wraps nn.Linear or Conv1D only.", "Embedding"),
    ("target 'conv1d' is a Conv1d; LoRA here wraps nn.Linear or Conv1D only.", "Conv1d/Conv2d/Conv3d"),
    ("target 'mha' is a MultiheadAttention; LoRA here wraps nn.Linear or Conv1D only.", "MultiheadAttention"),
    ("LoraConfig got fields minilora does not know: ['velora_config'].", "VeLoRA"),
    ("init_lora_weights must be True, False or 'gaussian', got 'mica'.", "init_lora_weights (MiCA, PiSSA, ...)"),
    ("init_lora_weights='pissa' is one of PEFT's data- or SVD-based initialisations.", "init_lora_weights (MiCA, PiSSA, ...)"),
    # lora_bias is in scope: refusing a combination PEFT allows is a difference
    ("The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
     "init_lora_weights=gaussian instead.", None),
    ("minilora cannot honour target_parameters=['lin0.weight'].", "target_parameters"),
    ("minilora cannot honour trainable_token_indices={'emb': [0]}.", "trainable tokens"),
    ("get_peft_model(mixed=True) builds PEFT's PeftMixedModel (LoRA mixed with LoHa, LoKr, ...); minilora has LoRA "
     "only.", "PeftMixedModel (LoRA mixed with other PEFT methods)"),
    ("get_peft_model got a IA3Config: IA3 is another PEFT method, and minilora has LoRA only. Use "
     "minilora.compat.LoraConfig.", "other PEFT methods (IA3, LoHa, ...)"),
    ("ensure_weight_tying=True with a tied layer in modules_to_save (tied to the input embedding: ['lm_head']): "
     "PEFT then trains one copy of the embedding and shares it with the tied layers, which minilora does not do.",
     "ensure_weight_tying of tied modules_to_save (one shared trained copy)"),
    ("ensure_weight_tying must be True or False (a bool), got 1.", None),  # a bad value is no refused feature
    ("delete_adapter: no adapter named 'x'; the model has ['default'].", None),
    ("LoraConfig got fields minilora does not know: ['layers_pattern'].", None),
    ("target 'lin0' is a Conv1D", None),  # transformers' Conv1D is in scope
])
def test_out_of_scope_feature(message, feature):
    assert out_of_scope_feature(message) == feature


def test_every_peft_feature_minilora_lacks_is_out_of_scope():
    from minilora import MiniLoraError
    from minilora.adapter_config import UNSUPPORTED_FIELDS, check_unsupported

    for name in UNSUPPORTED_FIELDS:
        with pytest.raises(MiniLoraError) as refused:
            check_unsupported({name: True}, "LoraConfig")
        assert out_of_scope_feature(str(refused.value)), name
        # a later sentence that lists every field names no feature
        assert out_of_scope_feature(f"LoraConfig got fields minilora does not know: ['{name}']. Its fields: ['r'].")
    assert out_of_scope_feature("got fields minilora does not know: ['layers_pattern']. Its fields: ['use_dora'].") is None


def test_lora_conversion_is_refused_and_counted_out_of_scope():
    """PEFT answers supports_lora_conversion() True for a LoRA model and then converts it (peft.convert_to_lora);
    minilora has no conversion, so its wrapper refuses instead of answering, and the runner counts it refused."""
    import peft
    from torch import nn

    from minilora import MiniLoraError, compat

    models = {lib: lib.get_peft_model(nn.Sequential(nn.Linear(4, 4)), lib.LoraConfig(target_modules=["0"]))
              for lib in (peft, compat)}
    assert models[peft].supports_lora_conversion() is True
    with pytest.raises(MiniLoraError) as refused:
        models[compat].supports_lora_conversion()
    assert out_of_scope_feature(str(refused.value)) == "LoRA conversion (convert_to_lora)"


@pytest.mark.parametrize("peft, minilora, verdict", [
    (PASSED, PASSED, AGREE),
    (PASSED, failed("minilora cannot honour use_dora=True", refusal=True), REFUSED),
    (PASSED, failed("delete_adapter: no adapter named 'x'", refusal=True), DIFFER),  # a refusal of something in scope
    (PASSED, failed("use_dora is not what PEFT computed", refusal=False, type_="AssertionError"), DIFFER),
    (PASSED, {"outcome": "skipped", "reason": "why"}, DIFFER),
    (PASSED, None, DIFFER),
    ({"outcome": "skipped", "reason": "no GPU"}, failed("x", refusal=False), NA),
    (failed("broken", refusal=False, type_="ImportError"), PASSED, NA),
    (None, PASSED, NA),
])
def test_classify(peft, minilora, verdict):
    assert classify(peft, minilora)[0] == verdict


def test_importing_the_plugin_outside_its_subprocess_changes_nothing():
    """The tests import parity.peft_plugin: that must not stub modules, cut the network or swap PEFT's names."""
    import socket
    import sys

    import peft

    assert not peft_plugin.RUNNING and peft_plugin.REPLACED == []
    assert socket.getaddrinfo.__module__ == "socket" and socket.socket.connect.__qualname__ == "socket.connect"
    assert peft.get_peft_model.__module__.startswith("peft.")
    assert all(getattr(sys.modules[name], "__file__", None) for name in peft_plugin.OPTIONAL_IMPORTS
               if name in sys.modules)  # a stub has no file


def test_default_scope_is_lora_on_linear_and_conv1d_models():
    class LoraConfig:  # the plugin recognises PEFT's and minilora.compat's class by name
        pass

    def case(model_id, config_cls=LoraConfig):
        return {"test_name": "x", "model_id": model_id, "config_cls": config_cls, "config_kwargs": {}}

    assert peft_plugin.in_scope(case("MLP"), "linear-conv1d", [])
    assert peft_plugin.in_scope(case("EmbConv1D"), "linear-conv1d", [])
    assert not peft_plugin.in_scope(case("Conv2d"), "linear-conv1d", [])
    assert peft_plugin.in_scope(case("Conv2d"), "all-lora", [])
    assert not peft_plugin.in_scope(case("MLP", config_cls=type("IA3Config", (), {})), "all-lora", [])
    assert not peft_plugin.in_scope(case("MLP"), "linear-conv1d", ["another case"])


def _uses_lora():
    return "LoraConfig(r=8)"  # the plugin reads this function's source


def _uses_nothing():
    return "IA3"


def test_select_uses_lora_adds_tests_whose_code_names_lora_config():
    class IA3Config:
        __module__ = "peft.tuners.ia3.config"

    def chosen(params, function, select):
        return peft_plugin.in_scope(params, "linear-conv1d", [], select, function)

    assert chosen({}, _uses_lora, "uses-lora") and not chosen({}, _uses_lora, "cases")
    assert not chosen({}, _uses_nothing, "uses-lora")
    assert not chosen({"config_cls": IA3Config}, _uses_lora, "uses-lora")  # parametrized with another method
    assert chosen({"dtype": "float16"}, _uses_lora, "uses-lora")


def test_markdown_keeps_the_notes_block(tmp_path):
    from parity import peft_suite_report

    rows = [{"id": "t.py::test_a[c]", "file": "t.py", "function": "test_a", "case": "c", "model_id": "MLP",
             "verdict": AGREE, "detail": "", "peft": PASSED, "minilora": PASSED}]
    meta = {"command": "python -m parity peft-tests --peft-src x", "files": ["t.py"], "tests_from": "git v0.0",
            "installed": {"peft": "0", "torch": "0", "transformers": "0", "minilora": "git 0"}, "scope": "linear-conv1d",
            "replaced": ["peft.LoraConfig"], "seconds": {"peft": 1, "minilora": 1}, "timed_out": [],
            "counts": peft_suite.counts(rows)}
    page = tmp_path / "page.md"
    peft_suite_report.write_markdown(rows, meta, page)
    page.write_text(page.read_text().replace("(What the differences mean", "A person's note. (What"))
    peft_suite_report.write_markdown(rows, meta, page)
    assert "A person's note." in page.read_text() and "1 tests: 1 agree, 0 differ" in page.read_text()
