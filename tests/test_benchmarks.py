"""The benchmark harness on a tiny GPT-2: well-formed results, validation before timing, the CLI.

Not timed: these tests check that the harness measures the right things (every path agrees with
the reference, forward and gradients, before it is timed), not how fast anything is.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import memory, report
from benchmarks.cli import main
from benchmarks.plan import ALL_LINEAR, tiny_plan
from benchmarks.runner import Runner
from benchmarks.timing import summarize
from benchmarks.variants import TOLERANCE, adapter_weights, build_variant, load_base, lora_config
from benchmarks.workloads import Prefill


@pytest.fixture(scope="module")
def tiny_results():
    """One tiny run: all three targets, r=4, prefill + decode + training (dropout 0 and 0.1)."""
    plan = tiny_plan()
    plan.targets = (ALL_LINEAR,)
    plan.inference_variants = tuple(v for v in plan.inference_variants if v != "compiled")
    plan.training_variants = tuple(v for v in plan.training_variants if v != "compiled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster and steadier on shared cores
    try:
        return plan, Runner(plan, "cpu").run()
    finally:
        torch.set_num_threads(threads)


def test_tiny_run_is_complete_and_every_variant_matches_the_reference(tiny_results):
    plan, results = tiny_results
    assert results["failures"] == []
    sections = report.sections(results)
    expected_sections = len(plan.prefill_shapes) + 1 + len(plan.dropouts)  # prefill grid, decode, train per dropout
    assert len(plan.prefill_shapes) == 2
    assert len(sections) == expected_sections
    for key, measurements in sections.items():
        workload = key[0]
        variants = plan.training_variants if workload == "train" else plan.inference_variants
        assert [m["variant"] for m in measurements] == list(variants)
        for m in measurements:
            assert m["rounds"] == plan.min_rounds and len(m["samples_s"]) == m["rounds"]
            assert all(t > 0 for t in m["samples_s"]) and m["median_s"] > 0
            if m["variant"] == m["ratio_to"]:
                assert m["ratio"] == 1.0 and m["ratio_iqr"] == 0.0
            if m["variant"] != "base":  # forward (logits of every decode step) or loss + every gradient
                assert 0.0 <= m["validation_max_rel_diff"] <= TOLERANCE
            if m["variant"] in ("peft", "reference"):
                assert m["validation_max_rel_diff"] == 0.0  # the reference path is PEFT's op order


def test_outputs_are_written(tiny_results, tmp_path):
    _, results = tiny_results
    paths = report.write_all(results, tmp_path, "tiny")
    assert json.loads(paths["json"].read_text())["measurements"] == json.loads(json.dumps(results["measurements"]))
    page = paths["markdown"].read_text()
    assert "## Timings" in page and "torch " + torch.__version__ in page
    assert page.count("### ") == len(report.sections(results))
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.terminal(results)
    assert "fused" in table and "targets" in table


def test_a_variant_that_disagrees_is_reported_and_not_timed():
    base = load_base("tiny", "cpu")
    config = lora_config(ALL_LINEAR, 4, 0.0, 2.0)
    weights = adapter_weights(base, config, seed=0)
    models = {name: build_variant(name, base, config, weights) for name in ("base", "reference", "fused")}
    with torch.no_grad():  # a broken fused model: its first adapter's B is changed
        next(p for n, p in models["fused"].named_parameters() if "lora_B" in n).add_(1.0)
    plan = tiny_plan()
    runner = Runner(plan, "cpu")
    runner.base = base
    runner.measure(models, Prefill(2, 5, base.config.vocab_size, "cpu"), ALL_LINEAR, 4, None, ratio_to="base")
    assert [f["variant"] for f in runner.results["failures"]] == ["fused"]
    assert "not timed" in runner.results["failures"][0]["error"]
    assert {m["variant"] for m in runner.results["measurements"]} == {"base", "reference"}


def test_ratios_are_medians_of_per_round_ratios():
    samples = {"base": [1.0, 2.0, 1.0], "x": [1.1, 2.0, 1.3]}
    summary = summarize(samples, "base")
    assert summary["x"]["ratio"] == pytest.approx(1.1)          # median of 1.1, 1.0, 1.3
    assert summary["x"]["median_s"] == pytest.approx(1.3)
    assert summary["x"]["ratio_iqr"] == pytest.approx(1.2 - 1.05)  # inclusive quartiles of 1.0, 1.1, 1.3
    assert summary["base"]["ratio"] == 1.0


def test_memory_measure_sees_what_a_call_allocates():
    def allocate():
        block = torch.ones(32 * 2**20 // 4)  # 32 MiB, touched
        return block.sum()

    result = memory.measure(allocate, "cpu")
    if result["kind"] == "unavailable":
        pytest.skip("no /proc/self/clear_refs on this system")
    assert result["kind"] == "cpu rss" and 28 <= result["peak_mib"] < 200


def test_memory_child_body_reports_a_peak():
    """What each child process runs (in process here: a fresh interpreter costs ~10 s of imports)."""
    spec = {"model": "tiny", "device": "cpu", "targets": list(ALL_LINEAR), "r": 4, "alpha_per_r": 2.0, "seed": 0,
            "variant": "fused", "workload": "train", "shape": [2, 8], "dropout": 0.1}
    result = memory.child_main(spec)
    if result["kind"] == "unavailable":
        pytest.skip("no /proc/self/clear_refs on this system")
    assert result["peak_mib"] is not None and result["held_mib"] > 0


def test_cli_help_and_bad_device(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
    assert main(["--device", "tpu-ish"]) == 2
    assert "not a torch device" in capsys.readouterr().err
