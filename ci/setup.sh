#!/usr/bin/env bash
# Create .venv if it is missing and install the package with its test extras.
# Sourced by ci/test.sh, ci/demo.sh and ci/bench.sh. Needs only python3 (>= 3.10) with venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    echo "ci: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
# Reinstall only when the dependencies change.
stamp=.venv/.storage-scheduler-installed
want=$(cat pyproject.toml ci/constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "ci: installing storage-scheduler[test,bench] into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    # Tested versions: without them pip backtracks for a long time between the botocore
    # ranges of aiobotocore (s3fs) and boto3 (moto).
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        -c ci/constraints.txt -e ".[test,bench]"
    echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
