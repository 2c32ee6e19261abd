"""The parity CLI: --help, --quick, --json, absent devices, exit codes, user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minilora
from parity import cli
from parity.results import CHECKS, STATUSES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)  # the CLI sets 1 thread for its own run


def test_help_explains_every_check_in_one_line():
    done = subprocess.run([sys.executable, "-m", "parity", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for name, line in CHECKS.items():
        assert f"  {name:<11} {line}" in done.stdout
    for option in ("--json", "--device", "--model", "--quick", "matrix"):
        assert option in done.stdout


def test_quick_passes_and_writes_well_formed_json(tmp_path, capsys):
    path = tmp_path / "out" / "parity.json"
    assert cli.main(["--quick", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    first_line = captured.out.splitlines()[0]
    assert all(f"{name} " in first_line for name in ("torch", "transformers", "peft"))
    second_line = captured.out.splitlines()[1]  # CUDA is named even when only the CPU ran
    assert second_line == ("devices: cpu; cuda: not available" if not torch.cuda.is_available()
                           else f"devices: cpu; cuda: {torch.cuda.get_device_name(0)}")
    assert captured.out.rstrip().splitlines()[-2].startswith("OK: ")  # summary, then "wrote ..."
    assert "[1/4]" in captured.err  # progress

    data = json.loads(path.read_text())
    assert set(data) == {"versions", "devices", "summary", "results"}
    assert sum(data["summary"].values()) == len(data["results"])
    assert data["summary"]["FAIL"] == 0
    assert {row["check"] for row in data["results"]} == set(CHECKS)
    for row in data["results"]:
        assert set(row) == {"check", "configuration", "device", "metric", "value", "tolerance", "status", "message"}
        assert row["status"] in STATUSES


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is present: it would really run")
def test_absent_cuda_is_reported_as_not_available(capsys):
    assert cli.main(["--device", "cuda", "--quick"]) == 0
    captured = capsys.readouterr()
    assert "cuda: not available" in captured.out and "SKIP" in captured.out
    assert "cuda: not available" in captured.err


def test_a_failing_check_gives_a_non_zero_exit(monkeypatch, capsys):
    monkeypatch.setattr(minilora, "count_parameters", lambda model: (1, 2))  # a planted miscount
    assert cli.main(["--quick", "--checks", "counts", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "Failures:" in out and "but PEFT" in out and "FAILED:" in out


def test_a_missing_model_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert cli.main(["--model", str(tmp_path / "no-such-model"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--device", "tpu"])
    assert exit_info.value.code == 2
    assert cli.main(["--steps", "0"]) == 2


def test_matrix_help():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["matrix", "--help"])
    assert exit_info.value.code == 0
