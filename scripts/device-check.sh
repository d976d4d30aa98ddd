#!/usr/bin/env bash
# The device check, for a machine with a CUDA GPU and no network, in under 10 minutes: the in-process equality tests
# (CUDA ones included), then `python -m tandem_tools.device_check` (speed figures: random-weight 1B target and 72M
# draft built from tandem/configs, the test pair) into $OUT (default device-check-out): results.json,
# summary.md and the logs. Extra arguments go to device_check (e.g. --quick, --no-compile, --dtypes bfloat16).
#
# Nothing is downloaded. Python packages the core needs that the machine lacks can come as wheels in $TANDEM_WHEELS
# (default .whl), installed from there alone; e.g., on a machine with network, for a Python 3.12 x86-64 target:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection \
#     pydantic-settings python-dotenv
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-device-check-out}"
LIMIT_S="${LIMIT_S:-570}"  # the whole script
PY="${PYTHON:-python3}"
WHEELS="${TANDEM_WHEELS:-.whl}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself: no install needed
mkdir -p "$OUT"

missing() {
  "$PY" -c 'import importlib.util as u, sys
need = ["torch", "transformers", "tokenizers", "safetensors", "pydantic", "pydantic_settings", "rich", "pytest"]
print(" ".join(m for m in need if u.find_spec(m) is None))'
}

gone="$(missing)"
if [[ -n "$gone" && -d "$WHEELS" ]]; then
  echo "device-check: missing Python modules: $gone; installing the wheels in $WHEELS (no index)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/device-check-site "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/device-check-site"
  gone="$(missing)"
fi
if [[ -n "$gone" ]]; then
  echo "device-check: missing Python modules: $gone"
  echo "  no network here: bring them as wheels in $WHEELS (see the top of $0)" >&2
  exit 2
fi
if ! "$PY" -c "import tandem.speculate, tandem_tools.device_check" 2>"$OUT/import-error.log"; then
  echo "device-check: tandem does not import here:" >&2
  cat "$OUT/import-error.log" >&2
  exit 2
fi

"$PY" -c 'import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, " + (torch.cuda.get_device_name(0) if cuda else "no CUDA device"))'

# the in-process tests only: the ones over gRPC / HTTP need the server stack, which this check does not
tests=(tests/test_fastpath.py tests/test_engine.py)
if "$PY" -c "import cloud_server.main, edge_client.client" 2>/dev/null; then
  tests+=(tests/test_pool_e2e.py)
else
  echo "device-check: the server stack does not import here: tests/test_pool_e2e.py left out"
fi
test_rc=0
timeout 240 "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" -k "not wire and not grpc and not http" 2>&1 \
  | tee "$OUT/tests.log" || test_rc=$?
echo "device-check: tests exit status $test_rc"

has_cuda="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')"
if [[ "$has_cuda" != 1 && $# -eq 0 ]]; then
  echo "device-check: no CUDA device: speed figures skipped (pass arguments, e.g. --device cpu --quick, to run them)"
  exit "$test_rc"
fi
left=$((LIMIT_S - SECONDS))
budget=$((left - 90 < 450 ? left - 90 : 450))  # device_check's own sections; the rest covers loading and overruns
if ((budget < 60)); then
  echo "device-check: only $left s left: speed figures skipped" >&2
  exit 1
fi
check_rc=0
timeout $((left - 5)) "$PY" -m tandem_tools.device_check --out "$OUT" --budget-s "$budget" "$@" 2>&1 \
  | tee "$OUT/device-check.log" || check_rc=$?
# capacity with the cloud on the GPU: cloud-only, fixed-gamma and load-aware speculation at 1 and 8 clients, the
# test pair, replay edges (the draft's recorded proposals and pace: the edges cost the GPU machine nothing)
left=$((LIMIT_S - SECONDS))
if ((left > 150)) && "$PY" -c "import cloud_server.main, edge_client.client, matplotlib" 2>/dev/null; then
  TANDEM_DEVICE=cuda timeout $((left - 10)) "$PY" -m tandem_tools.cli bench capacity --clients 1,8 \
    --target test-target --draft test-draft --max-tokens 48 --requests 1 --out "$OUT/capacity" 2>&1 \
    | tee "$OUT/capacity.log" || echo "device-check: the capacity run did not finish (see $OUT/capacity.log)"
else
  echo "device-check: capacity run skipped ($left s left, or the server stack does not import here)"
fi
echo "device-check: done in ${SECONDS} s (tests $test_rc, speed figures $check_rc); see $OUT/summary.md"
exit $((test_rc || check_rc))
