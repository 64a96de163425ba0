"""The hookpoint and the SAE at it: capture, splice (encode -> edit -> decode), latent edits, loading."""
