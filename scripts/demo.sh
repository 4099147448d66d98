#!/usr/bin/env bash
# The main job on the embedded default: a local keystore and a volume in a
# temporary directory. Creates the keystore and the volume, mounts it, writes
# files and reads them back, shows `kmsfs info`, unmounts, remounts read-only to
# show the data persisted, runs fsck. Leaves no mount and no process behind.
# Run ./scripts/setup.sh first (or set KMSFS_BIN).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$KMSFS_ROOT"

KMSFS="${KMSFS_BIN:-$KMSFS_ROOT/target/release/kmsfs}"
if [ ! -x "$KMSFS" ]; then
    need_cargo
    log "building kmsfs (release)"
    cargo build --release --bins
fi
need_fuse

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kmsfs-demo.XXXXXX")"
MNT="$WORK/mnt"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    unmount_wait "$MNT" 60 || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT INT TERM

mkdir -p "$MNT"
# A throwaway passphrase: the keystore and volume die with $WORK.
head -c 32 /dev/urandom | base64 >"$WORK/passphrase"
chmod 600 "$WORK/passphrase"
export KMSFS_KEYSTORE="$WORK/keystore"
export KMSFS_PASSPHRASE_FILE="$WORK/passphrase"
exec </dev/null # never wait on a prompt

run() { printf '$ %s\n' "$*"; "$@"; }

run "$KMSFS" --version
run "$KMSFS" init "$WORK/volume"
run "$KMSFS" mount "$WORK/volume" "$MNT"
mountpoint -q "$MNT" || die "$MNT is not mounted"

echo "hello from kmsfs" >"$MNT/hello.txt"
mkdir -p "$MNT/docs/deep"
head -c $((8 << 20)) /dev/urandom >"$WORK/random.bin"
cp "$WORK/random.bin" "$MNT/docs/deep/random.bin"
sync
run cat "$MNT/hello.txt"
[ "$(cat "$MNT/hello.txt")" = "hello from kmsfs" ] || die "hello.txt read back wrong"
cmp "$WORK/random.bin" "$MNT/docs/deep/random.bin" || die "random.bin read back wrong"
echo "read back: hello.txt and an 8 MiB random file match"
run ls -lR "$MNT"
run df -h "$MNT"
echo "unmounting"
unmount_wait "$MNT" || die "the mount daemon did not exit"

run "$KMSFS" info "$WORK/volume"
echo "backing store (opaque):"
run ls -lR "$WORK/volume"
if grep -rqa "hello from kmsfs" "$WORK/volume"; then
    die "plaintext found in the backing store"
fi
echo "no plaintext in the backing store"

run "$KMSFS" mount "$WORK/volume" "$MNT" --read-only
cmp "$WORK/random.bin" "$MNT/docs/deep/random.bin" || die "random.bin differs after remount"
[ "$(cat "$MNT/hello.txt")" = "hello from kmsfs" ] || die "hello.txt differs after remount"
echo "after unmount and read-only remount: both files intact"
unmount_wait "$MNT" || die "the mount daemon did not exit"

run "$KMSFS" fsck "$WORK/volume"
echo "demo OK"
