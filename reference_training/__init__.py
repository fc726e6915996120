"""The paper's experiments end to end: data, models, engine, metrics, plots, configs.

Entry points: ``python reference_training/train.py`` and
``python reference_training/compare.py``.
"""
