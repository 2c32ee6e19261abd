"""How fast is LoRA? The forward paths of minilora timed against the bare model and PEFT.

``python -m benchmarks`` (``--help``) measures, on GPT-2 small:

- prefill: one forward over a (batch, sequence) grid of tokens, no gradients;
- decode, two ways: a per-token forward loop with the KV cache (what the layers cost), and
  ``model.generate`` (what a user sees, transformers' own per-step work included);
- a training step: forward + backward + AdamW, with lora_dropout 0 and 0.1;

for the variants base, an identical copy of base (the A/A control), PEFT unmerged and merged, and
each minilora path (reference, merged, fused with and without the concatenated weight, compiled).

Method (these machines are shared): every variant is validated against minilora's reference path
before it is timed (which also warms it up). Rounds time every variant once, in alternating order;
each variant's ratio to base (to PEFT for training) is taken within the round, on the process's
CPU time (CUDA events on a GPU) and on wall time, with one torch thread for the ratio tables (an
all-cores table is separate). The figure is the median per-round ratio with its 95% bootstrap
interval, and rounds continue until every interval is within +-1% or a cap is hit. Targets are
judged "met" or "missed" only when the interval says so, else "not resolved". Next to every row:
the analytical floor, the LoRA branch's extra multiply-adds and elements moved as a fraction of the
base model's. Peak memory: CPU RSS in a separate process per variant, CUDA max allocated on GPUs.

Modules: plan.py (what to measure), variants.py (building the variants), workloads.py (prefill,
decode loop, generate, train step), timing.py (clocks and interleaved rounds), stats.py (the
bootstrap interval and the verdicts), floor.py (the analytical floor), memory.py (peak memory in a
child process), profile.py (where the time goes), report.py (table, JSON, markdown, PNG), cli.py
(the command).
"""
