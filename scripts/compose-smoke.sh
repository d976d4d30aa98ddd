#!/usr/bin/env bash
# Smoke test of the compose deployment on a machine with a Docker engine: build the image, `compose up -d`, wait for
# the healthchecks, send an OpenAI completion to the edge and check its greedy text equals the cloud's own answer,
# `compose down`.
#
# Usage: scripts/compose-smoke.sh [--config-only]
#   --config-only   only validate the compose file(s) this run would use (no engine needed) and print them
#
# Environment (all optional):
#   BASE_IMAGE             build argument: the Python base (default python:3.11-slim; a local stand-in where Docker
#                          Hub is out of reach, see the README's "Deploy")
#   TANDEM_IMAGE           the image tag built and run (default tandem:smoke)
#   TORCH_VARIANT          build argument: cpu (default) or a CUDA wheel tag such as cu126
#   TANDEM_SMOKE_NETWORK   bridge (default: the project's network, services by name) or host (host networking:
#                          for machines where container networking is unavailable; the build uses it too)
#   SMOKE_BUILD_NETWORK    the build's network (default: host with TANDEM_SMOKE_NETWORK=host, else Docker's own)
#   SMOKE_NETEM=1          also start the netem profile and route the edge through it (NETEM_RTT_MS, default 20)
#   SMOKE_BENCH=1          then run the bench profile (a short replay against the cloud service: BENCH_PROMPTS
#                          default 1, BENCH_RTT_MS default 0,20, BENCH_MODES default cloud,spec,auto) and check
#                          its results.json (every mode and RTT measured, greedy outputs identical) and files
#   SMOKE_NO_BUILD=1       use an existing TANDEM_IMAGE
#   SMOKE_KEEP=1           leave the services running (and print how to stop them)
#   SMOKE_TIMEOUT          seconds to wait for health (default 300)
#   CLOUD_HTTP_PORT, CLOUD_GRPC_PORT, EDGE_PORT, NETEM_PORT: host ports (default: free ones)
#
# Exit codes: 0 passed; 2 missing tool or engine; 3 build failed; 4 a service did not become healthy;
#             5 a request failed or the edge's greedy text differed from the cloud's;
#             6 the image has no `tandem edge serve` (the cloud part passed); 7 the compose file is invalid.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[compose-smoke] %s\n' "$*"; }
die() { local code=$1; shift; say "FAIL: $*"; exit "$code"; }

config_only=0
case "${1:-}" in
  --config-only) config_only=1 ;;
  "") ;;
  *) die 2 "unknown argument: $1 (usage: $0 [--config-only])" ;;
esac

# --- tools
if docker compose version >/dev/null 2>&1; then
  compose_bin=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose_bin=(docker-compose)
else
  die 2 "neither \`docker compose\` nor \`docker-compose\` is installed"
fi
command -v python3 >/dev/null || die 2 "python3 is needed on the host for the requests"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

export TANDEM_IMAGE=${TANDEM_IMAGE:-tandem:smoke}
export BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
export CLOUD_HTTP_PORT=${CLOUD_HTTP_PORT:-$(free_port)}
export CLOUD_GRPC_PORT=${CLOUD_GRPC_PORT:-$(free_port)}
export EDGE_PORT=${EDGE_PORT:-$(free_port)}
export NETEM_PORT=${NETEM_PORT:-$(free_port)}
export CLOUD_PUBLISH_ADDR=127.0.0.1 EDGE_PUBLISH_ADDR=127.0.0.1
export TANDEM_THREADS=${TANDEM_THREADS:-1}
network=${TANDEM_SMOKE_NETWORK:-bridge}
timeout=${SMOKE_TIMEOUT:-300}
project=tandem-smoke-$$

files=(-f docker-compose.yml)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# an empty models folder of its own, rather than one created in the checkout
mkdir -p "$tmp/models" && chmod 755 "$tmp" "$tmp/models"
export TANDEM_MODELS_DIR=${TANDEM_MODELS_DIR:-$tmp/models} BENCH_RESULTS_DIR=${BENCH_RESULTS_DIR:-$tmp/results}
case "$network" in
  bridge)
    cloud_addr=cloud; netem_addr=netem ;;
  host)
    # Host networking: services reach each other on loopback; published ports are moot (containers bind host ports).
    cloud_addr=127.0.0.1; netem_addr=127.0.0.1
    export TANDEM_BIND_HOST=127.0.0.1
    cat > "$tmp/host-network.yml" <<'EOF'
services:
  cloud: {network_mode: host}
  edge: {network_mode: host}
  netem: {network_mode: host}
  bench: {network_mode: host}
EOF
    files+=(-f "$tmp/host-network.yml") ;;
  *) die 2 "TANDEM_SMOKE_NETWORK must be bridge or host, not '$network'" ;;
esac
export NETEM_UPSTREAM=$cloud_addr:$CLOUD_GRPC_PORT BENCH_CLOUD=$cloud_addr:$CLOUD_GRPC_PORT
if [ "${SMOKE_NETEM:-0}" = 1 ]; then
  export COMPOSE_PROFILES=netem EDGE_CLOUD=$netem_addr:$NETEM_PORT
else
  export COMPOSE_PROFILES="" EDGE_CLOUD=$cloud_addr:$CLOUD_GRPC_PORT
fi
if [ "${SMOKE_BENCH:-0}" = 1 ]; then  # before `compose config`: the host-network file is resolved from it
  export BENCH_PROMPTS=${BENCH_PROMPTS:-1} BENCH_RTT_MS=${BENCH_RTT_MS:-0,20} BENCH_MODES=${BENCH_MODES:-cloud,spec,auto}
fi
compose() { "${compose_bin[@]}" -p "$project" --project-directory . "${files[@]}" "$@"; }

compose config >"$tmp/config.yml" 2>"$tmp/config.err" || { cat "$tmp/config.err"; die 7 "compose config failed"; }
if [ "$network" = host ]; then
  # docker-compose v1 refuses published ports beside host networking, and an override cannot remove them there:
  # run the resolved configuration without its `ports:` entries.
  python3 - "$tmp/config.yml" "$tmp/host.yml" <<'EOF'
import re, sys
out, skip = [], None
for line in open(sys.argv[1]):
    indent = len(line) - len(line.lstrip(" "))
    if skip is not None:
        if not line.strip() or indent > skip or (indent == skip and line.lstrip().startswith("- ")):
            continue
        skip = None
    if re.match(r"^\s*ports:\s*$", line):
        skip = indent
        continue
    out.append(line)
open(sys.argv[2], "w").writelines(out)
EOF
  files=(-f "$tmp/host.yml")
  compose config >"$tmp/config.yml" 2>"$tmp/config.err" || { cat "$tmp/config.err"; die 7 "compose config failed"; }
fi
if [ "$config_only" = 1 ]; then
  cat "$tmp/config.yml"
  say "compose config valid (${compose_bin[*]}, network $network)"
  exit 0
fi

docker info >/dev/null 2>&1 || die 2 "no Docker engine answers (\`docker info\` failed)"

# --- build
if [ "${SMOKE_NO_BUILD:-0}" != 1 ]; then
  build_net=${SMOKE_BUILD_NETWORK:-}
  [ -z "$build_net" ] && [ "$network" = host ] && build_net=host
  # the classic builder where the BuildKit client plugin (buildx) is missing
  docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
  say "building $TANDEM_IMAGE from BASE_IMAGE=$BASE_IMAGE (TORCH_VARIANT=${TORCH_VARIANT:-cpu})"
  start=$SECONDS
  docker build ${build_net:+--network "$build_net"} --build-arg BASE_IMAGE="$BASE_IMAGE" \
      --build-arg TORCH_VARIANT="${TORCH_VARIANT:-cpu}" -t "$TANDEM_IMAGE" . >"$tmp/build.log" 2>&1 \
    || { tail -30 "$tmp/build.log"; die 3 "docker build failed"; }
  say "built in $((SECONDS - start))s"
fi

say "image $TANDEM_IMAGE: $(docker run --rm --network none "$TANDEM_IMAGE" python -c \
  'import sys, torch, tandem; print("python", sys.version.split()[0], "torch", torch.__version__)')"
has_edge=1
docker run --rm --network none "$TANDEM_IMAGE" tandem edge serve --help >/dev/null 2>&1 || has_edge=0

services=(cloud)
[ "$has_edge" = 1 ] && services+=(edge)
[ "${SMOKE_NETEM:-0}" = 1 ] && services+=(netem)

cleanup() {
  local rc=$?
  if [ "${SMOKE_KEEP:-0}" = 1 ]; then
    say "services left running: ${compose_bin[*]} -p $project down -v"
  else
    compose down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT

say "up (${services[*]}; network $network; project $project)"
compose up -d --no-build "${services[@]}" || { compose logs --tail 50; die 4 "compose up failed"; }

wait_healthy() {
  local svc=$1 id status start=$SECONDS
  id=$(compose ps -q "$svc")
  [ -n "$id" ] || die 4 "$svc has no container"
  while :; do
    status=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
    case "$status" in
      healthy) say "$svc healthy after $((SECONDS - start))s"; return 0 ;;
      unhealthy|exited|dead) compose logs --tail 50 "$svc"; die 4 "$svc is $status" ;;
    esac
    [ $((SECONDS - start)) -lt "$timeout" ] || { compose logs --tail 50 "$svc"; die 4 "$svc not healthy after ${timeout}s"; }
    sleep 2
  done
}
for svc in "${services[@]}"; do wait_healthy "$svc"; done

# --- requests: the cloud alone, then the edge; greedy text must be identical
complete() {  # URL PROMPT -> the completion's text as JSON; the edge's own figures (if any) on stderr
  python3 - "$1" "$2" <<'EOF'
import json, sys, urllib.request
base, prompt = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
    model = json.load(r)["data"][0]["id"]
body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0}).encode()
req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    out = json.load(r)
print(json.dumps(out["choices"][0]["text"]))
stats = out.get("tandem")
if stats:
    keys = ("mode", "lossy", "rounds", "drafted", "accepted", "target_passes", "tokens", "rtt_ms_mean")
    print(json.dumps({k: stats.get(k) for k in keys}), file=sys.stderr)
EOF
}
prompt=$'def fibonacci(n):\n'
cloud_text=$(complete "http://127.0.0.1:$CLOUD_HTTP_PORT" "$prompt") || die 5 "request to the cloud failed"
say "cloud: $cloud_text"
[ "$cloud_text" != '""' ] || die 5 "the cloud returned empty text"

if [ "$has_edge" = 0 ]; then
  say "the image has no \`tandem edge serve\`: edge not started; the cloud part passed"
  exit 6
fi
edge_text=$(complete "http://127.0.0.1:$EDGE_PORT" "$prompt" 2>"$tmp/edge-stats") \
  || { cat "$tmp/edge-stats"; compose logs --tail 30 edge; die 5 "request to the edge failed"; }
say "edge:  $edge_text"
[ -s "$tmp/edge-stats" ] && say "edge figures: $(cat "$tmp/edge-stats")"
[ "$edge_text" = "$cloud_text" ] || die 5 "the edge's greedy text differs from the cloud's"
if [ "${SMOKE_NETEM:-0}" = 1 ] && [ -s "$tmp/edge-stats" ]; then
  # the edge's measured round trips must include the emulated RTT: it really went through the proxy
  python3 -c 'import json, sys; rtt = json.load(open(sys.argv[1])).get("rtt_ms_mean"); \
sys.exit(0 if rtt is None or rtt >= 0.8 * float(sys.argv[2]) else f"edge rtt_ms_mean {rtt} < the emulated {sys.argv[2]} ms")' \
    "$tmp/edge-stats" "${NETEM_RTT_MS:-20}" || die 5 "the edge's round trips do not show netem's delay"
fi
say "PASS: the edge's greedy text equals the cloud's (edge -> ${EDGE_CLOUD})"

if [ "${SMOKE_BENCH:-0}" = 1 ]; then
  mkdir -p "$BENCH_RESULTS_DIR" && chmod 777 "$BENCH_RESULTS_DIR"
  say "bench profile: replay of $BENCH_PROMPTS prompt(s), RTTs $BENCH_RTT_MS ms, modes $BENCH_MODES"
  start=$SECONDS
  compose --profile bench run --rm bench >"$tmp/bench.log" 2>&1 || { tail -30 "$tmp/bench.log"; die 5 "the bench service failed"; }
  python3 - "$BENCH_RESULTS_DIR/results.json" "$BENCH_MODES" "$BENCH_RTT_MS" <<'EOF' || die 5 "the bench results are incomplete or show a mismatch"
import json, sys
res = json.load(open(sys.argv[1]))
modes, rtts = sys.argv[2].split(","), [float(r) for r in sys.argv[3].split(",")]
rows = {(r["mode"], float(r["rtt_ms"])) for r in res["summary"]}
missing = [(m, r) for m in modes for r in rtts if (m, r) not in rows]
if missing:
    sys.exit(f"no summary for {missing}")
if res["greedy_mismatches"]:
    sys.exit(f"greedy mismatches: {res['greedy_mismatches']}")
EOF
  for f in results.json summary.md speedup_vs_rtt.png; do
    [ -s "$BENCH_RESULTS_DIR/$f" ] || die 5 "the bench wrote no $f"
  done
  say "PASS: the bench profile wrote results.json, summary.md and speedup_vs_rtt.png in $((SECONDS - start))s"
  grep '^| ' "$BENCH_RESULTS_DIR/summary.md" | cut -d'|' -f2-5 | sed 's/^/[compose-smoke]   /'
fi
