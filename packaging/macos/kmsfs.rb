# Homebrew formula for kmsfs on macOS (Apple silicon and Intel), built from source
# with cargo and linked against macFUSE's libfuse (macFUSE is a cask: install it
# first, `brew install --cask macfuse`, and allow its system extension).
#
# Release: set `url` to the release tarball and `sha256` to its checksum (see
# packaging/macos/README.md, "Publishing the formula"). `brew install --HEAD`
# builds the newest commit of `head` instead.

# macFUSE installs its headers, libfuse and fuse.pc under /usr/local, which a
# formula cannot depend on (casks are not formula dependencies): check for it.
class MacfuseInstalled < Requirement
  fatal true

  satisfy(build_env: false) { File.exist?("/usr/local/lib/pkgconfig/fuse.pc") }

  env do
    ENV.append_path "PKG_CONFIG_PATH", "/usr/local/lib/pkgconfig"
  end

  def message
    <<~EOS
      kmsfs needs macFUSE (its libfuse and fuse.pc in /usr/local):
        brew install --cask macfuse
      then allow its system extension (System Settings > Privacy & Security) and reboot.
    EOS
  end

  def display_s
    "macFUSE"
  end
end

class Kmsfs < Formula
  desc "Encrypted FUSE filesystem for NAS volumes with envelope key management"
  homepage "https://github.com/OWNER/kmsfs"
  url "https://github.com/OWNER/kmsfs/archive/refs/tags/v0.1.0.tar.gz"
  sha256 "0000000000000000000000000000000000000000000000000000000000000000"
  head "https://github.com/OWNER/kmsfs.git", branch: "main"

  depends_on "pkgconf" => :build
  depends_on "rust" => :build
  depends_on :macos
  depends_on MacfuseInstalled

  def install
    # Default features: fuser links macFUSE's libfuse (found by pkg-config).
    # Never `--features macos-no-mount`: that build cannot mount.
    system "cargo", "install", *std_cargo_args
    pkgshare.install "packaging/macos/README.md" => "README-macos.md"
    pkgshare.install "packaging/macos/org.kmsfs.mount.plist"
  end

  def caveats
    <<~EOS
      kmsfs mounts through macFUSE: install and allow it first
        brew install --cask macfuse
      The keystore defaults to ~/.local/share/kmsfs/keystore (or $XDG_DATA_HOME);
      keep its backup and passphrase OFF the disk that holds your volumes.
      Unmount with `kmsfs umount MOUNTPOINT` (or `umount MOUNTPOINT`); there is no
      fusermount3 on macOS. To mount at login, see the launchd example in
        #{opt_pkgshare}/README-macos.md
    EOS
  end

  test do
    assert_match version.to_s, shell_output("#{bin}/kmsfs --version")
    # Everything but the mount itself (no FUSE in the test sandbox).
    (testpath/"keyfile").write("k" * 64)
    chmod 0600, testpath/"keyfile"
    ENV["KMSFS_KEYSTORE"] = (testpath/"keystore").to_s
    ENV["KMSFS_KEYFILE"] = (testpath/"keyfile").to_s
    system bin/"kmsfs", "init", testpath/"vault"
    assert_match "aes-256-gcm-siv", shell_output("#{bin}/kmsfs info #{testpath}/vault")
    system bin/"kmsfs", "fsck", testpath/"vault"
    system bin/"kmsfs", "snapshot", "create", testpath/"vault", "first"
    assert_match "first", shell_output("#{bin}/kmsfs snapshot list #{testpath}/vault")
  end
end
