#!/bin/sh
# Renders tandem.conf.template (beside this script) to standard output, from the environment:
#
#   TANDEM_LB_HTTP_REPLICAS   the replicas' HTTP addresses, host:port, comma-separated (required)
#   TANDEM_LB_GRPC_REPLICAS   the same replicas' gRPC addresses, in the same order (required)
#   TANDEM_LB_LISTEN_HOST     where nginx listens (default 0.0.0.0)
#   TANDEM_LB_HTTP_PORT       its HTTP port (default 8080)
#   TANDEM_LB_GRPC_PORT       its gRPC (h2c) port (default 50050)
#   TANDEM_LB_MAX_BODY        HTTP body limit, no lower than the replicas' TANDEM_MAX_BODY_BYTES (default 4m)
#   TANDEM_LB_FAIL_TIMEOUT    how long a failed replica is left out (default 10s)
#   TANDEM_LB_CONNECT_TIMEOUT how long a connection to a replica may take before the next is tried (default 2s)
#   TANDEM_LB_ACCESS_LOG      access log path (default /dev/stdout)
#
#   TANDEM_LB_HTTP_REPLICAS=cloud:8000,cloud-2:8002 TANDEM_LB_GRPC_REPLICAS=cloud:50051,cloud-2:50053 \
#     sh render.sh > /etc/nginx/conf.d/tandem.conf
set -eu
here=$(cd "$(dirname "$0")" && pwd)
: "${TANDEM_LB_HTTP_REPLICAS:?the replicas HTTP addresses (host:port,host:port)}"
: "${TANDEM_LB_GRPC_REPLICAS:?the replicas gRPC addresses (host:port,host:port)}"
export TANDEM_LB_LISTEN_HOST="${TANDEM_LB_LISTEN_HOST:-0.0.0.0}" TANDEM_LB_HTTP_PORT="${TANDEM_LB_HTTP_PORT:-8080}" \
  TANDEM_LB_GRPC_PORT="${TANDEM_LB_GRPC_PORT:-50050}" TANDEM_LB_MAX_BODY="${TANDEM_LB_MAX_BODY:-4m}" \
  TANDEM_LB_FAIL_TIMEOUT="${TANDEM_LB_FAIL_TIMEOUT:-10s}" TANDEM_LB_CONNECT_TIMEOUT="${TANDEM_LB_CONNECT_TIMEOUT:-2s}" \
  TANDEM_LB_ACCESS_LOG="${TANDEM_LB_ACCESS_LOG:-/dev/stdout}"
export TANDEM_LB_HTTP_REPLICAS TANDEM_LB_GRPC_REPLICAS

awk '
function servers(list,    n, i, a, out) {
  n = split(list, a, ",")
  out = ""
  for (i = 1; i <= n; i++) {
    gsub(/[ \t]/, "", a[i])
    if (a[i] == "") continue
    if (a[i] !~ /^[A-Za-z0-9_.:\[\]-]+:[0-9]+$/) { print "render.sh: not a host:port: " a[i] > "/dev/stderr"; exit 2 }
    out = out "    server " a[i] " max_fails=1 fail_timeout=" ENVIRON["TANDEM_LB_FAIL_TIMEOUT"] ";\n"
  }
  if (out == "") { print "render.sh: no replica addresses" > "/dev/stderr"; exit 2 }
  return substr(out, 1, length(out) - 1)
}
BEGIN {
  http = servers(ENVIRON["TANDEM_LB_HTTP_REPLICAS"]); grpc = servers(ENVIRON["TANDEM_LB_GRPC_REPLICAS"])
  split("LISTEN_HOST HTTP_PORT GRPC_PORT MAX_BODY FAIL_TIMEOUT CONNECT_TIMEOUT ACCESS_LOG", names, " ")
}
$0 == "@HTTP_SERVERS@" { print http; next }
$0 == "@GRPC_SERVERS@" { print grpc; next }
{
  for (i in names) gsub("@" names[i] "@", ENVIRON["TANDEM_LB_" names[i]])
  print
}
' "$here/tandem.conf.template"
