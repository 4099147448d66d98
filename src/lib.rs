//! kmsfs: an encrypted FUSE filesystem for NAS-style volumes.
//!
//! Layers (each a module; a newcomer finds the home of any behaviour here):
//! - `crypto`: the only module that touches cipher crates (AEAD, HKDF, HMAC, secrets).
//! - `kms`: keys and their lifecycle; the embedded keystore behind the `Kms` trait.
//! - `format`: encode/decode of every on-disk structure, no I/O (see docs/FORMAT.md).
//! - `store`: the storage backend trait, the real directory backend, crash injection.
//! - `cache`: the bounded, sharded cache of decrypted blocks.
//! - `volume`: the filesystem core (inodes, directories, files); knows nothing of FUSE.
//! - `fuse`: translation between the kernel and `volume`.
//! - `cli`: the command line.

pub mod cache;
pub mod cli;
pub mod control;
pub mod crypto;
pub mod error;
pub mod format;
pub mod fuse;
pub mod kms;
pub mod store;
pub mod sys;
pub mod time;
pub mod volume;
