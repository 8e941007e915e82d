"""Evaluation with generation: sampling backends, scorers, ``raypo eval`` and the report."""
