"""parity: minilora and PEFT side by side, on the same model and the same weights.

Read in this order: ``twins.py`` (how the two sides are built), ``grid.py`` (the cases and the
pairs), ``checks.py`` (the numerical checks), ``behaviours.py`` (files and PEFT's pitfalls),
``results.py`` / ``report.py`` (the rows and the table), ``suite.py`` and ``cli.py`` (running it);
for other PEFT releases ``envs.py`` (one virtual environment each), ``probes.py`` and ``matrix.py``;
for PEFT's own test suite ``peft_suite.py`` (run it with PEFT and with minilora.compat, compare test by
test), ``peft_plugin.py`` (the pytest plugin that swaps PEFT's entry points) and ``peft_suite_report.py``.
"""
