"""Transparency: what a skill's SAE encodes, read off the SAE that carries it (paper §5): per-token
latents (inspect), latent cards, reasoning features, the per-layer report."""
