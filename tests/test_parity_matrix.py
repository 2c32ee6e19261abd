"""The version matrix on a fake, fast path (no environment is built here), and the probes on the installed PEFT."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import minilora
from parity import envs, matrix, probes
from parity.results import CHECKS


def row(check, status, message="", configuration="linear r=8"):
    return {"check": check, "configuration": configuration, "device": "cpu", "metric": "m", "value": 0.0,
            "tolerance": 0.0, "status": status, "message": message}


def fake_run(version, statuses, probe_values, error=""):
    results = [row(check, status, f"why {check} {status}") for check, status in statuses]
    return {"peft": version, "environment": f"/envs/peft-{version}", "error": error,
            "versions": {"torch": "2.13.0+cpu", "transformers": f"tf-for-{version}", "peft": version},
            "suite": {"results": results},
            "probes": {name: {"question": f"{name}?", "value": value} for name, value in probe_values.items()}}


OLD = fake_run("0.6.2", [("forward", "PASS"), ("forward", "FAIL"), ("init", "N/A")],
               {"double_wrap": "base output, no warning", "default_targets": "c_attn"})
NEW = fake_run("0.21.2", [("forward", "PASS"), ("forward", "PASS"), ("init", "PASS")],
               {"double_wrap": "base output, warns 'x'", "default_targets": "c_attn"})


def test_matrix_writes_a_version_by_check_table(tmp_path, capsys):
    page = tmp_path / "docs" / "versions.md"
    fakes = {"0.6.2": OLD, "0.21.2": NEW}
    assert matrix.main(["--peft", "0.6.2", "0.21.2", "--markdown", str(page)], runner=fakes.__getitem__) == 0
    text = page.read_text()
    assert "| release | peft 0.6.2 | peft 0.21.2 |" in text
    assert "| transformers | tf-for-0.6.2 | tf-for-0.21.2 |" in text
    assert "| check: forward | **FAIL 1/2** | PASS 2 |" in text
    assert "| check: init | N/A 1 | PASS 1 |" in text
    assert "| check: files | - | - |" in text  # no rows: shown, not dropped
    assert "| probe: double_wrap | `base output, no warning` | `base output, warns 'x'` |" in text
    # the prose parts: what changed, why things failed, the legend
    assert "**double_wrap**: `base output, no warning` in 0.6.2; `base output, warns 'x'` from 0.21.2" in text
    assert "default_targets**" not in text  # the same everywhere: not a change
    assert "FAIL forward (linear r=8): why forward FAIL" in text and "N/A init (linear r=8): why init N/A" in text
    assert all(f"`{name}`" in text for name in CHECKS) and "## How to read the table" in text
    data = json.loads(page.with_suffix(".json").read_text())
    assert [run["peft"] for run in data["runs"]] == ["0.6.2", "0.21.2"]
    assert "[2/2] peft 0.21.2" in capsys.readouterr().err


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
    assert "| check: forward | not run |" in text
    assert "could not run everything: pip install failed for peft 0.6.2" in text


def test_unknown_release_is_a_usage_error(capsys):
    assert matrix.main(["--peft", "9.9.9"]) == 2
    assert "no transformers release is pinned for peft 9.9.9" in capsys.readouterr().err
    with pytest.raises(envs.EnvError, match="COMPANIONS"):
        envs.requirements("9.9.9")
    assert envs.requirements("0.6.2")[0] == "peft==0.6.2"


def test_a_subprocess_that_writes_no_json_is_reported(tmp_path):
    data, why = matrix._run_json(sys.executable, ["no_such_module_for_parity"], log=print)
    assert data is None and "no_such_module_for_parity exited 1" in why and "No module named" in why


def test_check_cells_sum_statuses():
    assert matrix.check_cell([]) == "-"
    assert matrix.check_cell([row("x", "PASS"), row("x", "N/A")]) == "PASS 1, N/A 1"
    assert matrix.check_cell([row("x", "FAIL"), row("x", "PASS"), row("x", "SKIP")]) == "**FAIL 1/3**"


def test_probes_on_the_installed_peft():
    """Each probe against an independent answer: minilora's own default, line, and init; PEFT's pitfall."""
    import peft
    from minilora.config import DEFAULT_TARGET_MODULES

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        answers = {name: answer["value"] for name, answer in probes.run_probes(gpt2_small=False).items()}
    finally:
        torch.set_num_threads(previous)
    assert set(answers) == set(probes.PROBES)
    assert not [value for value in answers.values() if value.startswith("error")], answers
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
