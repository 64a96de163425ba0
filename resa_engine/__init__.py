"""resa_engine: the ML core of resa (model loading, QA data, source models, SAE skill extraction,
SAE-guided tuning, the generation engines, inspection, evaluation and the transfer report).
Importable without any web code."""

__version__ = "0.1.0"
