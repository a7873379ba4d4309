#!/usr/bin/env bash
# Run the benchmark suite (storage_scheduler against stock Dask) and write the report.
#   ci/bench.sh                 every workload at full size, 3 repetitions (about 15 minutes):
#                               benchmarks/results/*.jsonl, benchmarks/RESULTS.md and plots
#   ci/bench.sh --smoke         every workload at a tiny size, once, into a temporary
#                               directory (or $BENCH_RESULTS): checks results, not timings
# Other arguments go to benchmarks/suite.py, e.g. ci/bench.sh --workloads transfer --repeat 5
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

if [ -z "${STORAGE_SCHEDULER_TEST_S3_ENDPOINT:-}" ]; then
    source ci/moto.sh  # the s3 workload's store
fi

if [[ " $* " == *" --smoke "* ]]; then
    results=${BENCH_RESULTS:-$(mktemp -d -t storage-scheduler-bench-XXXXXX)}
    report="$results/RESULTS.md"
else
    results=${BENCH_RESULTS:-benchmarks/results}
    report=${BENCH_REPORT:-benchmarks/RESULTS.md}
fi
python -m benchmarks.suite --out "$results" "$@"
python -m benchmarks.report --results "$results" --out "$report"
