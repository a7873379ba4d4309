#!/usr/bin/env bash
# examples/climate_anomaly.py (xarray + zarr, killed halfway, resumed). Sets up .venv if it is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python examples/climate_anomaly.py "$@"
