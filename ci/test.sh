#!/usr/bin/env bash
# Run the whole test suite: set up .venv, start a moto S3 server on 127.0.0.1, run pytest.
# Extra arguments go to pytest, e.g. ci/test.sh -k store -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

# Headless Chromium renders the dashboard page in tests/test_observability.py.
if ! command -v chromium > /dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then
        echo "ci: installing Debian's chromium for the dashboard test"
        apt-get update -qq > /dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
    else
        echo "ci: chromium is not installed and cannot be installed here (not root)"
    fi
fi

port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The server stops with this script, and by itself after 80 minutes in any case.
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

python -m pytest -p no:cacheprovider "$@"
