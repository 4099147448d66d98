#!/bin/bash
# usage: bench/write-ab.sh KMSFS_BIN DATA_FILE [MOUNT_OPTS] (root): writes DATA_FILE (e.g. 1 GiB
# from /dev/urandom) into a fresh volume with dd conv=fsync; prints MB/s, the daemon's CPU
# seconds per GiB and its minor page faults. Alternate binaries or options between calls.
set -u
bin=$1; data=$2; opts=${3:-}
. "$(dirname "$0")/ab-volume.sh"
cat "$data" > /dev/null
bytes=$(stat -c %s "$data")
stat_of() { awk -v f="$1" '{print $f}' "/proc/$pid/stat"; }
f0=$(stat_of 10); c0=$(( $(stat_of 14) + $(stat_of 15) )); t0=$(date +%s.%N)
dd if="$data" of="$d/mnt/f" bs=1M conv=fsync status=none
t1=$(date +%s.%N); c1=$(( $(stat_of 14) + $(stat_of 15) )); f1=$(stat_of 10)
echo "$(basename "$bin") ${opts:-default}: write $(echo "$bytes / ($t1 - $t0) / 1000000" | bc) MB/s, daemon CPU $(echo "scale=2; ($c1 - $c0) / $tk / ($bytes / 1073741824)" | bc) s/GiB, minor faults $((f1 - f0))"
