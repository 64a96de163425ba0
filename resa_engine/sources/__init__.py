"""Source models for a skill: a base model + a LoRA trained here, by GRPO on an accuracy reward (grpo.py, as the
paper's sources are made) or by plain SFT (sft.py, a cheaper stand-in)."""
