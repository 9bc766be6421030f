#!/usr/bin/env bash
# One device call of `benchmarks.stage_variants`: one process per job, all sharing the GPU (under CUDA MPS where
# the machine allows it), each appending to its own record file as its runs end, all stopped at SECONDS; then the
# records go into OUT_DIR/records.json and the logs into OUT_DIR/logs.tar.gz (a device call returns 8 files).
#   bash benchmarks/stage_variants_session.sh OUT_DIR SECONDS SEARCH "VARIANTS" JOB...
# JOB is model:placement:bits:seed, e.g. fmnist_swin_tiny:e2e:W2A8:0. Extra arguments for every process (e.g.
# --no-paper --no-warmup) go in STAGE_VARIANTS_ARGS.
#   bash benchmarks/stage_variants_session.sh $OUT 540 default "s1000 s1000-clipon_overshoot" \
#       fmnist_swin_tiny:e2e:W2A8:0 fmnist_swin_tiny:e2e:W2A8:1
set -u
out=$1; seconds=$2; search=$3; variants=$4; shift 4
source "$(dirname "$0")/device_setup.sh"
jobs_dir=$(mktemp -d)
for job in "$@"; do
  IFS=: read -r model placement bits seed <<<"$job"
  # shellcheck disable=SC2086  # the variants and the extra arguments are word lists
  timeout -s INT "$seconds" python3 -m benchmarks.stage_variants --models "$model" --placements "$placement" \
    --bits "$bits" --seeds "$seed" --search "$search" --variants $variants ${STAGE_VARIANTS_ARGS:-} \
    --out "$jobs_dir/${job//:/_}.json" >"$jobs_dir/${job//:/_}.log" 2>&1 &
done
wait
python3 -c "import glob, json, sys; json.dump([r for f in sorted(glob.glob(sys.argv[2] + '/*.json'))
  for r in json.load(open(f))], open(sys.argv[1], 'w'), indent=1)" "$out/records.json" "$jobs_dir"
tar -czf "$out/logs.tar.gz" -C "$jobs_dir" .
grep -h '"method"' "$jobs_dir"/*.log | cut -c1-300
