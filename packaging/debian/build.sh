#!/usr/bin/env bash
# Builds the Debian package of kmsfs with cargo-deb (installed with `cargo install` when
# missing): the release binary, /sbin/mount.kmsfs, man pages and shell completions made
# from the command-line definitions (examples/gen_docs.rs), the systemd units, and
# examples under /usr/share/doc/kmsfs. Prints the path of the .deb on stdout.
#
#   packaging/debian/build.sh            # target/debian/kmsfs_VERSION-1_ARCH.deb
#
# The binary is built without features (never test-hooks); an up-to-date build is reused.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../../scripts/lib.sh"
cd "$KMSFS_ROOT"
need_cargo
# dpkg-shlibdeps computes the library dependencies ($auto in Cargo.toml).
apt_install dpkg-dev

if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb (cargo install)"
    cargo install --locked --quiet cargo-deb
fi

target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
log "building target/release/kmsfs (release, no features)"
cargo build --release --bin kmsfs
log "generating man pages and completions"
cargo run --release --quiet --example gen_docs -- "$target/release/kmsfs-docs" >&2
gzip -9nf "$target"/release/kmsfs-docs/man/*.[18]
log "cargo deb --no-build"
deb="$(cargo deb --no-build --quiet 2>&1 | tail -n 1)"
[ -f "$deb" ] || die "cargo deb did not make a package: $deb"
log "built $deb"
echo "$deb"
