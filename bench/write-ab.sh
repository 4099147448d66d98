#!/bin/bash
# usage: bench/write-ab.sh KMSFS_BIN DATA_FILE [MOUNT_OPTS] (root): writes DATA_FILE (e.g. 1 GiB
# from /dev/urandom) into a fresh volume with dd conv=fsync; prints MB/s, the daemon's CPU
# seconds per GiB and its minor page faults. Alternate binaries or options between calls.
set -u
bin=$1; data=$2; opts=${3:-}
R=$(mktemp -d /var/tmp/write-ab.XXXXXX)
pid=
cleanup() {
    if [ -n "$pid" ]; then
        mountpoint -q "$R/v/mnt" && { "$bin" umount "$R/v/mnt" >/dev/null 2>&1 || fusermount3 -u "$R/v/mnt"; }
        wait "$pid" 2>/dev/null
    fi
    rm -rf "$R"
}
trap cleanup EXIT
echo "write-ab-$$-$RANDOM" > "$R/pass"; chmod 600 "$R/pass"
d=$R/v; mkdir -p "$d/backing" "$d/mnt" "$d/home"
export KMSFS_KEYSTORE=$d/keystore KMSFS_PASSPHRASE_FILE=$R/pass HOME=$d/home
tk=$(getconf CLK_TCK)
"$bin" init "$d/backing" >/dev/null 2>&1 || { echo "init failed"; exit 1; }
"$bin" mount -f ${opts:+-o "$opts"} "$d/backing" "$d/mnt" >"$d/log" 2>&1 & pid=$!
for _ in $(seq 100); do mountpoint -q "$d/mnt" && break; sleep 0.1; done
mountpoint -q "$d/mnt" || { echo "mount failed"; cat "$d/log"; exit 1; }
cat "$data" > /dev/null
bytes=$(stat -c %s "$data")
stat_of() { awk -v f="$1" '{print $f}' "/proc/$pid/stat"; }
f0=$(stat_of 10); c0=$(( $(stat_of 14) + $(stat_of 15) )); t0=$(date +%s.%N)
dd if="$data" of="$d/mnt/f" bs=1M conv=fsync status=none
t1=$(date +%s.%N); c1=$(( $(stat_of 14) + $(stat_of 15) )); f1=$(stat_of 10)
echo "$(basename "$bin") ${opts:-default}: write $(echo "$bytes / ($t1 - $t0) / 1000000" | bc) MB/s, daemon CPU $(echo "scale=2; ($c1 - $c0) / $tk / ($bytes / 1073741824)" | bc) s/GiB, minor faults $((f1 - f0))"
