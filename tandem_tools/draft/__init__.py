"""Train an FR-Spec draft (`tandem.frspec.FRSpecDraft`) for a target model from its own generated answers.

- `data`: the distillation shards (`tandem_tools.distill.generate`) as training sequences, with the target's top-32.
- `build`: choose the K head tokens by frequency and initialise the draft from the target's embedding.
- `train`: the resumable training run (`python -m tandem_tools.draft.train --help`).
- `timing`: decode-step times of candidate draft shapes against the target, to choose the defaults.
"""
