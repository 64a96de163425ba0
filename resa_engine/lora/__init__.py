"""LoRA adapters: one PEFT folder reader/validator, the gathered multi-LoRA math, the slot bank,
the adapter cache of a served model, and merging a source adapter into its base."""
