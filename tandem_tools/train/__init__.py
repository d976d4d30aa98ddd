"""The test pair's corpus: the CPython standard library's sources, split by file (`data`), and prompts cut from it."""
