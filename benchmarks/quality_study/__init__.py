"""The parts of the quality study; ``benchmarks/quality.py`` is its entry point.

- :mod:`.tasks`: the data sets (built-in tasks, a user's JSONL) and the per-task sizes,
- :mod:`.model`: the model, batches and the loss,
- :mod:`.methods`: the initialisations (PEFT default, PiSSA, LoRA-GA, LoRA-DA and variants) and their diagnostics,
- :mod:`.evaluate`: held-out loss and scores,
- :mod:`.train`: the training runs of one method on one task (learning-rate sweep, seeds),
- :mod:`.report`: summaries, Markdown tables and the loss plot.
"""
