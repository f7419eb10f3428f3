"""Thin programs composed from ringattn parts, run from the checkout's root.

At the top, the programs users run: ``python -m recipes.train`` (training),
``recipes.eval_needle`` (passkey / needle retrieval over lengths and depths) and
``recipes.capacity`` (the capacity planner: the longest sequence that fits), with their
modules. ``recipes.benchmarks``: attention strategies and layouts, kernels, decode, memory,
the text-data pipeline. ``recipes.examples``: ringattn inside your own Hugging Face
``Trainer`` or accelerate loop. All but the examples take Hydra ``key=value`` overrides.
"""
