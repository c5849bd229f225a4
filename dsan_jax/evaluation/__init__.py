"""Evaluation: metrics, statistics, the dual-sampling ensemble, attention maps (explanation),
tables, figures, and evaluating a whole work directory (``evaluate.evaluate_workdir``)."""
