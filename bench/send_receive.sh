#!/usr/bin/env bash
# Figures of `kmsfs send` / `kmsfs receive`: a 1 GiB volume (1 GiB of random
# data in one file), its full stream sent to a file, received from the file
# (with no key on the receiving side), sent and received through a pipe; then
# 1% of it changed (160 writes of 64 KiB at random 64 KiB-aligned offsets), a
# second snapshot, and the size of the incremental stream (compact, then
# robust). Times are the commands' own --json "seconds" (the stream work,
# without unlocking the keystore). Performance is reported, never judged.
#
# Usage: bench/send_receive.sh    (as root: mounts, drops the page cache)
# Environment: KMSFS_BIN=path (default target/release/kmsfs),
#              BENCH_DIR=/var/tmp (scratch; needs about 4 GiB)
set -euo pipefail
BIN=${KMSFS_BIN:-$(dirname "$0")/../target/release/kmsfs}
T=$(mktemp -d "${BENCH_DIR:-/var/tmp}/kmsfs-sendbench.XXXXXX")
export KMSFS_KDF_TEST_PARAMS=1 KMSFS_KEYSTORE=$T/keystore KMSFS_PASSPHRASE_FILE=$T/pass
echo "bench passphrase" > "$T/pass"; chmod 600 "$T/pass"
mkdir "$T/mnt"
cleanup() {
    mountpoint -q "$T/mnt" && "$BIN" umount "$T/mnt" || true
    rm -rf "$T"
}
trap cleanup EXIT
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
keyless() { env -u KMSFS_PASSPHRASE_FILE KMSFS_KEYSTORE=/nonexistent "$BIN" "$@"; }

"$BIN" init "$T/vol" >/dev/null
"$BIN" mount "$T/vol" "$T/mnt"
dd if=/dev/urandom of="$T/mnt/data" bs=1M count=1024 status=none
"$BIN" umount "$T/mnt"
"$BIN" snapshot create "$T/vol" s1 >/dev/null
drop
echo "full send to a file:      $("$BIN" send "$T/vol" s1 -o "$T/full.stream" --json 2>&1)"
drop
echo "full receive (keyless):   $(keyless receive "$T/target" -i "$T/full.stream" --json)"
drop
echo "full send | receive:      $("$BIN" send "$T/vol" s1 | keyless receive "$T/target2" --json)"
rm -rf "$T/target2" "$T/full.stream"
"$BIN" mount "$T/vol" "$T/mnt"
python3 - "$T/mnt/data" <<'PY'
import os, random, sys
random.seed(1)
fd = os.open(sys.argv[1], os.O_WRONLY)
for off in random.sample(range(16384), 160):
    os.pwrite(fd, os.urandom(65536), off * 65536)
os.close(fd)
PY
"$BIN" umount "$T/mnt"
"$BIN" snapshot create "$T/vol" s2 >/dev/null
echo "incremental (compact):    $("$BIN" send "$T/vol" s2 --from s1 -o "$T/incr.stream" --json 2>&1)"
echo "incremental receive:      $(keyless receive "$T/target" -i "$T/incr.stream" --json)"
echo "incremental (robust):     $("$BIN" send "$T/vol" s2 --from s1 --robust -o "$T/robust.stream" --json 2>&1)"
"$BIN" fsck "$T/target" | tail -1
