"""The version matrix on a fake, fast path (no environment is built here), and the probes on the installed PEFT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import minilora
from parity import envs, matrix, probes, probes_adapters, probes_targets
from parity.results import CHECKS


def row(check, status, message="", configuration="linear r=8"):
    return {"check": check, "configuration": configuration, "device": "cpu", "metric": "m", "value": 0.0,
            "tolerance": 0.0, "status": status, "message": message}


def fake_run(version, statuses, probe_values=None, error=""):
    results = [row(check, status, f"why {check} {status}") for check, status in statuses]
    return {"peft": version, "environment": f"/envs/peft-{version}", "error": error,
            "versions": {"torch": "2.13.0+cpu", "transformers": f"tf-for-{version}", "peft": version},
            "suite": {"results": results},
            "probes": {name: {"question": f"{name}?", "value": value} for name, value in (probe_values or {}).items()}}


OLD = fake_run("0.6.2", [("forward", "PASS"), ("forward", "FAIL"), ("init", "N/A")],
               {"double_wrap": "base output, no warning", "default_targets": "c_attn"})
NEW = fake_run("0.21.2", [("forward", "PASS"), ("forward", "PASS"), ("init", "PASS")],
               {"double_wrap": "base output, warns 'x'", "default_targets": "c_attn"})


def test_matrix_writes_a_release_by_check_table_and_the_probes_by_stretch(tmp_path, capsys):
    page = tmp_path / "docs" / "versions.md"
    fakes = {"0.6.2": OLD, "0.21.2": NEW}
    assert matrix.main(["--peft", "0.6.2", "0.21.2", "--markdown", str(page)], runner=fakes.__getitem__) == 0
    text = page.read_text()
    assert "| release | transformers | " + " | ".join(CHECKS) + " |" in text

    def release_row(version, **cells):  # a check with no rows shows "-": kept, not dropped
        return " | ".join([f"| peft {version}", f"tf-for-{version}", *(cells.get(c, "-") for c in CHECKS)]) + " |"

    assert release_row("0.6.2", forward="**FAIL 1/2**", init="N/A 1") in text
    assert release_row("0.21.2", forward="PASS 2", init="PASS 1") in text
    # a probe that changed: one row per release; one that did not: one row for both
    assert "| double_wrap | 0.6.2 | `base output, no warning` |\n|  | 0.21.2 | `base output, warns 'x'` |" in text
    assert "| default_targets | 0.6.2 - 0.21.2 | `c_attn` |" in text
    assert "FAIL forward (linear r=8): why forward FAIL" in text and "N/A init (linear r=8): why init N/A" in text
    assert all(f"`{name}`" in text for name in CHECKS) and "## How to read the tables" in text
    assert "`double_wrap`: double_wrap?" in text  # the question, as the run recorded it
    data = json.loads(page.with_suffix(".json").read_text())
    assert [run["peft"] for run in data["runs"]] == ["0.6.2", "0.21.2"]
    assert "[2/2] peft 0.21.2" in capsys.readouterr().err


def test_probe_stretches_split_on_every_change_and_on_releases_that_did_not_run():
    runs = [fake_run(v, [], {"p": value}) for v, value in (("0.3.0", "a"), ("0.4.0", "a"), ("0.5.0", "b"),
                                                            ("0.6.2", "a"))]
    runs.insert(3, {**fake_run("0.6.0", [], {}), "probes": None})
    runs.append(fake_run("0.7.1", [], {"p": "a", "q": "only here"}))
    rows = matrix.probe_table(runs)
    assert rows[0] == ["probe", "releases", "answer"]
    assert rows[1:] == [["p", "0.3.0 - 0.4.0", "`a`"], ["", "0.5.0", "`b`"], ["", "0.6.0", "not run"],
                        ["", "0.6.2 - 0.7.1", "`a`"],
                        ["q", "0.3.0 - 0.5.0", "-"], ["", "0.6.0", "not run"], ["", "0.6.2", "-"],
                        ["", "0.7.1", "`only here`"]]


def test_the_page_re_renders_from_its_json_without_running_anything(tmp_path):
    page = tmp_path / "versions.md"
    matrix.main(["--peft", "0.6.2", "0.21.2", "--markdown", str(page)], runner={"0.6.2": OLD, "0.21.2": NEW}.get)
    first = page.read_text()
    page.write_text("stale")
    assert matrix.main(["--from-json", str(page.with_suffix(".json")), "--markdown", str(page)]) == 0
    assert page.read_text().replace("(Write what", "") == first.replace("(Write what", "")
    with pytest.raises(SystemExit):
        matrix.main(["--markdown", str(page)])  # neither --peft nor --from-json


def test_hand_written_notes_survive_regeneration(tmp_path):
    page = tmp_path / "versions.md"
    args = ["--peft", "0.21.2", "--markdown", str(page)]
    matrix.main(args, runner=lambda version: NEW)
    page.write_text(page.read_text().replace("(Write what the matrix shows here", "Hand-written: 0.12 is silent"))
    matrix.main(args, runner=lambda version: NEW)
    assert "Hand-written: 0.12 is silent" in page.read_text()


def test_a_release_that_could_not_run_says_why_and_fails_the_command(tmp_path, monkeypatch):
    def broken_build(version, root, log=print):
        raise envs.EnvError(f"pip install failed for peft {version}; see build.log")

    monkeypatch.setattr(envs, "build_env", broken_build)
    page = tmp_path / "versions.md"
    assert matrix.main(["--peft", "0.6.2", "--markdown", str(page), "--root", str(tmp_path)]) == 1
    text = page.read_text()
    assert "| peft 0.6.2 | - | " + " | ".join("not run" for _ in CHECKS) + " |" in text
    assert "could not run everything: pip install failed for peft 0.6.2" in text


def test_all_runs_every_known_release_oldest_first(tmp_path):
    asked = []
    page = tmp_path / "versions.md"
    matrix.main(["--peft", "all", "--markdown", str(page)], runner=lambda v: asked.append(v) or fake_run(v, [], {}))
    assert asked == list(envs.COMPANIONS) and asked[0] == "0.3.0" and asked[-1] == "0.21.2"
    assert "Generated by `python -m parity matrix --peft all`" in page.read_text()


def test_a_failed_install_names_pip_s_reason_and_does_not_fetch_torch(tmp_path, monkeypatch):
    """build_env with pip stubbed out: the constraint keeps this machine's torch; pip's ERROR line is the reason."""
    import subprocess
    import venv

    calls = []

    def fake_pip(command, stdout=None, **kwargs):
        calls.append(command)
        stdout.write("Collecting peft==0.6.2\nERROR: No matching distribution found for transformers==4.35.2\n")
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(venv.EnvBuilder, "create", lambda self, directory: Path(directory).mkdir(parents=True))
    monkeypatch.setattr(subprocess, "check_output", lambda *args, **kwargs: str(tmp_path / "site"))
    monkeypatch.setattr(subprocess, "run", fake_pip)
    (tmp_path / "site").mkdir()
    with pytest.raises(envs.EnvError, match="failed for peft 0.6.2: No matching distribution found for "
                                            "transformers==4.35.2; see .*build.log"):
        envs.build_env("0.6.2", tmp_path)
    pip = calls[0]
    assert pip[pip.index("--constraint") + 1].endswith("torch-constraint.txt") and "--no-compile" in pip
    assert (tmp_path / "peft-0.6.2" / "torch-constraint.txt").read_text() == f"torch=={torch.__version__}\n"
    assert not (tmp_path / "peft-0.6.2" / envs.READY_FILE).exists()  # not cached: the next run tries again


def test_envs_command_builds_all_or_the_named_releases_and_reports_failures(tmp_path, monkeypatch, capsys):
    built = []

    def fake_build(version, root, log=print):
        built.append((version, root))
        if version == "0.3.0":
            raise envs.EnvError("pip install failed for peft 0.3.0: reason")

    monkeypatch.setattr(envs, "build_env", fake_build)
    assert envs.main(["all", "--root", str(tmp_path)]) == 1
    assert [version for version, _ in built] == list(envs.COMPANIONS) and built[0][1] == tmp_path
    assert "FAILED 0.3.0: pip install failed for peft 0.3.0: reason" in capsys.readouterr().out
    built.clear()
    assert envs.main(["0.21.2", "--root", str(tmp_path)]) == 0 and built == [("0.21.2", tmp_path)]


def test_unknown_release_is_a_usage_error(capsys):
    assert matrix.main(["--peft", "9.9.9"]) == 2
    assert "no transformers release is pinned for peft 9.9.9" in capsys.readouterr().err
    with pytest.raises(envs.EnvError, match="COMPANIONS"):
        envs.requirements("9.9.9")
    assert envs.requirements("0.6.2")[0] == "peft==0.6.2"


def test_a_subprocess_that_writes_no_json_is_reported(tmp_path):
    data, why = matrix._run_json(sys.executable, ["no_such_module_for_parity"], log=print)
    assert data is None and "no_such_module_for_parity exited 1" in why and "No module named" in why


def test_details_group_consecutive_releases_with_the_same_reasons():
    def run(version, message):
        return {**fake_run(version, []), "suite": {"results": [row("init", "N/A", message)]}}

    runs = [run("0.6.2", "peft 0.6.2 has no X in /tmp/parity-ab_1/case"),
            run("0.7.1", "peft 0.7.1 has no X in /tmp/parity-cd_2/case"), run("0.8.2", "other"),
            fake_run("0.9.0", [("init", "PASS")], {})]
    text = matrix.details(runs)
    assert text.splitlines() == ["- **peft 0.6.2 - 0.7.1**", "  - N/A init (linear r=8): this release has no X in <tmp>/case",
                                 "- **peft 0.8.2**", "  - N/A init (linear r=8): other"]
    assert matrix.details(runs[3:]) == "Nothing failed and nothing was N/A."


def test_check_cells_sum_statuses():
    assert matrix.check_cell([]) == "-"
    assert matrix.check_cell([row("x", "PASS"), row("x", "N/A")]) == "PASS 1, N/A 1"
    assert matrix.check_cell([row("x", "FAIL"), row("x", "PASS"), row("x", "SKIP")]) == "**FAIL 1/3**"


@pytest.fixture(scope="module")
def answers():
    """Every probe's answer on the installed PEFT (the tiny GPT-2 throughout), measured once."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: answer["value"] for name, answer in probes.run_probes(gpt2_small=False).items()}
    finally:
        torch.set_num_threads(previous)


def test_probes_on_the_installed_peft(answers):
    """Each probe against an independent answer: minilora's own default, line, and init; PEFT's pitfall."""
    import peft
    from minilora.targets import DEFAULT_TARGET_MODULES

    assert set(answers) == set(probes.PROBES)
    assert not [value for value in answers.values() if value.startswith(("error", "absent", "raises"))], answers
    assert answers["default_targets"] == ",".join(DEFAULT_TARGET_MODULES["gpt2"])
    tiny = probes.tiny_gpt2()
    torch.manual_seed(0)
    minilora.inject(tiny, minilora.LoraConfig(r=8, lora_alpha=16))
    assert answers["trainable_line"] == minilora.trainable_parameters_line(tiny)
    assert answers["same_seed"] == "yes; equal to minilora"
    assert answers["merge_and_unload_gpt2"] == "works; c_attn is Conv1D again"
    assert answers["adapter_files"].startswith("adapter_config.json + adapter_model.safetensors; base_model.model.")
    assert answers["double_wrap"].startswith("base output")  # PEFT's pitfall, as issue 3 describes it
    assert answers["bf16_adapter_dtype"] == "float32" and answers["rslora"] == "yes"
    assert peft.__version__ in envs.COMPANIONS


def test_target_probes_agree_with_peft_s_table_and_with_the_model_s_layers(answers):
    """Measured wrapping vs PEFT's mapping (read here, not by the probe); all-linear vs the model's own layers."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    from transformers.pytorch_utils import Conv1D

    from minilora.targets import DEFAULT_TARGET_MODULES

    for architecture in ("llama", "mistral", "bert", "t5"):
        assert answers[f"default_targets_{architecture}"] == ",".join(sorted(table[architecture])), architecture
        assert answers[f"default_targets_{architecture}"] == ",".join(sorted(DEFAULT_TARGET_MODULES[architecture]))
    llama = probes_targets._build("llama")
    linear = sorted({name.split(".")[-1] for name, module in llama.named_modules()
                     if isinstance(module, torch.nn.Linear) and name != "lm_head"})
    conv1d = sorted({name.split(".")[-1] for name, module in probes.tiny_gpt2().named_modules()
                     if isinstance(module, Conv1D)})
    assert answers["all_linear"] == f"llama: {','.join(linear)}; gpt2: {','.join(conv1d)}"


def test_adapter_probes_on_the_installed_peft(answers):
    """PEFT 0.21's documented behaviour: add_adapter keeps the active adapter, set_adapter makes only the
    active ones trainable, mixed batches, merge twice warns; each output recognised against a separately
    built reference model."""
    assert answers["add_adapter"] == "active default; trainable default; output default's"
    assert answers["set_adapter"] == ("active other; trainable other; output other's; a list: active default,other, "
                                      "trainable default,other, output both summed")
    assert answers["delete_adapter"] == "PeftModel; active then default; configs default; its weights removed"
    assert answers["mixed_batch"] == "each row gets its adapter ('__base__': the base model)"
    assert answers["weighted_cat"] == "rank 16; dW = 0.5 dW1 + 0.25 dW2"  # exact by construction: [A1; A2]
    assert answers["weighted_svd"].startswith("rank 8; dW differs")  # the sum has rank 16, cut to 8
    assert answers["weighted_linear"].startswith("rank 8; dW differs")  # (sum of B)(sum of A): cross terms
    assert answers["merge_unmerge"].startswith("merged: adapted output; merging again: warns 'All adapters are "
                                               "already merged, nothing to do.', output adapted; unmerged: "
                                               "adapted output, W0 back within")
    assert answers["adapter_api"] == "all of them"  # every method issue 11 lists exists in 0.21
    # issue 11: "the default adapter at the root, others in sub-folders named after them"
    assert answers["adapter_files_several"] == ("adapter_config.json + adapter_model.safetensors + "
                                                "other/adapter_config.json + other/adapter_model.safetensors; "
                                                "other/ loads as: other's output")
    # issue 11: "disable_adapter() on a merged model: PEFT unmerges on the fly and gives the base outputs"
    assert answers["disabled_while_merged"] == "inside: the base output; after: output adapted"
    # the behaviour issue 11 asks to measure: new LoRA layers in an eval() model train (dropout on)
    assert answers["new_layers_mode"] == ("LoRA layers in train mode, model.training=True: "
                                          "dropout active (two calls differ)")


def test_the_weighted_svd_error_is_the_rank_cut(answers):
    """Independent of PEFT: the best rank-8 approximation of 0.5 dW1 + 0.25 dW2 (Eckart-Young) is off by
    exactly the relative error the probe reports, so PEFT's svd combination is the optimal cut."""
    model = probes_adapters._two_adapters(probes.tiny_gpt2().eval())
    errors = []
    for layer in (m for m in model.modules() if hasattr(m, "lora_A")):
        wanted = sum(w * probes_adapters._delta(layer, n) for w, n in zip(probes_adapters.WEIGHTS, ("default", "other")))
        u, s, vh = torch.linalg.svd(wanted.double())
        best = (u[:, :8] * s[:8]) @ vh[:8]
        errors.append(((best - wanted.double()).abs().max() / wanted.double().abs().max()).item())
    assert answers["weighted_svd"] == f"rank 8; dW differs from 0.5 dW1 + 0.25 dW2 by rel {max(errors):.2f}"


# planted failures: each comparison a probe makes must be able to say "different"
def test_planted_a_wrong_weighted_adapter_is_reported(monkeypatch):
    import peft

    original = peft.tuners.lora.LoraModel.add_weighted_adapter

    def off_by_one_percent(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for module in self.model.modules():
            if hasattr(module, "lora_B") and "mix" in module.lora_B:
                module.lora_B["mix"].weight.data.mul_(1.01)

    monkeypatch.setattr(peft.tuners.lora.LoraModel, "add_weighted_adapter", off_by_one_percent)
    assert probes_adapters.weighted_cat(probes.tiny_gpt2().eval()) == \
        "rank 16; dW differs from 0.5 dW1 + 0.25 dW2 by rel 0.01"


def test_planted_wrong_rows_of_a_mixed_batch_are_reported(monkeypatch):
    single = probes_adapters._single
    monkeypatch.setattr(probes_adapters, "_single", lambda base, seed: single(base, 3 - seed))  # swapped
    assert probes_adapters.mixed_batch(probes.tiny_gpt2().eval()) == "rows wrong: ['default', 'other']"


def test_planted_an_unknown_output_is_not_recognised(monkeypatch):
    fill = probes_adapters._fill

    def other_weights_in_the_two_adapter_model(model, adapter, seed):  # the references keep theirs
        two = any(".other." in name for name, _ in model.named_parameters())
        fill(model, adapter, seed + 10 if two else seed)

    monkeypatch.setattr(probes_adapters, "_fill", other_weights_in_the_two_adapter_model)
    assert probes_adapters.add_adapter(probes.tiny_gpt2().eval()).endswith("output none of them")
    out = torch.ones(3)
    assert probes_adapters._whose(out * (1 + 2 * probes_adapters.CLOSE), {"x": out}) == "none of them"
    assert probes_adapters._whose(out * (1 + probes_adapters.CLOSE / 2), {"x": out}) == "x"


def test_planted_no_dropout_is_reported(monkeypatch):
    config = probes_adapters._config
    monkeypatch.setattr(probes_adapters, "_config", lambda **fields: config(**{**fields, "lora_dropout": 0.0}))
    assert probes_adapters.new_layers_mode(probes.tiny_gpt2().eval()).endswith("no dropout (two calls equal)")


def test_a_release_without_an_api_answers_absent(monkeypatch):
    """What an old release gives: the probe records "absent (...)" instead of crashing."""
    import peft

    monkeypatch.delattr(peft.tuners.lora.LoraModel, "add_weighted_adapter")
    assert probes_adapters.weighted_svd(probes.tiny_gpt2().eval()) == "absent (no add_weighted_adapter)"

    def old_forward(self, input_ids=None, **kwargs):
        raise TypeError("GPT2LMHeadModel.forward() got an unexpected keyword argument 'adapter_names'")

    monkeypatch.setattr(peft.PeftModel, "forward", old_forward)
    assert probes_adapters.mixed_batch(probes.tiny_gpt2().eval()).startswith("absent (TypeError: ")
