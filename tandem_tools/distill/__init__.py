"""Distillation data for a small draft model: the target's own answers (and top-k log-probs) to generated prompts."""
