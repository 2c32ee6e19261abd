"""The three commands (minilora, python -m parity, python -m benchmarks) on bad input: one error line,
exit status 2, and nothing started before the input is checked (no progress line, no file written)."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora
from minilora.adapters import PEFT_PREFIX, WEIGHTS_NAME
from minilora.cli import main as minilora_main
from parity.twins import randomize_adapters

from disk import refuse_new_files_in


@pytest.fixture
def tiny_dir(tiny_gpt2, tmp_path):
    """(model directory without a tokenizer, adapter directory) for the tiny GPT-2."""
    tiny_gpt2.save_pretrained(tmp_path / "model")
    trained = copy.deepcopy(tiny_gpt2)
    minilora.inject(trained, minilora.LoraConfig(r=2, target_modules=["c_attn"]))
    randomize_adapters(trained, seed=1)
    minilora.save_adapter(trained, tmp_path / "adapter")
    return tmp_path / "model", tmp_path / "adapter"


def one_error_line(capsys, prefix="minilora: error: "):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def test_diff_plot_path_is_checked_before_loading(tiny_dir, capsys):
    model_dir, adapter = tiny_dir
    assert minilora_main(["diff", str(adapter), "--model", str(model_dir), "--plot", "/nonexistent/x.png"]) == 2
    assert "directory /nonexistent does not exist" in one_error_line(capsys)  # and no "loading model" line


def test_merge_out_dir_is_checked_before_loading(tiny_dir, capsys):
    model_dir, adapter = tiny_dir
    assert minilora_main(["merge", str(adapter), "/proc/x/merged", "--model", str(model_dir)]) == 2
    assert "OUT_DIR '/proc/x/merged' cannot be written" in one_error_line(capsys)


@pytest.mark.parametrize("how", ["chmod", "EACCES planted"])
@pytest.mark.parametrize("out_dir", ["absent", "empty", "full"])
def test_merge_probes_the_folder_it_writes_in_before_loading(tiny_dir, tmp_path, capsys, monkeypatch, out_dir, how):
    """OUT_DIR (new, empty, or with files and --force) is written as a temporary folder next to it, then
    renamed: OUT_DIR's parent must be writable. A read-only parent is one error line before any work (no
    progress line), not a failed rename after the merge; nothing changes on disk."""
    if how == "chmod" and (not hasattr(os, "geteuid") or os.geteuid() == 0):
        pytest.skip("root: chmod does not stop root writing (the planted EACCES case runs)")
    model_dir, adapter = tiny_dir
    parent = tmp_path / "read-only"
    parent.mkdir()
    if out_dir != "absent":
        (parent / "merged").mkdir()
    if out_dir == "full":
        (parent / "merged" / "config.json").write_text("{}")
    if how == "chmod":
        parent.chmod(0o555)
    else:
        refuse_new_files_in(parent, monkeypatch)
    try:
        force = ["--force"] if out_dir == "full" else []
        assert minilora_main(["merge", str(adapter), str(parent / "merged"), "--model", str(model_dir), *force]) == 2
        line = one_error_line(capsys)
        assert f"OUT_DIR '{parent / 'merged'}' cannot be written" in line and f"temporary folder in '{parent}'" in line
        assert sorted(os.listdir(parent)) == ([] if out_dir == "absent" else ["merged"])
        if out_dir == "full":
            assert os.listdir(parent / "merged") == ["config.json"]
    finally:
        parent.chmod(0o755)


def test_model_path_that_does_not_exist_says_so(capsys):
    assert minilora_main(["inspect", "--model", "/nonexistent/path"]) == 2
    assert "'/nonexistent/path' does not exist" in capsys.readouterr().err


def test_hub_name_offline_without_cache_fails_fast_with_what_to_do(capsys, monkeypatch):
    """No network (HF_HUB_OFFLINE, or the hub unreachable) and nothing cached: an answer in seconds,
    where transformers alone retries for about a minute."""
    from huggingface_hub import constants

    from minilora import models

    for offline in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(models, "_reachable", lambda host, seconds=3.0: False)
        start = time.monotonic()
        assert minilora_main(["inspect", "--model", "no-such-org-h9/no-such-model"]) == 2
        assert time.monotonic() - start < 10
        err = capsys.readouterr().err
        assert "is not in your Hugging Face cache" in err and "huggingface-cli download" in err
        assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached from here") in err


def test_merge_writes_no_tokenizer_when_the_model_has_none(tiny_dir, tmp_path, capsys):
    model_dir, adapter = tiny_dir
    assert minilora_main(["merge", str(adapter), str(tmp_path / "merged"), "--model", str(model_dir)]) == 0
    written = {path.name for path in (tmp_path / "merged").iterdir()}
    assert not written & {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"}, written
    assert "no tokenizer saved" in capsys.readouterr().err


def test_a_library_error_is_one_line_and_status_2(tiny_dir, capsys):
    """float8 weights in the file: a MiniLoraError inside load_adapter, one line from the command."""
    model_dir, adapter = tiny_dir
    tensors = load_file(adapter / WEIGHTS_NAME)
    key = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, adapter / WEIGHTS_NAME)
    assert minilora_main(["diff", str(adapter), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("minilora: error: ") and "float8" in err[-1]


def test_parity_json_path_is_checked_before_the_suite(capsys):
    from parity.cli import main

    assert main(["--quick", "--json", "/proc/x"]) == 2
    assert "--json '/proc/x' cannot be written" in one_error_line(capsys, "error: ")


def test_parity_bad_model_is_status_2(capsys):
    from parity.cli import main

    assert main(["--quick", "--model", "/nonexistent/path"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_parity_help_documents_the_exit_codes(capsys):
    from parity.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "1 when a check FAILed (and only then); 2 for a usage or I/O error" in out


def test_benchmarks_out_is_checked_before_timing(capsys):
    from benchmarks.cli import main

    assert main(["--quick", "--out", "/proc/x"]) == 2
    err = capsys.readouterr().err
    assert "--out '/proc/x' cannot be written" in err and "progress" not in err


def test_a_deeply_nested_config_is_one_error_line(tiny_dir, capsys):
    model_dir, adapter = tiny_dir
    (adapter / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert minilora_main(["diff", str(adapter), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("minilora: error: ") and "nests JSON values too deeply" in err[-1]


def test_merge_into_a_symlink_to_nothing_is_refused_before_loading(tiny_dir, tmp_path, capsys):
    model_dir, adapter = tiny_dir
    link = tmp_path / "merged"
    link.symlink_to(tmp_path / "nowhere")
    assert minilora_main(["merge", str(adapter), str(link), "--model", str(model_dir)]) == 2
    assert "is a symlink to nothing" in one_error_line(capsys)  # and no "loading model" line
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
