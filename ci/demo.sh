#!/usr/bin/env bash
# The main job of storage_scheduler on this machine. Sets up .venv if it is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m ci.demo "$@"
