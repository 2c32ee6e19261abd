"""Peak memory of one variant on one workload.

CPU: a fresh Python process per variant, so that no other variant's tensors are counted. The
child builds only its variant, runs the workload once to warm up, resets the kernel's high-water
mark (``/proc/self/clear_refs``, Linux) and runs it again; the figure is that run's peak RSS minus
the RSS just before it: the memory the workload itself needs. glibc's malloc would otherwise keep
freed blocks mapped and hand them out again, so that a second run costs no new RSS at all; the
child is started with a fixed mmap threshold and no trim threshold (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_), so that freed memory goes back to the kernel and RSS follows what is live.
CUDA: ``torch.cuda.max_memory_allocated`` around the same second run, in process.

Run as ``python -m benchmarks.memory '<json spec>'`` it prints one JSON line.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch

from benchmarks.timing import run_once

MIB = 2**20
# glibc: blocks of 64 KiB and more are mapped on their own and unmapped when freed; the heap is
# trimmed back at every free. RSS then follows live memory instead of the allocator's caches.
MALLOC_RETURNS_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def measure(run, device: str) -> dict:
    """Warm up, then the peak memory of one more call of ``run`` beyond what was held before it."""
    run()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return {"kind": "cuda max allocated", "peak_mib": (torch.cuda.max_memory_allocated() - before) / MIB,
                "held_mib": before / MIB}
    if not _reset_peak():
        return {"kind": "unavailable", "peak_mib": None, "held_mib": None}
    before = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM")
    return {"kind": "cpu rss", "peak_mib": (peak - before) / 1024, "held_mib": before / 1024}


def child_main(spec: dict) -> dict:
    """Build one variant and measure one workload (the body of the child process)."""
    from benchmarks.runner import make_workload
    from benchmarks.variants import adapter_weights, build_variant, load_base, lora_config

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    base = load_base(spec["model"], spec["device"])
    config = lora_config(tuple(spec["targets"]), spec["r"], spec["dropout"], spec["alpha_per_r"])
    weights = adapter_weights(base, config, spec["seed"]) if spec["variant"] != "base" else {}
    model = build_variant(spec["variant"], base, config, weights)
    if spec["variant"] != "base":
        del base  # the variant holds its own copy
    workload = make_workload(spec["workload"], spec, base_vocab(model), spec["device"])
    gc.collect()
    prepared = workload.prepare(model)
    return measure(lambda: run_once(prepared), spec["device"])


def base_vocab(model) -> int:
    return model.config.vocab_size


def in_child(spec: dict, python: str = sys.executable) -> dict:
    """Run ``child_main(spec)`` in a fresh interpreter and return its result (errors as a dict)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **MALLOC_RETURNS_MEMORY)
    done = subprocess.run([python, "-m", "benchmarks.memory", json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"kind": "failed", "peak_mib": None, "held_mib": None, "error": tail}
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(child_main(json.loads(sys.argv[1]))))
