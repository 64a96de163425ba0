"""The arms a transfer is judged by: what each is called, what it is, which pairs are compared, their colours."""

from __future__ import annotations


SOURCE_METHODS = {
    "sft": "source tuned by plain SFT LoRA on the QA rows, a cheap stand-in for the paper's RL-tuned sources",
    "grpo": "source tuned by GRPO, reinforcement learning on verified answers, as the paper's sources are",
}


# label -> (short name for tables and the chart, subject for sentences, what the arm is)
ARMS = {
    "base": ("base", "the base", "base: the target model alone, no adapter"),
    "source": ("source", "the source", "source: the model the skill was extracted from (its base + the source adapter)"),
    "skill": ("Resa", "Resa", "Resa: target + adapter from the source's SAE"),
    "sae_kept": ("Resa + SAE", "Resa with the SAE kept", "Resa with the SAE kept: target + adapter, the skill's SAE still spliced in at inference"),
    "random_sae": ("random SAE", "the random-SAE control", "random-SAE control: adapter tuned against an untrained SAE of the same shape"),
    "sft": ("SFT", "the SFT control", "SFT control: target + LoRA trained with plain SFT on the same QA rows"),
    "self": ("Resa self", "Resa with source = target", "Resa, source = target: adapter from an SAE extracted from the target itself"),
}


# Pairs compared head to head (paired on the same questions when per-question results are present):
# (arm a, arm b, what a - b tells, what a better / worse / no clear difference means).
CONTRASTS = (
    ("skill", "random_sae", "whether the skill's features matter",
     "the skill's features matter: Resa beats an adapter tuned against an untrained SAE of the same shape",
     "the adapter tuned against an untrained SAE does better than Resa: nothing here credits the skill's features",
     "the skill's features make no measurable difference over an untrained SAE of the same shape at this sample size"),
    ("sae_kept", "skill", "whether keeping the SAE at inference matters",
     "keeping the SAE spliced in at inference helps",
     "keeping the SAE spliced in at inference hurts",
     "keeping the SAE at inference makes no measurable difference at this sample size"),
    ("skill", "sft", "Resa against training the target directly",
     "Resa beats plain SFT of the target on the same rows",
     "plain SFT of the target on the same rows beats Resa",
     "Resa and plain SFT on the same rows are indistinguishable at this sample size"),
    ("skill", "self", "the source's skill against the target's own",
     "the skill from the source beats the target's own SAE",
     "the target's own SAE does better than the skill from the source",
     "the source's skill and the target's own SAE are indistinguishable at this sample size"),
)  # fmt: skip


COLORS = {"base": "#888888", "source": "#3a7d44", "skill": "#2f6db5", "sae_kept": "#6a8fd0", "random_sae": "#d08a2f", "sft": "#9b59b6", "self": "#5aa7a7"}


def describe_arm(label: str, describe: dict | None = None) -> tuple[str, str, str]:
    """(short name, sentence subject, description) of an arm label; an unknown label names itself, with what the
    evaluation records of it (model, adapter, ...)."""
    if label in ARMS:
        return ARMS[label]
    known = {k: v for k, v in (describe or {}).items() if k in ("model", "adapter", "skill", "target", "path") and v}
    detail = ", ".join(f"{k} {v}" for k, v in known.items())
    return label, f"arm `{label}`", f"{label}: an arm this report does not describe" + (f" ({detail})" if detail else "")


def arm_order(labels) -> list[str]:
    known = [k for k in ARMS if k in labels]
    return known + [k for k in labels if k not in ARMS]
