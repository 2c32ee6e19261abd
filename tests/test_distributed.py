"""Scale-out on the CPU: 2 ranks over gloo, in forked processes (no torchrun needed), tiny GPT-2.

- DDP: 3 AdamW steps with each rank on half of every batch give the adapter of one process on the
  whole batch, which is PEFT's adapter bit for bit (tests/test_peft_oracle.py's claim, re-checked
  here on these steps); the adapter saved from ``ddp.module`` on rank 0 loads back to those values.
- FSDP2 (``fully_shard``): ``save_adapter`` on the shards is a clear MiniLoraError; a gathered full
  state dict saves the adapter exactly; the fused path's concatenated weight is refused, and the
  fused path without it gives the reference path's outputs and gradients.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

import minilora
from minilora.inject import is_lora_parameter
from minilora.models import tiny_gpt2 as _tiny_gpt2
from parity.twins import randomize_adapters

pytestmark = pytest.mark.skipif(not (hasattr(os, "fork") and torch.distributed.is_available()),
                                reason="needs os.fork and torch.distributed (gloo)")

WORLD = 2
STEPS = 3
CONFIG = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])


def tiny_gpt2():
    """The tiny GPT-2 without its own dropout, so that training is deterministic."""
    return _tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (4, 8), generator=generator) for _ in range(STEPS)]


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if is_lora_parameter(name)}


def train(model, inputs_per_step, step=lambda model: None):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for inputs in inputs_per_step:
        optimizer.zero_grad()
        model(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.step()
    return model


def worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}

    # DDP: each rank takes two of the four rows of every batch
    model = tiny_gpt2()
    torch.manual_seed(0)
    minilora.inject(model, minilora.LoraConfig(**CONFIG))
    ddp = DistributedDataParallel(model)
    train(ddp, [inputs[2 * rank:2 * rank + 2] for inputs in batches()])
    results["ddp"] = lora_weights(ddp.module)
    if rank == 0:
        minilora.save_adapter(ddp.module, Path(out) / "ddp-adapter")

    # FSDP2: shards refused, gathered state dict saved exactly, concatenated fused path refused
    model = tiny_gpt2()
    minilora.inject(model, minilora.LoraConfig(**CONFIG))
    randomize_adapters(model, seed=11)
    results["fsdp-expected"] = lora_weights(model)
    fully_shard(model)
    try:
        minilora.save_adapter(model, Path(out) / f"shards-{rank}")
        results["shards"] = "saved"
    except minilora.MiniLoraError as error:
        results["shards"] = str(error)
    results["shards-dir"] = (Path(out) / f"shards-{rank}").exists()
    try:
        minilora.set_forward_path(model, "fused")
        results["fused"] = "selected"
    except minilora.MiniLoraError as error:
        results["fused"] = str(error)
    # the fused path without the concatenated weight: the reference path's outputs and gradients,
    # each on its own freshly sharded model, after a no-grad forward (where the buffer used to go stale)
    inputs = batches()[0][2 * rank:2 * rank + 2]
    for path in ("reference", "fused"):
        sharded = tiny_gpt2()
        minilora.inject(sharded, minilora.LoraConfig(**CONFIG))
        randomize_adapters(sharded, seed=11)
        fully_shard(sharded)
        minilora.set_forward_path(sharded, path, concatenate=False)
        with torch.no_grad():
            results[f"{path}-no-grad"] = sharded(input_ids=inputs).logits
        sharded(input_ids=inputs, labels=inputs).loss.backward()
        results[f"{path}-grads"] = {name: param.grad.to_local().clone() for name, param in sharded.named_parameters()
                                    if param.grad is not None}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        minilora.save_adapter(model, Path(out) / "fsdp-adapter", state_dict=state)
    torch.save(results, Path(out) / f"rank-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(worker, args=(free_port(), out), nprocs=WORLD, start_method="fork")
        yield Path(out), [torch.load(Path(out) / f"rank-{rank}.pt", weights_only=True) for rank in range(WORLD)]


def test_ddp_matches_one_process_and_peft(ranks):
    import peft

    out, results = ranks
    single = tiny_gpt2()
    torch.manual_seed(0)
    minilora.inject(single, minilora.LoraConfig(**CONFIG))
    train(single, batches())
    expected = lora_weights(single)

    twin = tiny_gpt2()
    torch.manual_seed(0)
    twin = peft.get_peft_model(twin, peft.LoraConfig(**CONFIG))
    train(twin, batches())
    theirs = {name.removeprefix("base_model.model."): value for name, value in lora_weights(twin).items()}
    assert theirs.keys() == expected.keys()
    assert all(torch.equal(theirs[name], expected[name]) for name in expected)  # PEFT: bit for bit

    for rank_result in results:  # the ranks agree, and equal one process on the whole batch
        for name, value in expected.items():
            # gradients are averaged across ranks in another order than one process sums them
            assert torch.allclose(rank_result["ddp"][name], value, rtol=0, atol=1e-6), name
    loaded = minilora.load_adapter(tiny_gpt2(), out / "ddp-adapter")
    assert all(torch.equal(lora_weights(loaded)[name], results[0]["ddp"][name]) for name in expected)


def test_fsdp2_shards_are_refused_and_a_gathered_state_dict_saves_exactly(ranks):
    out, results = ranks
    for rank_result in results:
        assert "sharded" in rank_result["shards"] and "get_model_state_dict" in rank_result["shards"]
        assert not rank_result["shards-dir"]  # refused before anything was written
        assert "concatenate=False" in rank_result["fused"]
    for rank_result in results:  # fused (concatenate=False) under FSDP2 = the reference path
        reference, fused = rank_result["reference-no-grad"], rank_result["fused-no-grad"]
        assert (fused - reference).abs().max() <= 1e-5 * reference.abs().max()
        assert rank_result["fused-grads"].keys() == rank_result["reference-grads"].keys()
        for name, grad in rank_result["reference-grads"].items():
            assert torch.allclose(rank_result["fused-grads"][name], grad, rtol=1e-4, atol=1e-7), name
    loaded = minilora.load_adapter(tiny_gpt2(), out / "fsdp-adapter")
    expected = results[0]["fsdp-expected"]
    assert all(torch.equal(lora_weights(loaded)[name], expected[name]) for name in expected)
