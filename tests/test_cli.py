"""The `minilora` command: inspect, merge, diff, and its errors.

Most tests run on a tiny GPT-2 saved to a temporary directory (passed with --model), so each
subcommand runs in well under a second; the default model is checked once, through the shared
session fixture. Oracles: PEFT's own printed line and merged model, formulas, and an SVD of the
full dW matrix.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

import minilora
from minilora import cli, spectrum

TINY = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=16)
TOKENS = torch.arange(12).reshape(2, 6) * 7 % 101  # (B, T)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    return minilora.models.tiny_gpt2(seed, **{**TINY, **overrides})


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_user_error(status: int, err: str, *fragments: str) -> None:
    assert status == cli.ERROR_EXIT
    assert "minilora: error:" in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny GPT-2 (2 blocks, width 32): what --model gets in these tests."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def minilora_adapter(tiny_dir, tmp_path_factory):
    """A minilora adapter for the tiny model with random, non-zero A and B."""
    model = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    torch.manual_seed(1)
    minilora.inject(model, minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                               init_lora_weights=False))
    path = tmp_path_factory.mktemp("minilora-adapter")
    minilora.save_adapter(model, path)
    return str(path)


def adapted_logits(model_dir: str, adapter_dir: str) -> torch.Tensor:
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    minilora.load_adapter(model, adapter_dir)
    with torch.no_grad():
        return model(TOKENS).logits


# ------------------------------------------------------------------------------------------
# --help
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    ([], "inspect"),
    (["inspect"], "r * (in + out)"),
    (["merge"], "the same class for any other"),
    (["diff"], "exp(-sum p_i log p_i)"),
])
def test_help(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert expected in out
    if argv:
        assert "--model" in out


# ------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------
def test_inspect_default_gpt2_matches_theory_and_peft(capsys, monkeypatch, gpt2_pair):
    """The default model (the shared fixture stands in for load_model()): 294,912, PEFT's exact line."""
    import peft

    ours, theirs = gpt2_pair
    monkeypatch.setattr(cli, "load_model", lambda name: ours)
    status, out, _ = run(capsys, "inspect", "--r", "8", "--alpha", "32")
    assert status == 0
    theory = 12 * 8 * (768 + 2304)
    assert theory == 294_912
    assert f"{theory:,}" in out.splitlines()[-3]  # the table's total row
    assert out.count("Conv1D") == 12

    peft.get_peft_model(theirs, peft.LoraConfig(r=8, lora_alpha=32, fan_in_fan_out=True)).print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    assert out.strip().splitlines()[-1] == peft_line


def test_inspect_targets_rows_follow_the_formula(capsys, tiny_dir):
    status, out, _ = run(capsys, "inspect", "--model", tiny_dir, "--r", "2", "--targets", "c_attn", "c_proj")
    assert status == 0
    rows = [line.split() for line in out.splitlines() if line.startswith("transformer.h.")]
    shapes = {name: module.weight.shape for name, module in tiny_gpt2().named_modules()
              if name.endswith(("c_attn", "c_proj"))}
    assert sorted(row[0] for row in rows) == sorted(shapes)  # attn.c_attn, attn.c_proj, mlp.c_proj per block
    for name, kind, n_in, n_out, r, theory, counted in rows:
        fan_in, fan_out = shapes[name]  # Conv1D stores (in, out)
        assert (kind, int(n_in), int(n_out), int(r)) == ("Conv1D", fan_in, fan_out, 2)
        assert int(theory.replace(",", "")) == int(counted.replace(",", "")) == 2 * (fan_in + fan_out)


@pytest.mark.parametrize("argv, fragment", [
    (["--targets", "no_such_layer"], "matches no module"),
    (["--r", "0"], "r must be a positive int"),
    (["--alpha", "-1"], "lora_alpha must be a positive number"),
])
def test_inspect_bad_input(capsys, tiny_dir, argv, fragment):
    assert_user_error(*run(capsys, "inspect", "--model", tiny_dir, *argv)[::2], fragment)


def test_bad_model_paths(capsys, tmp_path):
    assert_user_error(*run(capsys, "inspect", "--model", str(tmp_path))[::2], "without config.json")
    assert_user_error(*run(capsys, "inspect", "--model", str(tmp_path / "missing"))[::2], "missing' does not exist")


# ------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------
def test_merge_minilora_adapter_saves_a_plain_model(capsys, tiny_dir, minilora_adapter, tmp_path):
    out_dir = str(tmp_path / "merged")
    status, out, _ = run(capsys, "merge", minilora_adapter, out_dir, "--model", tiny_dir)
    assert status == 0 and "Merged 6 LoRA layers" in out

    merged = GPT2LMHeadModel.from_pretrained(out_dir).eval()  # transformers alone
    assert not any("lora" in key for key in merged.state_dict())
    with torch.no_grad():
        merged_logits = merged(TOKENS).logits
    expected = adapted_logits(tiny_dir, minilora_adapter)
    with torch.no_grad():
        base_logits = tiny_gpt2()(TOKENS).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter does change the outputs
    torch.testing.assert_close(merged_logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_peft_adapter_gives_peft_outputs(capsys, tiny_dir, tmp_path):
    """PEFT saves the adapter and computes the reference outputs; minilora merges it."""
    import peft

    torch.manual_seed(2)
    peft_model = peft.get_peft_model(
        GPT2LMHeadModel.from_pretrained(tiny_dir).eval(),
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
                         fan_in_fan_out=True),
    )
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    with torch.no_grad():
        peft_logits = peft_model(TOKENS).logits

    status, _, _ = run(capsys, "merge", str(tmp_path / "peft-adapter"), str(tmp_path / "merged"), "--model", tiny_dir)
    assert status == 0
    with torch.no_grad():
        merged_logits = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()(TOKENS).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied, old_transformers", [(True, False), (False, False), (True, True)])
def test_merge_resizes_the_vocabulary_to_the_adapters(capsys, monkeypatch, tiny_dir, tmp_path, tied, old_transformers):
    """An adapter trained after resize_token_embeddings (PEFT saves the embedding layers whole): the
    command resizes the base model as a Python user would before loading, and the merged model gives
    PEFT's outputs, on the new tokens too. (Before, the shapes were refused.) ``old_transformers``: a
    resize_token_embeddings without the mean_resizing keyword (transformers < 4.46)."""
    import peft

    source = tmp_path / "base"
    tiny_gpt2(tie_word_embeddings=tied).save_pretrained(source)
    model = GPT2LMHeadModel.from_pretrained(source).eval()
    model.resize_token_embeddings(110)
    torch.manual_seed(2)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"],
                                                            init_lora_weights=False, fan_in_fan_out=True))
    with torch.no_grad():  # trained rows for the new tokens
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            layer.weight.add_(torch.randn(layer.weight.shape) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")  # "auto": the vocabulary differs from source's config
    tokens = torch.tensor([[3, 105, 7, 109]])
    with torch.no_grad():
        peft_logits = peft_model(tokens).logits

    if old_transformers:
        real = GPT2LMHeadModel.resize_token_embeddings
        monkeypatch.setattr(GPT2LMHeadModel, "resize_token_embeddings", lambda self, new_num_tokens: real(self, new_num_tokens))
    status, _, err = run(capsys, "merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--model", str(source))
    assert status == 0, err
    assert "resizing the base model's vocabulary 101 -> 110" in err
    with torch.no_grad():
        merged_logits = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()(tokens).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)


def test_merge_warns_when_the_adapter_names_another_base_model(capsys, monkeypatch, tiny_dir, minilora_adapter,
                                                              tmp_path):
    """The adapter records its base model (tiny_dir); without --model the default is used, with a warning."""
    monkeypatch.setattr(cli, "load_model", lambda name: GPT2LMHeadModel.from_pretrained(tiny_dir).eval())
    status, _, err = run(capsys, "merge", minilora_adapter, str(tmp_path / "out"))
    assert status == 0
    assert "warning: the adapter was saved from base model" in err and f"--model {tiny_dir}" in err


def test_merge_errors_leave_nothing_behind(capsys, tiny_dir, minilora_adapter, tmp_path):
    out_dir = tmp_path / "out"
    cases = [
        ([str(tmp_path / "missing"), str(out_dir)], "does not exist"),
        ([str(tiny_dir), str(out_dir)], "no adapter_config.json"),
        ([str(tiny_dir) + "/config.json", str(out_dir)], "is a file"),
        ([minilora_adapter, str(tiny_dir)], "not empty"),
    ]
    for argv, fragment in cases:
        assert_user_error(*run(capsys, "merge", *argv, "--model", tiny_dir)[::2], fragment)
    assert not out_dir.exists()


def test_merge_into_a_mismatched_model_is_a_clear_error(capsys, minilora_adapter, tmp_path):
    wider = tmp_path / "wider-gpt2"
    tiny_gpt2(n_embd=48).save_pretrained(wider)
    status, _, err = run(capsys, "merge", minilora_adapter, str(tmp_path / "out"), "--model", str(wider))
    assert_user_error(status, err, "shape")
    assert not (tmp_path / "out").exists()


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    """`python -m minilora` (the same main as the console script) in a real process."""
    result = subprocess.run([sys.executable, "-m", "minilora", "merge", str(tmp_path / "nope"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("minilora: error: adapter directory") and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------
# diff
# ------------------------------------------------------------------------------------------
def equal_spectrum_adapter(model: GPT2LMHeadModel, rank: int) -> None:
    """Give every layer dW = scaling * B A with exactly ``rank`` equal non-zero singular values."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in minilora.lora_layers(model):
            q_out, _ = torch.linalg.qr(torch.randn(layer.out_features, layer.r["default"], generator=generator))
            q_in, _ = torch.linalg.qr(torch.randn(layer.in_features, layer.r["default"], generator=generator))
            layer.lora_B["default"].weight.copy_(q_out)              # (out, r), orthonormal columns
            layer.lora_A["default"].weight.copy_(q_in.T)             # (r, in), orthonormal rows
            layer.lora_A["default"].weight[rank:] = 0                # keep ``rank`` directions


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_spectrum_of_a_known_update(rank):
    model = tiny_gpt2()
    minilora.inject(model, minilora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    equal_spectrum_adapter(model, rank)
    for row, (_, layer) in zip(spectrum.layer_changes(model), minilora.lora_layers(model)):
        delta = layer.delta_weight("default").double()  # the full (in, out) matrix: an independent reference
        torch.testing.assert_close(row.singular_values, torch.linalg.svdvals(delta)[:4], atol=1e-6, rtol=1e-6)
        assert row.rank == rank
        assert row.effective_rank == pytest.approx(rank, abs=1e-6)  # k equal singular values -> k
        assert row.delta_norm == pytest.approx(math.sqrt(rank) * layer.scaling["default"], rel=1e-6)
        expected = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(layer.base_layer.weight.double())
        assert row.relative == pytest.approx(expected.item(), rel=1e-6)


def test_effective_rank_formula():
    values = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)
    p = [0.75, 0.25]
    assert spectrum.effective_rank(values) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    assert spectrum.numerical_rank(values, rtol=0.5) == 1
    assert spectrum.numerical_rank(values, rtol=0.01) == 2


def test_diff_table_and_plot(capsys, tiny_dir, minilora_adapter, tmp_path):
    plot = tmp_path / "diff.png"
    status, out, _ = run(capsys, "diff", minilora_adapter, "--model", tiny_dir, "--plot", str(plot))
    assert status == 0
    model = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    minilora.load_adapter(model, minilora_adapter)
    rows = [line.split() for line in out.splitlines() if line.startswith("transformer.h.")]
    assert [row[0] for row in rows] == [name for name, _ in minilora.lora_layers(model)]
    for row, (_, layer) in zip(rows, minilora.lora_layers(model)):
        expected = torch.linalg.matrix_norm(layer.delta_weight()) / torch.linalg.matrix_norm(layer.base_layer.weight)
        assert float(row[4]) == pytest.approx(expected.item(), rel=1e-3)
        assert int(row[5]) == 4  # random A and B: full rank r
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_bad_input(capsys, tiny_dir, minilora_adapter, tmp_path):
    assert_user_error(*run(capsys, "diff", minilora_adapter, "--model", tiny_dir, "--plot", "x.pdf")[::2], ".png")
    assert_user_error(*run(capsys, "diff", minilora_adapter, "--model", tiny_dir, "--rtol", "2")[::2], "--rtol")
    assert_user_error(*run(capsys, "diff", str(tmp_path / "missing"), "--model", tiny_dir)[::2], "does not exist")
    wider = tmp_path / "wider"
    tiny_gpt2(n_embd=48).save_pretrained(wider)
    assert_user_error(*run(capsys, "diff", minilora_adapter, "--model", str(wider))[::2], "shape")


# ------------------------------------------------------------------------------------------
# --model of any architecture: loaded as the class its config names, and merged back as it
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "t5", "vit", "llama"])
def test_merge_keeps_the_saved_class(capsys, tmp_path, arch):
    """BERT comes back a BertForMaskedLM, T5 a T5ForConditionalGeneration, ViT a classifier, all with
    PEFT's merged outputs (PEFT saves the adapter on its default or all-linear targets)."""
    import peft

    from parity.architectures import ARCHITECTURES

    spec = ARCHITECTURES[arch]
    spec.build().save_pretrained(tmp_path / "base")
    targets = "all-linear" if arch == "vit" else None  # ViT has no PEFT default
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(spec.build(), peft.LoraConfig(r=2, target_modules=targets,
                                                                   init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model.merge_and_unload()(**spec.inputs()).logits

    status, out, _ = run(capsys, "merge", str(tmp_path / "adapter"), str(tmp_path / "merged"),
                         "--model", str(tmp_path / "base"))
    assert status == 0 and f"{spec.class_name}.from_pretrained" in out
    assert minilora.models.model_class(str(tmp_path / "merged")).__name__ == spec.class_name
    merged = minilora.load_model(str(tmp_path / "merged"))
    assert type(merged).__name__ == spec.class_name
    with torch.no_grad():
        assert torch.equal(merged(**spec.inputs()).logits, expected)


def test_inspect_uses_the_architecture_default_targets(capsys, tmp_path):
    from parity.architectures import ARCHITECTURES

    ARCHITECTURES["llama"].build().save_pretrained(tmp_path / "llama")
    status, out, _ = run(capsys, "inspect", "--model", str(tmp_path / "llama"), "--r", "2")
    assert status == 0 and "q_proj" in out and "v_proj" in out and "k_proj" not in out
    status, out, _ = run(capsys, "inspect", "--model", str(tmp_path / "llama"), "--r", "2", "--targets", "all-linear")
    assert status == 0 and "down_proj" in out and "k_proj" in out and "lm_head" not in out
    status, _, err = run(capsys, "inspect", "--model", str(tmp_path / "llama"), "--targets", "lm_head", "--r", "0")
    assert_user_error(status, err, "r must be a positive int")


def test_model_whose_class_transformers_lacks_is_a_clear_error(capsys, tmp_path):
    import json

    tiny_gpt2().save_pretrained(tmp_path / "custom")
    config = json.loads((tmp_path / "custom" / "config.json").read_text())
    config["architectures"] = ["MyOwnGPT"]
    (tmp_path / "custom" / "config.json").write_text(json.dumps(config))
    status, _, err = run(capsys, "inspect", "--model", str(tmp_path / "custom"))
    assert_user_error(status, err, "'MyOwnGPT'", "does not have")


def test_merge_of_a_seq_cls_adapter_keeps_the_trained_head(capsys, tmp_path):
    """A PEFT SEQ_CLS adapter (LoRA + the classifier in modules_to_save): the merged model is a
    BertForSequenceClassification with PEFT's merged outputs, trained head included."""
    import peft
    from transformers import BertForSequenceClassification

    from parity.architectures import ARCHITECTURES

    config = ARCHITECTURES["bert"].config()
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    twin = peft.get_peft_model(BertForSequenceClassification.from_pretrained(tmp_path / "base"),
                               peft.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False))
    with torch.no_grad():
        twin.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)  # a trained head
    twin.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = twin.eval().merge_and_unload()(TOKENS).logits
    status, out, _ = run(capsys, "merge", str(tmp_path / "adapter"), str(tmp_path / "merged"),
                         "--model", str(tmp_path / "base"))
    assert status == 0 and "BertForSequenceClassification.from_pretrained" in out
    with torch.no_grad():
        assert torch.equal(minilora.load_model(str(tmp_path / "merged"))(TOKENS).logits, expected)
