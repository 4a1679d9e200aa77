#!/usr/bin/env bash
# Builds every fuzz target (fuzz/fuzz_targets/*.rs) with libFuzzer on the
# stable toolchain and runs each for SECONDS (default 60), one after the
# other, on a scratch copy of its seeds (fuzz/corpus/<target>/), which
# stay as they are. Prints per target the inputs run and whether it
# crashed; a crashing input goes to fuzz/artifacts/<target>/. Exits
# non-zero if a target does not build or crashes.
#
#   bash fuzz/run.sh [SECONDS] [TARGET...]
#
# Environment: FUZZ_JOBS (parallel cargo jobs, default: cargo's),
# FUZZ_KEEP=1 keeps the scratch corpora (their path is printed).
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
shift || true
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for file in fuzz_targets/*.rs; do
        targets+=("$(basename "$file" .rs)")
    done
fi

# Coverage counters, value profiles for comparisons, and the cfg that
# opens the host's fuzzing doors (host/src/fuzzing.rs). The explicit
# --target keeps these flags off build scripts (host/build.rs builds the
# guest kernels with flags of its own).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
triple=x86_64-unknown-linux-gnu
bins=()
for target in "${targets[@]}"; do
    bins+=(--bin "$target")
done
echo "== building ${#targets[@]} fuzz targets"
jobs=()
if [ -n "${FUZZ_JOBS:-}" ]; then
    jobs=(--jobs "$FUZZ_JOBS")
fi
if ! cargo build --release --quiet --target "$triple" --target-dir target "${jobs[@]}" "${bins[@]}"; then
    echo "fuzz targets: BUILD FAILED"
    exit 1
fi

scratch="$(mktemp -d)"
if [ -z "${FUZZ_KEEP:-}" ]; then
    trap 'rm -rf "$scratch"' EXIT
else
    echo "scratch corpora in $scratch"
fi

failed=0
printf '%-16s %12s %8s  %s\n' target executions seconds result
for target in "${targets[@]}"; do
    corpus="$scratch/$target"
    mkdir -p "$corpus" "artifacts/$target"
    if [ -d "corpus/$target" ]; then
        cp -r "corpus/$target/." "$corpus/"
    fi
    log="$scratch/$target.log"
    status=0
    "target/$triple/release/$target" "$corpus" \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="artifacts/$target/" \
        >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    time="$(sed -n 's/^stat::.*//;s/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\2/p' "$log" | tail -n 1)"
    if [ "$status" -eq 0 ]; then
        result=ok
    else
        result="CRASHED (exit $status), see fuzz/artifacts/$target/"
        failed=1
        grep -E '^(==[0-9]+== ERROR|thread .* panicked|SUMMARY|artifact_prefix|Test unit written)' "$log" | head -n 20 || true
        tail -n 30 "$log" | grep -v '^stat::' || true
    fi
    printf '%-16s %12s %8s  %s\n' "$target" "${runs:-?}" "${time:-$seconds}" "$result"
done
exit "$failed"
