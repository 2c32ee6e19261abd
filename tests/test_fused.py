"""The forward paths (minilora/fused.py) against the reference path: outputs and gradients.

Tolerances: float32 within 1e-5 relative (max |difference| / max |reference|), bfloat16 within 3e-2
(bfloat16 rounding alone moves the tiny GPT-2's logits 2e-2 away from float32).
The reference path itself is PEFT's op order; one test checks it against PEFT here too, so that
"equal to the reference" means "equal to PEFT".
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import minilora
from minilora.fused import _concatenated_weight, split_concatenated
from parity.twins import make_twins, max_rel_diff, randomize_adapters
from tests.conftest import DEVICES

FLOAT32_RTOL = 1e-5
BFLOAT16_RTOL = 3e-2  # bfloat16 rounding alone moves these logits 2e-2 away from float32
ALL_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2(seed: int = 0) -> nn.Module:
    return minilora.models.tiny_gpt2(seed, n_head=4, bos_token_id=0, eos_token_id=0)


def lora_model(base: nn.Module, path: str, dropout: float = 0.0, r: int = 4, alpha: float = 12) -> nn.Module:
    """A copy of ``base`` with random non-zero adapters (scaling 3: not a power of two) on ``path``."""
    model = copy.deepcopy(base)
    minilora.inject(model, minilora.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                               target_modules=ALL_TARGETS))
    randomize_adapters(model, seed=1, std=0.2)
    return minilora.set_forward_path(model, path)


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    diff = max_rel_diff(actual, expected)
    assert diff <= rtol, f"{what}: max relative difference {diff:.3g} > {rtol:g}"


# ------------------------------------------------------------------------------------------------
# One layer, any shape: hypothesis
# ------------------------------------------------------------------------------------------------
def one_layer(kind: str, n_in: int, n_out: int, r: int, alpha: float, bias: bool, seed: int) -> minilora.LoraLinear:
    torch.manual_seed(seed)
    base = Conv1D(n_out, n_in) if kind == "conv1d" else nn.Linear(n_in, n_out, bias=bias)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    layer = minilora.LoraLinear(base, r=r, lora_alpha=alpha, init_lora_weights=False)
    base.requires_grad_(False)
    return layer


@given(kind=st.sampled_from(["linear", "conv1d"]), n_in=st.integers(1, 24), n_out=st.integers(1, 24),
       r=st.integers(1, 6), alpha=st.floats(0.5, 40), bias=st.booleans(), rows=st.integers(1, 9),
       lead=st.sampled_from([(), (2,), (2, 3)]), seed=st.integers(0, 2**16))
def test_fused_layer_matches_reference_forward_and_gradients(kind, n_in, n_out, r, alpha, bias, rows, lead, seed):
    reference = one_layer(kind, n_in, n_out, r, alpha, bias, seed)
    fused = copy.deepcopy(reference)
    container = nn.Sequential(fused)  # set_forward_path works on any module that holds LoRA layers
    minilora.set_forward_path(container, "fused")
    x = torch.randn(*lead, rows, n_in, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():  # the concatenated-weight path
        assert_close(fused(x), reference(x), FLOAT32_RTOL, "no_grad forward")
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fused = reference(x_ref), fused(x_fused)  # the addmm_ path
    assert out_fused.shape == out_ref.shape
    assert_close(out_fused, out_ref, FLOAT32_RTOL, "forward")
    upstream = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    out_ref.backward(upstream)
    out_fused.backward(upstream)
    assert_close(x_fused.grad, x_ref.grad, FLOAT32_RTOL, "grad x")
    for name in ("lora_A", "lora_B"):
        expected = getattr(reference, name)["default"].weight.grad
        assert_close(getattr(fused, name)["default"].weight.grad, expected, FLOAT32_RTOL, f"grad {name}")


@given(kind=st.sampled_from(["linear", "conv1d"]), r=st.integers(1, 6), alpha=st.floats(0.5, 40),
       seed=st.integers(0, 2**16))
def test_merged_layer_matches_reference(kind, r, alpha, seed):
    reference = one_layer(kind, 16, 12, r, alpha, True, seed)
    merged = nn.Sequential(copy.deepcopy(reference))
    minilora.set_forward_path(merged, "merged")
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert_close(merged(x), reference(x), FLOAT32_RTOL, "merged forward")


# ------------------------------------------------------------------------------------------------
# GPT-2 (tiny): every path, forward and gradients, on each device
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpt2_paths_match_reference_and_peft(device, dropout):
    base = tiny_gpt2().to(device)
    config = minilora.LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=ALL_TARGETS,
                                 fan_in_fan_out=True)
    reference, peft_model = make_twins(base, config)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0)).to(device)

    with torch.no_grad():
        expected = peft_model(ids).logits
        assert_close(reference(ids).logits, expected, 0.0 if device == "cpu" else FLOAT32_RTOL, "reference vs PEFT")
        for path, concatenate in (("merged", True), ("fused", True), ("fused", False)):
            model = minilora.set_forward_path(copy.deepcopy(reference), path, concatenate=concatenate)
            assert minilora.forward_path(model) == path
            assert_close(model(ids).logits, expected, FLOAT32_RTOL, f"{path} (concatenate={concatenate}) eval")

    # Training: same seed, same dropout masks (the fused path draws them in the same order).
    results = {}
    for path in ("reference", "fused"):
        model = minilora.set_forward_path(copy.deepcopy(reference), path).train()
        torch.manual_seed(7)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results[path] = loss, lora_grads(model)
    (loss_ref, grads_ref), (loss_fused, grads_fused) = results["reference"], results["fused"]
    assert_close(loss_fused, loss_ref, FLOAT32_RTOL, "training loss")
    assert grads_ref.keys() == grads_fused.keys() and len(grads_ref) == 2 * 4 * 2  # 2 blocks x 4 targets x (A, B)
    for name, grad in grads_ref.items():
        assert_close(grads_fused[name], grad, FLOAT32_RTOL, f"grad {name}")


def test_fused_trains_like_reference_over_adamw_steps():
    base = tiny_gpt2()
    models = {path: lora_model(base, path, dropout=0.1).train() for path in ("reference", "fused")}
    optimizers = {path: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for path, m in models.items()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        for path, model in models.items():
            torch.manual_seed(step)
            model(ids, labels=ids).loss.backward()
            optimizers[path].step()
            optimizers[path].zero_grad()
    with torch.no_grad():  # eval + no_grad: the concatenated weight, which must see the trained A
        models["fused"].eval()
        models["reference"].eval()
        assert_close(models["fused"](ids).logits, models["reference"](ids).logits, FLOAT32_RTOL, "after training")


def test_bfloat16_base_within_stated_tolerance():
    base = tiny_gpt2().to(torch.bfloat16)
    reference = lora_model(base, "reference")
    fused = minilora.set_forward_path(copy.deepcopy(reference), "fused")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits.float()
        assert_close(fused(ids).logits.float(), expected, BFLOAT16_RTOL, "bfloat16 fused")
        merged = minilora.set_forward_path(copy.deepcopy(reference), "merged")
        assert_close(merged(ids).logits.float(), expected, BFLOAT16_RTOL, "bfloat16 merged")


# ------------------------------------------------------------------------------------------------
# The concatenated weight never goes stale
# ------------------------------------------------------------------------------------------------
def _check_fused_equals_fresh_reference(fused: nn.Module, ids: torch.Tensor, what: str) -> None:
    """Compare the fused model with a reference copy built now from its current weights."""
    reference = minilora.set_forward_path(copy.deepcopy(fused), "reference")
    with torch.no_grad():
        assert_close(fused(ids).logits, reference(ids).logits, FLOAT32_RTOL, what)


def test_concatenated_weight_follows_every_change_to_w0_a_and_b():
    base = tiny_gpt2()
    fused = lora_model(base, "fused")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    layer = fused.transformer.h[0].attn.c_attn
    before = fused(ids).logits.detach()

    with torch.no_grad():
        layer.lora_A["default"].weight.data.mul_(3.0)  # a write that autograd's version counter does not see
    _check_fused_equals_fresh_reference(fused, ids, "after changing A through .data")
    with torch.no_grad():
        layer.base_layer.weight.add_(0.5)   # in place: W0 is a view of the buffer
        layer.base_layer.bias.sub_(0.25)
    _check_fused_equals_fresh_reference(fused, ids, "after changing W0 and b in place")
    with torch.no_grad():
        layer.base_layer.weight.data = layer.base_layer.weight.data * 0.5  # a new tensor
    _check_fused_equals_fresh_reference(fused, ids, "after replacing W0")

    with torch.no_grad():
        layer.lora_A["default"].weight.data = layer.lora_A["default"].weight.data * -1.0  # A replaced: rebuilt from the new A
    _check_fused_equals_fresh_reference(fused, ids, "after replacing A")
    buffer = _concatenated_weight(layer).buffer
    assert split_concatenated(layer, buffer)[1].data_ptr() == layer.lora_A["default"].weight.data_ptr()
    with torch.no_grad():
        layer.lora_B["default"].weight.data = layer.lora_B["default"].weight.data * 2.0  # B replaced (own layout)
    _check_fused_equals_fresh_reference(fused, ids, "after replacing B")
    assert layer.lora_B["default"].weight.T.is_contiguous()  # stored as B^T's rows again by the rebuild

    adapter = {k: v.clone() * 2 for k, v in fused.state_dict().items() if ".lora_" in k}
    fused.load_state_dict(adapter, strict=False)
    _check_fused_equals_fresh_reference(fused, ids, "after load_state_dict")

    minilora.merge(fused, safe=True)  # safe merge replaces W0's storage
    _check_fused_equals_fresh_reference(fused, ids, "merged while fused")
    minilora.unmerge(fused)
    _check_fused_equals_fresh_reference(fused, ids, "merged then unmerged")

    _check_fused_equals_fresh_reference(copy.deepcopy(fused), ids, "a deep copy (new storage)")
    fused.double()
    reference = minilora.set_forward_path(copy.deepcopy(fused), "reference")
    with torch.no_grad():
        assert_close(fused(ids).logits, reference(ids).logits, 1e-12, "after .double()")
    assert not torch.equal(before.double(), reference(ids).logits.detach()), "the changes above changed nothing"


def _replace_parameter(module: nn.Module, name: str, direct: bool) -> None:
    """Put a new Parameter (other values) in place of ``module.<name>``: with setattr, or straight into
    ``_parameters`` as accelerate's set_module_tensor_to_device does."""
    old = module._parameters[name]
    new = nn.Parameter(old.detach() * -0.5 + 0.125, requires_grad=old.requires_grad)
    if direct:
        module._parameters[name] = new
    else:
        setattr(module, name, new)


def _replace_module(owner: nn.Module, name: str, direct: bool) -> None:
    """Put a copy of ``owner.<name>`` with other values in its place: with setattr / ModuleDict's
    ``[name] =``, or straight into ``_modules`` as quantizers' replace-layer loops do."""
    new = copy.deepcopy(owner._modules[name])
    with torch.no_grad():
        for param in new.parameters():
            param.mul_(-0.5).add_(0.125)
    if direct:
        owner._modules[name] = new
    elif isinstance(owner, nn.ModuleDict):
        owner[name] = new
    else:
        setattr(owner, name, new)


REPLACEMENTS = {
    "W0 Parameter (setattr)": lambda layer, direct: _replace_parameter(layer.base_layer, "weight", direct),
    "bias Parameter": lambda layer, direct: _replace_parameter(layer.base_layer, "bias", direct),
    "A Parameter": lambda layer, direct: _replace_parameter(layer.lora_A["default"], "weight", direct),
    "B Parameter": lambda layer, direct: _replace_parameter(layer.lora_B["default"], "weight", direct),
    "base layer": lambda layer, direct: _replace_module(layer, "base_layer", direct),
    "A module": lambda layer, direct: _replace_module(layer.lora_A, "default", direct),
    "B module": lambda layer, direct: _replace_module(layer.lora_B, "default", direct),
    "lora_A ModuleDict": lambda layer, direct: _replace_module(layer, "lora_A", direct),
    "lora_B ModuleDict": lambda layer, direct: _replace_module(layer, "lora_B", direct),
}


@pytest.mark.parametrize("direct", [False, True], ids=["setattr", "into the dict"])
@pytest.mark.parametrize("what", list(REPLACEMENTS))
def test_concatenated_weight_follows_replaced_modules_and_parameters(what, direct):
    """The no-grad fused call reads a buffer built from the modules and Parameters in place at build
    time; any of them put in place of another (the buffer then holds stale values) must be seen."""
    fused = lora_model(tiny_gpt2(), "fused")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    layer = fused.transformer.h[0].attn.c_attn
    with torch.no_grad():
        before = fused(ids).logits
    REPLACEMENTS[what](layer, direct)
    _check_fused_equals_fresh_reference(fused, ids, f"after replacing the {what}")
    with torch.no_grad():
        assert not torch.equal(fused(ids).logits, before), "the replacement changed nothing: the test proves nothing"


def test_concatenated_weight_follows_the_active_adapter():
    fused = lora_model(tiny_gpt2(), "fused")
    minilora.add_adapter(fused, "other", minilora.LoraConfig(r=2, lora_alpha=5, target_modules=ALL_TARGETS))
    randomize_adapters(fused, seed=2, std=0.2)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    for name in ("other", "default", "other"):
        minilora.set_adapter(fused, name)
        _check_fused_equals_fresh_reference(fused, ids, f"adapter {name} active")
        assert _concatenated_weight(fused.transformer.h[0].attn.c_attn).adapter == name


def test_copies_build_their_own_buffer():
    """A deep copy or a pickled copy gets no Concatenated (its pointers would name the original's
    memory) and builds its own; in-place changes to the copy are followed after the original is gone."""
    import io
    fused = lora_model(tiny_gpt2(), "fused")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused(ids)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    copies = {"deepcopy": copy.deepcopy(fused), "torch.save": torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)}
    del fused
    for how, model in copies.items():
        layer = model.transformer.h[0].attn.c_attn
        assert layer._concatenated is None, how
        _check_fused_equals_fresh_reference(model, ids, f"a {how} copy")
        with torch.no_grad():
            layer.base_layer.weight.add_(0.5)   # in place, after the copy built its own buffer
            layer.lora_A["default"].weight.mul_(2.0)
        _check_fused_equals_fresh_reference(model, ids, f"a {how} copy changed in place")


HOOKED = {
    "base_layer forward hook": lambda layer: layer.base_layer.register_forward_hook(lambda m, i, o: o * 2),
    "base_layer pre-hook": lambda layer: layer.base_layer.register_forward_pre_hook(lambda m, i: (i[0] + 1,)),
    "lora_A forward hook": lambda layer: layer.lora_A["default"].register_forward_hook(lambda m, i, o: o * 3),
    "lora_B forward hook": lambda layer: layer.lora_B["default"].register_forward_hook(lambda m, i, o: -o),
    "dropout pre-hook": lambda layer: layer.lora_dropout["default"].register_forward_pre_hook(lambda m, i: (i[0] * 0,)),
}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("what", list(HOOKED))
def test_hooks_on_the_modules_the_fused_call_skips_are_honoured(what, grad):
    """PEFT's layer calls base_layer, lora_A, lora_B and the dropout, so hooks on them act; the fused
    path computes the reference way while one is there, and goes back to its own when it is removed."""
    fused = lora_model(tiny_gpt2(), "fused")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = fused(ids).logits
    reference = minilora.set_forward_path(copy.deepcopy(fused), "reference")
    handles = [HOOKED[what](model.transformer.h[0].attn.c_attn) for model in (fused, reference)]
    with torch.set_grad_enabled(grad):
        hooked = fused(ids).logits
        assert_close(hooked, reference(ids).logits, FLOAT32_RTOL, f"{what}, grad={grad}")
    assert not torch.equal(hooked, before), "the hook changed nothing: the test proves nothing"
    for handle in handles:
        handle.remove()
    layer = fused.transformer.h[0].attn.c_attn
    with torch.no_grad():
        assert_close(fused(ids).logits, before, FLOAT32_RTOL, "hook removed")
    assert layer._concatenated is not None and minilora.forward_path(fused) == "fused"


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_autocast_runs_within_bfloat16_tolerance(grad):
    """Under torch.autocast the matmuls run in bfloat16 while B stays float32: the fused accumulate
    must not mix them (it did: a RuntimeError). Its logits must be no farther from the float32
    reference than the reference's own under autocast (here ~4e-2; the fused path rounds less
    often, ~1e-2), nor than BFLOAT16_RTOL."""
    fused = lora_model(tiny_gpt2(), "fused")
    reference = minilora.set_forward_path(copy.deepcopy(fused), "reference")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = reference(ids).logits
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = reference(ids).logits.float()
        got = fused(ids).logits.float()
    assert_close(got, exact, BFLOAT16_RTOL, f"autocast, grad={grad}")
    assert_close(got, exact, max_rel_diff(rounded, exact), f"autocast, grad={grad}, against the reference's own error")


def test_rebuilt_under_inference_mode_still_trains():
    fused = lora_model(tiny_gpt2(), "fused")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    fused.double()  # W0 replaced: the next call rebuilds the buffer, here inside inference_mode
    with torch.inference_mode():
        fused(ids)
    fused.train()
    fused(ids, labels=ids).loss.backward()  # would fail if the buffer were an inference tensor
    assert all(p.grad is not None for p in fused.parameters() if p.requires_grad)


def test_leaving_fused_gives_w0_its_own_storage_back():
    fused = lora_model(tiny_gpt2(), "fused")
    layers = [layer for _, layer in minilora.lora_layers(fused)]
    buffer = _concatenated_weight(layers[0]).buffer  # Conv1D: (in, out + r) = [W0 | A^T], W0 and A views of it
    assert buffer.shape == (layers[0].in_features, layers[0].out_features + 4)
    assert layers[0].base_layer.weight.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[:, layers[0].out_features:].T, layers[0].lora_A["default"].weight)
    assert all(layer.lora_B["default"].weight.T.is_contiguous() for layer in layers)  # B^T's rows
    minilora.set_forward_path(fused, "reference")
    for layer in layers:
        assert layer._concatenated is None and layer.forward_override is None
        assert layer.lora_B["default"].weight.is_contiguous()
        for weight in (layer.base_layer.weight, layer.lora_A["default"].weight):
            assert weight.is_contiguous() and weight.untyped_storage().nbytes() == weight.nbytes
    assert minilora.forward_path(fused) == "reference"


def test_merge_and_unload_of_a_fused_tied_lm_head_leaves_no_view_of_the_buffer():
    """An adapter on GPT-2's tied lm_head: merging unties it, so the input embedding keeps the Parameter
    the buffer was built from. After merge_and_unload no Parameter may still be a view of a buffer with
    A's rows (torch.save of the state dict would store them), and the outputs are the reference's."""
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    minilora.inject(model, minilora.LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "lm_head"]))
    randomize_adapters(model, seed=1, std=0.2)
    reference = copy.deepcopy(model)
    minilora.set_forward_path(model, "fused")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
        minilora.merge_and_unload(model)
        minilora.merge_and_unload(reference)
        assert_close(model(ids).logits, reference(ids).logits, FLOAT32_RTOL, "merged and unloaded")
    for name, param in model.named_parameters():
        assert param.untyped_storage().nbytes() == param.nbytes, f"{name} is a view into a larger storage"


def test_disabled_fused_model_gives_base_outputs():
    base = tiny_gpt2()
    fused = lora_model(base, "fused")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), minilora.disabled(fused):
        assert torch.equal(fused(ids).logits, base(ids).logits)


def test_merged_path_unmerges_when_left():
    base = tiny_gpt2()
    reference = lora_model(base, "reference")
    model = minilora.set_forward_path(copy.deepcopy(reference), "merged")
    assert all(layer.merged for _, layer in minilora.lora_layers(model))
    minilora.set_forward_path(model, "fused")
    assert not any(layer.merged for _, layer in minilora.lora_layers(model))
    for (_, a), (_, b) in zip(minilora.lora_layers(model), minilora.lora_layers(reference)):
        assert_close(a.base_layer.weight, b.base_layer.weight, FLOAT32_RTOL, "W0 after merge + unmerge")


@pytest.mark.parametrize("path, message", [("compiled", "torch.compile"), ("fast", "choose one of")])
def test_unknown_path_is_a_clear_error_and_changes_nothing(path, message):
    model = lora_model(tiny_gpt2(), "fused")
    with pytest.raises(minilora.MiniLoraError, match=message):
        minilora.set_forward_path(model, path)
    assert minilora.forward_path(model) == "fused"
    with pytest.raises(minilora.MiniLoraError, match="inject"):
        minilora.set_forward_path(tiny_gpt2(), "fused")


def test_concatenated_fields_are_in_the_order_its_readers_unpack():
    """fused_forward's check and concatenated_forward unpack Concatenated by position, for speed: a field moved
    would hand them another tensor without an error. This pins the order those lines assume."""
    from minilora.fused import Concatenated
    assert Concatenated._fields == ("right", "bias", "B_T", "sizes", "adapter", "registered", "parameters",
                                    "pointers", "hooks", "buffer")
