#!/usr/bin/env bash
# Sourced by ci/test.sh and ci/bench.sh: start a moto S3 server on 127.0.0.1 and export
# its endpoint as STORAGE_SCHEDULER_TEST_S3_ENDPOINT. The server stops with the sourcing
# script, and by itself after 80 minutes in any case.
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
timeout 4800 moto_server -H 127.0.0.1 -p "$port" > /dev/null 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    if python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/', timeout=1)" 2>/dev/null; then
        break
    fi
    sleep 0.2
done
export STORAGE_SCHEDULER_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
echo "ci: moto S3 server on $STORAGE_SCHEDULER_TEST_S3_ENDPOINT"
