"""resa_engine: the ML core of resa (model loading, QA data, SAE skill extraction,
SAE-guided tuning, generation, inspection, evaluation). Importable without any web code."""

__version__ = "0.1.0"
