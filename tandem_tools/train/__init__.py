"""Reproduce the demo model pair (tokenizer, target, distilled draft) from the CPython standard library."""
