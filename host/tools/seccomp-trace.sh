#!/usr/bin/env bash
# Lists the system calls each kind of shoal thread makes, for the seccomp
# allowlists in host/src/seccomp.rs: runs a workload that touches every
# kind of thread (pool, workers, shards, disks and flushes, LANs, the
# gateway and a forward, the GDB stub, custom hypercalls) under
# `strace -f` with the sandbox off, and prints, per thread name (the
# number at its end dropped), the calls it made. Compare with the lists
# in host/src/seccomp.rs; a call missing there is one the sandbox denies.
#
#   bash host/tools/seccomp-trace.sh            # the CLI workload
#   bash host/tools/seccomp-trace.sh --tests    # and the integration tests
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v strace >/dev/null || { echo "needs strace" >&2; exit 2; }
cargo build --release --quiet
shoal=$PWD/target/release/shoal
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
trace() { strace -f -qq -ff -o "$out/trace" "$@" >/dev/null 2>&1 || true; }
disk=$out/disk.img
truncate -s 8M "$disk"
trace "$shoal" run --no-seccomp -n 300 --console none hello
trace "$shoal" run --no-seccomp -n 150 --console none idle -- 1s
trace "$shoal" run --no-seccomp --disk "$disk" blk
trace "$shoal" run --no-seccomp --disk "$disk,ro" -n 5 blk -- verify
trace "$shoal" run --no-seccomp -n 2 --net lan ping -- 2000 64 8
trace "$shoal" run --no-seccomp -n 2 --net lan ping -- 2000 1514 8
trace "$shoal" run --no-seccomp mmu -- catch
trace "$shoal" run --no-seccomp --trapped-page-tables mmu -- trapped
trace "$shoal" run --no-seccomp demand
(trace "$shoal" run --no-seccomp --net web --forward 18181:0:80 http -- 3s) &
sleep 1.5
curl -s -m 2 http://127.0.0.1:18181/ >/dev/null || true
wait
if [ "${1:-}" = --tests ]; then
    cargo test --release --quiet -p shoal-tests --no-run
    for t in custom debug disks flush net shards services; do
        SHOAL_NO_SECCOMP=1 trace cargo test --release --quiet -p shoal-tests --test "$t"
    done
fi
python3 - "$out" <<'PY'
import collections, os, re, sys
calls = collections.defaultdict(set)
for name in os.listdir(sys.argv[1]):
    if not name.startswith("trace."):
        continue
    thread, seen = None, set()
    for line in open(os.path.join(sys.argv[1], name), errors="replace"):
        m = re.match(r"(\w+)\(", line)
        if not m:
            continue
        seen.add(m.group(1))
        n = re.match(r'prctl\(PR_SET_NAME, "([^"]*)"', line)
        if n:
            thread = n.group(1)
    if thread and thread.startswith("shoal-"):
        calls[re.sub(r"-\d+$", "", thread)] |= seen
for thread in sorted(calls):
    print(f"{thread}: {' '.join(sorted(calls[thread]))}")
PY
