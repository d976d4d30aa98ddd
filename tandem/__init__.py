"""tandem: edge-cloud speculative decoding. This package is the core, the house's ground floor.

Contract: token ids in, token ids out. No transport (no gRPC, HTTP or web framework is imported here) and, outside
model loading, no tokenizer. The other floors build on it and it imports none of them (tests/test_boundaries.py):

- `verify`: the verification rule, pure functions of (draft tokens, q, p, generator); `sampling`: the one
  transformation applied alike to p and q.
- `kv`: a sequence's KV cache, rollback = a position and one crop; `batch`: many sessions in one forward pass.
- `blocks`: a drafted block and its verdict, and the pipelining rule (`pending_part`); `session`: the target's side
  (`TargetSession`) and the target alone.
- `drafting`: the drafter seam and the draft-model drafter; `value`: where a block ends; `tree`: the siblings and
  phrase-pool chains beside it; `pool`: the phrase pool.
- `messages`: the session protocol in core types and the verifier seam; `local`: the target in this process.
- `speculate`: the one speculative loop (pipelining, adaptive gamma, auto, resume, fallback);
  `adaptive`: the block-length model; `costs`: the target's measured pass time by positions, and the block shape it
  pays for; `stats`: what a generation reports.
- `models`: loading and tokenizer fingerprints; `config`: settings; `errors`: typed errors with codes.
"""

__version__ = "0.1.0"
