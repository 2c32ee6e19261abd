"""How fast is LoRA? The forward paths of minilora timed against the bare model and PEFT.

``python -m benchmarks`` (``--help``) measures, on GPT-2 small:

- prefill: one forward over a (batch, sequence) grid of tokens, no gradients;
- decode: greedy generation of N tokens at batch 1 with the KV cache;
- a training step: forward + backward + AdamW, with lora_dropout 0 and 0.1;

for the variants base, PEFT unmerged, PEFT merged and each minilora path (reference, merged,
fused, compiled), per target set and rank.

Method (these machines are noisy): every variant is validated against minilora's reference path
before it is timed; then one warm-up call each; then interleaved rounds (round-robin over the
variants, a different starting variant each round) and medians. Every figure is also given as a
ratio to base (to PEFT for training: base has nothing to train) computed per round and reduced
by its median, with the spread (interquartile range) of those ratios as the noise. Peak memory:
CPU RSS in a separate process per variant, CUDA max allocated on GPUs. On GPUs the timer is a
pair of CUDA events.

Modules: plan.py (what to measure), variants.py (building and validating the variants),
workloads.py (prefill, decode, train step), timing.py (interleaved rounds), memory.py (peak
memory in a child process), profile.py (where the time goes), report.py (table, JSON, markdown,
PNG), cli.py (the command).
"""
