"""Models that inspect their own layers, and the parity suite's architecture axis.

- LoraLinear answers ``weight`` / ``bias`` / ``in_features`` / ``out_features`` (and Conv1D's ``nx`` /
  ``nf``) with its base layer's, as PEFT's layers do: T5's ``self.wo.weight`` and a tied ``lm_head``
  read through ``get_output_embeddings()`` work.
- ``python -m parity --arch ...`` runs every check per architecture against PEFT: a few kinds of
  model here (decoder, encoder, T5 with every linear layer, a vision model, one PEFT has no default
  for, a mixture of experts); ``--arch all`` is for the command line (a few minutes).
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import minilora
from minilora.models import tiny_gpt2
from minilora import MiniLoraError
from parity import grid, suite
from parity.architectures import ARCHITECTURES
from parity.results import FAIL, NOT_APPLICABLE, PASS


def test_lora_linear_reads_through_to_its_base_layer():
    linear = minilora.LoraLinear(nn.Linear(6, 4), r=2)
    assert linear.weight is linear.base_layer.weight and linear.bias is linear.base_layer.bias
    assert (linear.in_features, linear.out_features) == (6, 4)
    with pytest.raises(AttributeError):
        linear.nx  # noqa: B018 - an nn.Linear has no nx
    conv = minilora.LoraLinear(Conv1D(4, 6), r=2)  # Conv1D(nf=out, nx=in)
    assert (conv.nx, conv.nf, conv.in_features, conv.out_features) == (6, 4, 6, 4)
    assert conv.weight is conv.base_layer.weight and conv.weight.shape == (6, 4)


def test_weight_assignment_reaches_the_base_layer_and_refuses_another_shape():
    layer = minilora.LoraLinear(nn.Linear(6, 4), r=2)
    same = nn.Parameter(torch.ones(4, 6))
    layer.weight = same  # what tie_weights does to a tied lm_head
    assert layer.base_layer.weight is same and "weight" not in layer._parameters
    with pytest.raises(MiniLoraError, match="resize the embeddings before inject"):
        layer.weight = nn.Parameter(torch.ones(5, 6))
    assert layer.base_layer.weight is same


def test_tied_lm_head_with_lora_is_the_input_embedding():
    model = ARCHITECTURES["gpt2"].build()  # GPT-2 ties lm_head to wte
    torch.manual_seed(0)
    mini = minilora.inject(copy.deepcopy(model), minilora.LoraConfig(target_modules=["c_attn", "lm_head"]))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["c_attn", "lm_head"]))
    head = mini.get_output_embeddings()
    assert isinstance(head, minilora.LoraLinear)
    assert head.weight is mini.get_input_embeddings().weight
    assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight  # the same in PEFT
    mini.tie_weights()  # re-tying (as save/load do) keeps the adapter
    assert isinstance(mini.get_output_embeddings(), minilora.LoraLinear)


def test_resize_token_embeddings_with_lora_elsewhere_equals_peft():
    model = ARCHITECTURES["llama"].build()
    torch.manual_seed(0)
    mini = minilora.inject(copy.deepcopy(model), minilora.LoraConfig(target_modules="all-linear",
                                                                     init_lora_weights=False))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear",
                                                                          init_lora_weights=False))
    for m in (mini, twin):
        torch.manual_seed(1)
        m.resize_token_embeddings(140)
    ids = torch.randint(0, 140, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mini(input_ids=ids).logits, twin(input_ids=ids).logits)
    assert mini.get_output_embeddings().weight.shape[0] == 140


# --------------------------------------------------------------------------------------------
# The parity suite's architecture axis
# --------------------------------------------------------------------------------------------
SAMPLE = "t5,vit,phi3,mixtral"  # T5 with every linear layer, a vision model, no PEFT default, MoE


@pytest.fixture(scope="module")
def arch_rows():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on shared cores (as python -m parity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = suite.run_suite(grid.arch_grid(SAMPLE), ["cpu"], training_steps=1)
    torch.set_num_threads(previous)
    return rows


def test_arch_axis_passes_on_a_sample(arch_rows):
    failed = [f"{r.check} | {r.configuration} | {r.message}" for r in arch_rows if r.status == FAIL]
    assert not failed, failed


def test_arch_axis_covers_every_check_and_says_why_when_not(arch_rows):
    by_case = {}
    for row in arch_rows:
        by_case.setdefault(row.configuration.split()[0] + " " + row.configuration.split()[4], []).append(row)
    t5 = {r.check for r in by_case["t5 all-linear"] if r.status == PASS}
    assert {"targets", "counts", "init", "forward", "backward", "training", "merge", "files", "generate"} <= t5
    # PEFT has no default for phi3 / vit: both refuse, and the other checks are N/A, not missing
    for name in ("phi3 default", "vit default"):
        rows = by_case[name]
        assert [r.status for r in rows if r.check == "targets"] == [PASS] and "both refuse" in str(rows[0].value)
        assert all(r.status == NOT_APPLICABLE for r in rows if r.check != "targets")
    # mixtral + all-linear with dropout: PEFT's expert parameters refuse lora_dropout, minilora refuses MoE
    [moe] = [r for r in by_case["mixtral all-linear"] if r.check == "targets"]
    assert moe.status == PASS and "lora_dropout" in moe.message and "mixture of experts" in moe.message


def test_refusal_of_what_peft_does_on_expert_parameters_is_not_applicable():
    """Without dropout PEFT puts LoRA on mixtral's fused experts (target_parameters): minilora cannot."""
    from parity import checks

    case = grid.Case("arch:mixtral", r=4, lora_alpha=8, selector="all-linear")
    with pytest.raises(MiniLoraError) as error:
        minilora.inject(ARCHITECTURES["mixtral"].build(), case.config())
    [row] = checks.check_refusal(ARCHITECTURES["mixtral"].build(), case, "cpu", error.value)
    assert row.status == NOT_APPLICABLE and "PEFT puts LoRA on parameters" in row.message


def test_arch_grid_names():
    assert len(grid.arch_grid("all")) == 2 * len(ARCHITECTURES) and len(ARCHITECTURES) >= 25
    with pytest.raises(ValueError, match="unknown architecture.*'nope'.*known: llama"):
        grid.arch_grid("llama,nope")


@pytest.mark.parametrize("targets, line", [
    (None, "trainable params: 1,126,400 || all params: 1,101,174,784 || trainable%: 0.1023"),
    ("all-linear", "trainable params: 6,307,840 || all params: 1,106,356,224 || trainable%: 0.5701"),
])
def test_readme_llama_example_is_peft_line(targets, line):
    """The README's TinyLlama-shaped example, on the meta device: minilora's line, and PEFT's counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
        model = minilora.inject(copy.deepcopy(base), minilora.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    assert minilora.trainable_parameters_line(model) == line
    assert tuple(minilora.count_parameters(model)) == tuple(twin.get_nb_trainable_parameters())


def test_parity_cli_arch(capsys):
    from parity import cli

    assert cli.main(["--arch", "llama,nope", "--quiet"]) == 2
    assert "unknown architecture" in capsys.readouterr().err
    assert cli.main(["--arch", "gpt_neox", "--checks", "targets", "counts", "--quiet", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "gpt_neox r=4 alpha=8 dropout=0.1 default" in out and "all-linear" in out and "FAIL" not in out


def test_architecture_table_one_line_per_architecture(arch_rows):
    from parity import report

    text = report.architecture_table(arch_rows, grid.arch_grid(SAMPLE))
    lines = text.splitlines()
    assert lines[0].split() == ["architecture", "target_modules=None", '"all-linear"'] and len(lines) == 2 + 4
    t5 = next(line for line in lines if line.startswith("t5 "))
    assert "12 layers, all" in t5 and "32 layers, all" in t5 and "FAIL" not in text
    assert "both refuse" in next(line for line in lines if line.startswith("phi3"))
    planted = [row if not (row.check == "forward" and row.configuration.startswith("t5 ")) else
               type(row)(**{**row.to_dict(), "status": FAIL}) for row in arch_rows]
    assert "2 FAIL" in next(line for line in report.architecture_table(planted, grid.arch_grid(SAMPLE)).splitlines()
                            if line.startswith("t5 "))


def test_resize_token_embeddings_after_inject_on_a_tied_lm_head_is_a_clear_error():
    """transformers re-ties GPT-2's lm_head to the resized wte below LoraLinear.__setattr__; the next
    forward must say what happened (a MiniLoraError), not fail with a shape mismatch in a matmul."""
    model = tiny_gpt2()
    minilora.inject(model, minilora.LoraConfig(target_modules=["lm_head"]))
    model.resize_token_embeddings(model.config.vocab_size + 8)
    with pytest.raises(minilora.MiniLoraError, match="resize_token_embeddings after inject"):
        model(torch.tensor([[1, 2, 3]]))
