#!/usr/bin/env bash
# Run the whole test suite: set up .venv, run the static checks (ruff, mypy), start a moto
# S3 server on 127.0.0.1, run pytest.
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

# Static checks first: any finding fails the run.
echo "ci: ruff check, ruff format --check, mypy --strict"
ruff check storage_scheduler tests benchmarks ci examples
ruff format --check --quiet storage_scheduler tests benchmarks ci examples
mypy --strict storage_scheduler

source "$(dirname "${BASH_SOURCE[0]}")/moto.sh"

python -m pytest -p no:cacheprovider "$@"
