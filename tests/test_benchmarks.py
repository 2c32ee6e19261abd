"""The benchmark harness on a tiny GPT-2: well-formed results, validation before timing, the CLI.

Not timed: these tests check that the harness measures the right things (every path agrees with
the reference, forward and gradients, before it is timed), not how fast anything is.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from benchmarks import memory, report
from benchmarks.cli import main
from benchmarks.plan import ALL_LINEAR, INFERENCE_VARIANTS, TRAINING_VARIANTS, tiny_plan
from benchmarks.runner import Runner
from benchmarks.variants import (TOLERANCE, adapter_weights, build_variant, load_base, lora_config,
                                 relative_difference)
from benchmarks.workloads import Decode, Generate, Prefill


@pytest.fixture(scope="module")
def tiny_results():
    """One tiny run: main case (all three targets) and c_attn only, r=4, every workload, both tables."""
    plan = tiny_plan()
    threads = torch.get_num_threads()
    try:
        return plan, Runner(plan, "cpu").run()
    finally:
        assert torch.get_num_threads() == threads  # the run puts torch's thread count back
        torch.set_num_threads(threads)


def test_tiny_run_is_complete_and_every_variant_matches_the_reference(tiny_results):
    plan, results = tiny_results
    assert results["failures"] == []
    sections = report.sections(results)
    main = len(plan.prefill_shapes) + 2 + len(plan.dropouts)  # prefill grid, decode loop, generate, train per dropout
    other = 2                                                # first prefill shape and the decode loop
    all_cores = 2 if (os.cpu_count() or 1) > 1 else 0
    mixed = 2 * len(plan.mixed_adapters)                     # prefill and decode per adapter count
    assert len(sections) == main + other * len(plan.other_cases) + all_cores + mixed
    workloads = {key[1] for key in sections}
    assert workloads == {"prefill", "decode", "generate", "train"}
    for key, measurements in list(sections.items()):
        table, workload, shape, targets, r, dropout = key
        if table.startswith("mixed"):
            skipped = {s["variant"] for s in results.get("skipped", []) if s["measurement"].endswith(f"[{table}]")
                       and s["measurement"].startswith(workload)}
            assert skipped <= {"minilora-mixed"}  # only where this minilora has no mixed-batch forward
            assert [m["variant"] for m in measurements] == [v for v in plan.mixed_variants if v not in skipped]
            for m in measurements:
                assert m["ratio_to"] == "merged" and m["tokens"] == shape[0] * shape[1]
                assert m["clocks"]["cpu"]["low"] <= m["clocks"]["cpu"]["ratio"] <= m["clocks"]["cpu"]["high"]
                if m["variant"] != "merged" or m["adapters"] == 1:  # checked against each row run alone
                    assert 0.0 <= m["validation_max_rel_diff"] <= TOLERANCE
            continue
        is_main = (targets, r) == (ALL_LINEAR, 4) and table == "one thread"
        variants = plan.training_variants if workload == "train" else plan.inference_variants if is_main else \
            [v for v in plan.inference_variants if v in plan.all_cores_variants] if table == "all cores" else \
            [v for v in plan.inference_variants if v in plan.other_case_variants]
        assert [m["variant"] for m in measurements] == list(variants)
        for m in measurements:
            assert m["threads"] == (1 if table == "one thread" else os.cpu_count())
            assert m["rounds"] == plan.min_rounds and m["stopped"] == "max_rounds"
            copied_anew = table == "one thread" and workload != "train" and m["lockstep"] != "segments"
            assert m["replaced"] == (1 if copied_anew else 0)  # tiny_plan: every round after the first
            if table != "all cores" and workload in ("decode", "generate"):  # one thread: segment lockstep
                assert m["lockstep"] == "segments" and not m["bracketed"]
                if workload == "decode":  # the prompt and 3 tokens, each cut before 2 blocks and lm_head
                    assert m["segments"] == 4 * 4
            else:  # several threads, or prefill / train: bracketed (one call), step or token lockstep
                assert m["lockstep"] == (workload in ("decode", "train")) and m["bracketed"] == (workload in
                                                                                                ("prefill", "generate"))
            assert set(m["clocks"]) == {"cpu", "wall"}
            for clock in m["clocks"].values():
                assert len(clock["samples_s"]) == m["rounds"] and all(t >= 0 for t in clock["samples_s"])
                assert clock["low"] <= clock["ratio"] <= clock["high"]
            if m["variant"] == m["ratio_to"]:
                assert m["clocks"]["cpu"]["ratio"] == 1.0 == m["clocks"]["cpu"]["low"] == m["clocks"]["cpu"]["high"]
            if m["variant"] in ("base", "base-copy", "merged", "peft-merged"):
                assert m["floor"] == {"macs": 0.0, "bytes": 0.0}
            else:
                assert 0 < m["floor"]["macs"] < 1 and 0 < m["floor"]["bytes"] < 1
            if m["variant"] not in ("base", "base-copy"):  # forward (logits of every step) or loss + every gradient
                assert 0.0 <= m["validation_max_rel_diff"] <= TOLERANCE
            if m["variant"] in ("peft", "peft-copy", "reference"):
                assert m["validation_max_rel_diff"] == 0.0  # the reference path is PEFT's op order


def test_outputs_are_written(tiny_results, tmp_path):
    _, results = tiny_results
    paths = report.write_all(results, tmp_path, "tiny")
    assert json.loads(paths["json"].read_text())["measurements"] == json.loads(json.dumps(results["measurements"]))
    page = paths["markdown"].read_text()
    assert "## Targets" in page and "torch " + torch.__version__ in page and "Load average" in page
    assert page.count("### ") == len(report.sections(results))
    assert "(segment lockstep: every call cut at its blocks and the pieces interleaved, 16 per round)" in page
    assert "(bracketed: base before, between and after the others)" in page and "Segment lockstep" in page
    assert "torch.compile: not in this run" in page  # the note says what ran (tiny has no compiled variant)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.terminal(results)
    assert "fused" in table and "targets" in table and "A/A control" in table
    summary = report.summary_markdown(results)  # the README's form
    assert summary.count("| prefill batch") == 1 and "| A/A control |" in summary and "tok/s" in summary
    block = report.readme_block(results, "page.md")
    assert block.startswith("[page.md](page.md)") and summary in block and "- **not resolved**: A/A control" in block
    # two rounds decide nothing: every target is "not resolved", saying why
    verdicts = report.targets_check(results)
    timed = [row for row in verdicts if "memory" not in row[0]]
    assert len(timed) == len(report.TARGETS)
    assert all(row[4] == "not resolved" and "only 2 rounds" in row[5] for row in timed)


def test_variant_colours_are_distinct():
    assert len(set(report.COLOURS.values())) == len(report.COLOURS)
    assert set(INFERENCE_VARIANTS) - {"base"} <= set(report.COLOURS)
    assert set(TRAINING_VARIANTS) - {"peft"} <= set(report.COLOURS)
    assert {"peft-mixed", "minilora-mixed", "gathered"} <= set(report.COLOURS)  # ratios to merged: drawn too


@pytest.mark.parametrize("break_b", ["add", "nan"])
def test_a_variant_that_disagrees_is_reported_and_not_timed(break_b):
    base = load_base("tiny", "cpu")
    config = lora_config(ALL_LINEAR, 4, 0.0, 2.0)
    weights = adapter_weights(base, config, seed=0)
    models = {name: build_variant(name, base, config, weights) for name in ("base", "reference", "fused")}
    with torch.no_grad():  # a broken fused model: its first adapter's B is changed
        b = next(p for n, p in models["fused"].named_parameters() if "lora_B" in n)
        if break_b == "add":
            b.add_(1.0)
        else:  # (its difference is NaN, and NaN > TOLERANCE is False)
            b.fill_(float("nan"))
    plan = tiny_plan()
    runner = Runner(plan, "cpu")
    runner.base, runner.threads = base, 1
    runner.measure(models, Prefill(2, 5, base.config.vocab_size, "cpu"), ALL_LINEAR, 4, None, ratio_to="base")
    assert [f["variant"] for f in runner.results["failures"]] == ["fused"]
    assert "not timed" in runner.results["failures"][0]["error"]
    assert {m["variant"] for m in runner.results["measurements"]} == {"base", "reference"}


@pytest.mark.parametrize("workload", ["prefill", "decode"])
def test_mixed_batch_forms_equal_each_row_alone_and_a_wrong_row_is_caught(workload):
    from benchmarks import mixed

    base = load_base("tiny", "cpu")
    config = lora_config(ALL_LINEAR, 4, 0.0, 2.0)
    source = mixed.minilora_with_adapters(base, config, 3, seed=0)
    names = [mixed.adapter_name(i % 3) for i in range(5)]
    work = mixed.MixedPrefill(5, 6, 96, "cpu") if workload == "prefill" else mixed.MixedDecode(5, 3, 2, 96, "cpu")
    expected = mixed.rows_alone(work, copy.deepcopy(source), names)
    adapters = [mixed.adapter_name(i) for i in range(3)]
    gathered = mixed.gathered_model(copy.deepcopy(source), adapters)
    peft_model = mixed.peft_with_adapters(base, config, source, 3)
    assert relative_difference(work.run(mixed.forward_function("gathered", gathered, names)), expected) <= TOLERANCE
    assert relative_difference(work.run(mixed.forward_function("peft-mixed", peft_model, names)), expected) <= TOLERANCE
    shifted = names[1:] + names[:1]  # every row given another row's adapter
    wrong = work.run(mixed.forward_function("gathered", gathered, shifted))
    assert relative_difference(wrong, expected) > 1e-3


def test_layout_forms_compute_the_same_layer():
    from benchmarks.profile import layout_forms

    for rows in (1, 7):
        forms = layout_forms(16, 40, 4, rows, "cpu")
        expected = forms["addmm"]()
        assert not torch.allclose(forms["base"](), expected)  # the update is not zero
        for name in ("rows [W0; A]", "cols [W0, A^T]", "cols, B^T rows"):
            torch.testing.assert_close(forms[name](), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(forms["rows matmul only"](), forms["cols matmul only"](), rtol=1e-5, atol=1e-6)


def test_the_generate_workload_checks_logits_of_every_token():
    base = load_base("tiny", "cpu")
    config = lora_config(ALL_LINEAR, 4, 0.0, 2.0)
    weights = adapter_weights(base, config, seed=0)
    workload = Generate(3, 4, base.config.vocab_size, "cpu")
    reference, broken = (build_variant("reference", base, config, weights) for _ in range(2))
    loop = Decode(3, 4, base.config.vocab_size, "cpu").check(reference)
    got = workload.check(reference)
    # the first step is the same forward as the loop's (later ones differ here: the tiny model predicts
    # end-of-text, which min_new_tokens forbids generate to pick)
    assert len(got) == 4 and relative_difference(got[0], loop[0]) <= TOLERANCE
    with torch.no_grad():
        next(p for n, p in broken.named_parameters() if "lora_B" in n).add_(1.0)
    assert relative_difference(workload.check(broken), got) > 1e-3


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


def test_cli_help_and_bad_device(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--no-mixed" in out and "--no-all-cores" in out
    assert "--no-generate" in out and "--variants" in out
    assert main(["--device", "tpu-ish"]) == 2
    assert "not a torch device" in capsys.readouterr().err
    assert main(["--variants", "base-copy,fusd", "--out", str(tmp_path)]) == 2
    assert "unknown variant(s) fusd" in capsys.readouterr().err
    assert main(["--segment-lockstep", "decode,prefil", "--out", str(tmp_path)]) == 2
    assert "unknown workload(s) prefil" in capsys.readouterr().err
    assert main(["--sections", "prefill,decod", "--out", str(tmp_path)]) == 2
    assert "unknown section(s) decod" in capsys.readouterr().err


def test_timed_steps_do_what_was_validated():
    """Decode's lockstep steps feed the model the validated loop's tokens; a timed training step trains."""
    from benchmarks.timing import Steps, run_once
    from benchmarks.workloads import TrainStep

    base = load_base("tiny", "cpu")
    config = lora_config(ALL_LINEAR, 4, 0.0, 2.0)
    model = build_variant("fused", base, config, adapter_weights(base, config, seed=0))
    fed = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].tolist()),
                                           with_kwargs=True)
    workload = Decode(3, 4, base.config.vocab_size, "cpu")
    workload.check(model)
    validated, fed[:] = list(fed), []
    prepared = workload.prepare(model)
    assert isinstance(prepared, Steps) and len(prepared.start()) == 1 + 4  # the prompt, then one per token
    run_once(prepared)
    run_once(prepared)  # every round starts from a fresh cache
    hook.remove()
    assert fed == validated + validated and len(validated) == 5

    train = TrainStep(2, 8, base.config.vocab_size, "cpu", 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run_once(train.prepare(model))
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], value) and after[n].grad is None for n, value in before.items())


def test_copies_made_anew_compute_what_was_validated_in_new_memory():
    """Re-placement (Runner.replacer): every model is deep-copied into new memory and gives the validated
    outputs bit for bit, the fused layer's concatenated buffer rebuilt before any timed call."""
    base = load_base("tiny", "cpu")
    config = lora_config(ALL_LINEAR, 4, 0.0, 2.0)
    weights = adapter_weights(base, config, seed=0)
    models = {name: build_variant(name, base, config, weights) for name in ("base", "peft", "fused")}
    workload = Prefill(1, 5, base.config.vocab_size, "cpu")
    validated = {name: workload.check(model) for name, model in models.items()}
    old = {name: {n: p.data_ptr() for n, p in model.named_parameters()} for name, model in models.items()}
    functions = {name: workload.prepare(model) for name, model in models.items()}
    fresh = Runner.replacer(models, functions, workload)()
    assert set(fresh) == set(functions) and all(fresh[n] is functions[n] for n in fresh)
    for name, model in models.items():
        pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
        assert pointers.keys() == old[name].keys() and not set(pointers.values()) & set(old[name].values())
        assert torch.equal(workload.check(model), validated[name])


def test_training_measurements_have_their_own_cap():
    plan = tiny_plan()
    plan.max_seconds, plan.train_max_seconds, plan.other_max_seconds = 5.0, 2.0, 1.0
    runner = Runner(plan, "cpu")
    assert (runner.seconds_for("prefill", True), runner.seconds_for("train", True)) == (5.0, 2.0)
    assert runner.seconds_for("train", False) == 1.0 == runner.seconds_for("decode", False)
    plan.train_max_seconds = None
    assert runner.seconds_for("train", True) == 5.0


def test_layer_call_overhead_checks_every_way_then_times_it(monkeypatch):
    from benchmarks import profile

    result = profile.layer_call_overhead("cpu", calls=3, min_rounds=2, max_rounds=2, max_seconds=0.0)
    assert set(result["variants"]) == set(profile.CALL_VARIANTS) and result["rounds"] == 2
    for variant in result["variants"].values():
        low, high = variant["extra_us"][1:]
        assert variant["us"] > 0 and low <= variant["extra_us"][0] <= high
    assert "## What one layer call costs" in "\n".join(report.layer_call_markdown(result))

    built = profile.layer_call_models

    def broken():  # the fused layer's B changed: caught before anything is timed
        models = built()
        with torch.no_grad():
            next(p for n, p in models["fused"].named_parameters() if "lora_B" in n).add_(1.0)
        return models
    monkeypatch.setattr(profile, "layer_call_models", broken)
    with pytest.raises(AssertionError, match="layer call fused"):
        profile.layer_call_overhead("cpu", calls=1, min_rounds=1, max_rounds=1)
