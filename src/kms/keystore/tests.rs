use super::*;
use crate::kms::cmk::{CmkVersion, WRAPPED_LEN, wrap_aad};
use crate::kms::{KeyOrigin, KeyState};
use std::time::Instant;

impl LocalKeystore {
    fn state(&self) -> Result<State, KmsError> {
        Ok(self.load_existing()?.state)
    }
}

fn write_private(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, Permissions::from_mode(0o600)).unwrap();
}

fn user_key(
    ks: &LocalKeystore,
    alias: Option<&str>,
    description: &str,
) -> Result<KeyInfo, KmsError> {
    ks.create_key(&CreateKey {
        alias: alias.map(str::to_owned),
        description: description.to_owned(),
        external: false,
    })
}

fn pass(s: &str) -> Unlock {
    Unlock::Passphrase(Passphrase::new(s.to_owned()))
}

fn open(path: &Path, s: &str) -> Result<LocalKeystore, KmsError> {
    LocalKeystore::open_or_create_with_params(path, pass(s), KdfParams::for_tests())
}

fn vol(n: u8) -> [u8; 16] {
    [n; 16]
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn create_reopen_unwraps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/keystore.kms");
    let ks = open(&path, "pw").unwrap();
    let sid = ks.service_key_id();
    assert!(sid.starts_with("cmk-") && sid.len() == 20, "{sid}");
    assert_eq!(ks.path(), path);
    let ctx = EncryptionContext::for_volume(&vol(1));
    let (dk, wrapped) = ks.generate_data_key(None, &ctx).unwrap();
    assert_eq!(wrapped.cmk_id, sid);
    assert_eq!(wrapped.cmk_version, 1);
    assert_eq!(wrapped.ciphertext.len(), WRAPPED_LEN);
    assert_eq!(ks.decrypt(&wrapped, &ctx).unwrap().expose(), dk.expose());
    drop(ks);

    let ks = open(&path, "pw").unwrap();
    assert_eq!(ks.service_key_id(), sid);
    assert_eq!(ks.decrypt(&wrapped, &ctx).unwrap().expose(), dk.expose());
    // By alias too.
    let (_, w2) = ks.generate_data_key(Some("service"), &ctx).unwrap();
    assert_eq!(w2.cmk_id, sid);
    let (_, w3) = ks.generate_data_key(Some(&sid), &ctx).unwrap();
    assert_eq!(w3.cmk_id, sid);
    // Two DKs differ.
    let (dk2, _) = ks.generate_data_key(None, &ctx).unwrap();
    assert_ne!(dk2.expose(), dk.expose());
    let keys = ks.list_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].kind, KeyKind::Service);
    assert_eq!(keys[0].alias.as_deref(), Some("service"));
    assert_eq!(
        keys[0]
            .versions
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![1]
    );
}

#[test]
fn header_layout_matches_docs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    let ks = open(&path, "pw").unwrap();
    let bytes = fs::read(&path).unwrap();
    assert_eq!(&bytes[0..8], b"KMSFSKS\0");
    assert_eq!(bytes[8..10], 2u16.to_le_bytes());
    assert_eq!(bytes[10], UNLOCK_PASSPHRASE);
    assert_eq!(bytes[11..15], 1024u32.to_le_bytes());
    assert_eq!(bytes[15..19], 1u32.to_le_bytes());
    assert_eq!(bytes[19..23], 1u32.to_le_bytes());
    assert_eq!(HEADER_LEN, 103);
    assert_eq!(bytes[71..103], header_checksum(&bytes[..71]));
    let payload_len = ks.state().unwrap().encode().len();
    assert_eq!(bytes.len(), 103 + 12 + payload_len + 16);
    // One service key with alias "service", description of 41 bytes, no marks,
    // no volumes, the audit key and anchor.
    assert_eq!(
        payload_len,
        4 + (1 + 20 + 1 + 7 + 2 + 41 + 8 + 3 + 8 + 8 + 1 + 1 + 4 + 45) + 4 + 4 + 32 + 8 + 32
    );
}

#[test]
fn wrong_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    let ks = open(&path, "right").unwrap();
    // With a backup present too.
    ks.record_generation(&vol(1), 1).unwrap();
    drop(ks);
    match open(&path, "wrong") {
        Err(KmsError::WrongPassphrase { path: p }) => assert_eq!(p, path.display().to_string()),
        other => panic!("expected WrongPassphrase, got {other:?}"),
    }
    assert!(open(&path, "right").is_ok());
}

#[test]
fn keyfile_unlock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    let kf = dir.path().join("keyfile");
    write_private(&kf, &crypto::random_array::<64>());
    let ks = LocalKeystore::open_or_create(&path, Unlock::Keyfile(kf.clone())).unwrap();
    let ctx = EncryptionContext::for_volume(&vol(3));
    let (dk, w) = ks.generate_data_key(None, &ctx).unwrap();
    drop(ks);
    let bytes = fs::read(&path).unwrap();
    assert_eq!(bytes[10], UNLOCK_KEYFILE);
    assert_eq!(bytes[11..23], [0u8; 12]);
    let ks = LocalKeystore::open_or_create(&path, Unlock::Keyfile(kf.clone())).unwrap();
    assert_eq!(ks.decrypt(&w, &ctx).unwrap().expose(), dk.expose());

    // Another keyfile is a wrong "passphrase".
    let kf2 = dir.path().join("keyfile2");
    write_private(&kf2, &crypto::random_array::<32>());
    assert!(matches!(
        LocalKeystore::open_or_create(&path, Unlock::Keyfile(kf2)),
        Err(KmsError::WrongPassphrase { .. })
    ));
    // A passphrase cannot open a keyfile keystore.
    assert!(matches!(
        open(&path, "pw"),
        Err(KmsError::UnlockMismatch {
            expected: "keyfile",
            given: "passphrase",
            ..
        })
    ));
    // Short and missing keyfiles are refused.
    let short = dir.path().join("short");
    write_private(&short, &[1u8; 31]);
    assert!(matches!(
        LocalKeystore::open_or_create(&dir.path().join("ks2"), Unlock::Keyfile(short)),
        Err(KmsError::Keyfile { .. })
    ));
    assert!(matches!(
        LocalKeystore::open_or_create(&path, Unlock::Keyfile(dir.path().join("nope"))),
        Err(KmsError::Keyfile { .. })
    ));
}

#[test]
fn passphrase_keystore_refuses_keyfile() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    open(&path, "pw").unwrap();
    let kf = dir.path().join("keyfile");
    write_private(&kf, &[7u8; 32]);
    assert!(matches!(
        LocalKeystore::open_or_create(&path, Unlock::Keyfile(kf)),
        Err(KmsError::UnlockMismatch {
            expected: "passphrase",
            ..
        })
    ));
}

#[test]
fn wrong_context_fails() {
    let dir = tempfile::tempdir().unwrap();
    let ks = open(&dir.path().join("ks"), "pw").unwrap();
    let ctx = EncryptionContext::for_volume(&vol(1));
    let (_, w) = ks.generate_data_key(None, &ctx).unwrap();
    let other = EncryptionContext::for_volume(&vol(2));
    assert!(matches!(
        ks.decrypt(&w, &other),
        Err(KmsError::UnwrapFailed)
    ));
    assert!(matches!(
        ks.decrypt(&w, &ctx.clone().with("extra", "x")),
        Err(KmsError::UnwrapFailed)
    ));
    assert!(matches!(
        ks.re_encrypt(&w, &other, None),
        Err(KmsError::UnwrapFailed)
    ));
    let mut bad = w.clone();
    bad.ciphertext[20] ^= 1;
    assert!(matches!(
        ks.decrypt(&bad, &ctx),
        Err(KmsError::UnwrapFailed)
    ));
    let mut bad = w.clone();
    bad.ciphertext.pop();
    assert!(matches!(
        ks.decrypt(&bad, &ctx),
        Err(KmsError::UnwrapFailed)
    ));
    let mut bad = w.clone();
    bad.cmk_version = 2;
    assert!(matches!(
        ks.decrypt(&bad, &ctx),
        Err(KmsError::KeyVersionNotFound { version: 2, .. })
    ));
    let mut bad = w.clone();
    bad.cmk_id = "cmk-0000000000000000".into();
    assert!(matches!(
        ks.decrypt(&bad, &ctx),
        Err(KmsError::KeyNotFound(_))
    ));
    assert!(matches!(
        ks.generate_data_key(Some("nope"), &ctx),
        Err(KmsError::KeyNotFound(_))
    ));
    // A wrap from another keystore (same ids impossible, but same context) fails.
    let ks2 = open(&dir.path().join("ks2"), "pw").unwrap();
    let mut foreign = ks2.generate_data_key(None, &ctx).unwrap().1;
    foreign.cmk_id = ks.service_key_id();
    assert!(matches!(
        ks.decrypt(&foreign, &ctx),
        Err(KmsError::UnwrapFailed)
    ));
}

#[test]
fn tampered_keystore_falls_back_to_backup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    let ks = open(&path, "pw").unwrap();
    let ctx = EncryptionContext::for_volume(&vol(1));
    let (dk, w) = ks.generate_data_key(None, &ctx).unwrap();
    drop(ks);
    let original = fs::read(&path).unwrap();
    fs::remove_file(with_suffix(&path, ".bak")).unwrap();

    // No backup: every single-byte change is refused.
    for pos in [0, 9, 10, 12, 30, 50, HEADER_LEN + 3, original.len() - 1] {
        let mut bad = original.clone();
        bad[pos] ^= 0x04;
        fs::write(&path, &bad).unwrap();
        let err = open(&path, "pw").unwrap_err();
        assert!(
            matches!(
                err,
                KmsError::Corrupt { .. }
                    | KmsError::WrongPassphrase { .. }
                    | KmsError::UnsupportedVersion { .. }
            ),
            "byte {pos}: {err:?}"
        );
        // Payload damage is reported as corruption, not as a wrong passphrase.
        if pos >= HEADER_LEN {
            assert!(matches!(err, KmsError::Corrupt { .. }), "{err:?}");
        }
    }
    fs::write(&path, &original[..original.len() - 5]).unwrap();
    assert!(matches!(open(&path, "pw"), Err(KmsError::Corrupt { .. })));
    fs::write(&path, &original).unwrap();

    // An update keeps the previous version as the backup.
    let ks = open(&path, "pw").unwrap();
    ks.record_generation(&vol(9), 5).unwrap();
    drop(ks);
    assert_eq!(fs::read(with_suffix(&path, ".bak")).unwrap(), original);

    // Damaged payload, header, or truncation: opens from the backup.
    let current = fs::read(&path).unwrap();
    let mut cases = Vec::new();
    let mut bad = current.clone();
    bad[HEADER_LEN + 10] ^= 0x80;
    cases.push(bad);
    let mut bad = current.clone();
    bad[30] ^= 0x01; // salt
    cases.push(bad);
    cases.push(current[..current.len() / 2].to_vec());
    cases.push(Vec::new());
    for bad in cases {
        fs::write(&path, &bad).unwrap();
        let ks = open(&path, "pw").unwrap();
        assert_eq!(ks.decrypt(&w, &ctx).unwrap().expose(), dk.expose());
        // The backup predates the mark.
        assert_eq!(ks.generation_mark(&vol(9)).unwrap(), None);
        // The wrong passphrase is still refused as such.
        assert!(matches!(
            open(&path, "nope"),
            Err(KmsError::WrongPassphrase { .. })
        ));
    }
    // Main file missing: the backup is used as well.
    fs::remove_file(&path).unwrap();
    let ks = open(&path, "pw").unwrap();
    assert_eq!(ks.decrypt(&w, &ctx).unwrap().expose(), dk.expose());

    // The next update rewrites the main file from the backup, and keeps the backup.
    ks.record_generation(&vol(9), 6).unwrap();
    assert_eq!(fs::read(with_suffix(&path, ".bak")).unwrap(), original);
    drop(ks);
    let ks = open(&path, "pw").unwrap();
    assert_eq!(ks.generation_mark(&vol(9)).unwrap(), Some(6));
    drop(ks);

    // Both damaged: corruption is reported.
    fs::write(&path, b"garbage").unwrap();
    fs::write(with_suffix(&path, ".bak"), b"garbage").unwrap();
    assert!(matches!(open(&path, "pw"), Err(KmsError::Corrupt { .. })));
}

#[test]
fn kdf_params_out_of_bounds_refused_before_argon2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    drop(open(&path, "pw").unwrap());
    let original = fs::read(&path).unwrap();
    let cases: [(usize, u32); 5] = [
        (11, 4 << 20),   // m = 4 GiB
        (11, u32::MAX),  // m = 4 TiB
        (11, 16),        // m too small
        (15, 1_000_000), // t
        (19, 1000),      // p
    ];
    for (offset, value) in cases {
        let mut bad = original.clone();
        bad[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        // Whoever edits the file can recompute the keyless checksum too.
        let sum = header_checksum(&bad[..HEADER_LEN_V1]);
        bad[HEADER_LEN_V1..HEADER_LEN].copy_from_slice(&sum);
        fs::write(&path, &bad).unwrap();
        let start = Instant::now();
        match open(&path, "pw") {
            Err(KmsError::Corrupt { detail, .. }) => {
                assert!(detail.contains("out of bounds"), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(start.elapsed().as_secs() < 5, "Argon2 must not run");
    }
    // Creating with out-of-bounds parameters is refused too.
    let huge = KdfParams {
        m_cost_kib: 4 << 20,
        t_cost: 3,
        p_cost: 1,
    };
    assert!(matches!(
        LocalKeystore::open_or_create_with_params(&dir.path().join("new"), pass("pw"), huge),
        Err(KmsError::InvalidParams(_))
    ));
    assert!(matches!(
        LocalKeystore::open_or_create_with_params(
            &dir.path().join("empty"),
            pass(""),
            KdfParams::for_tests()
        ),
        Err(KmsError::InvalidParams(_))
    ));
}

#[test]
fn unknown_version_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    drop(open(&path, "pw").unwrap());
    let mut bytes = fs::read(&path).unwrap();
    bytes[8..10].copy_from_slice(&3u16.to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    let _ = fs::remove_file(with_suffix(&path, ".bak"));
    match open(&path, "pw") {
        Err(
            e @ KmsError::UnsupportedVersion {
                found: 3,
                supported: 2,
                ..
            },
        ) => assert!(e.to_string().contains("upgrade kmsfs")),
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}

#[test]
fn file_modes() {
    let dir = tempfile::tempdir().unwrap();
    let kdir = dir.path().join("keys");
    let path = kdir.join("ks");
    let ks = open(&path, "pw").unwrap();
    ks.record_generation(&vol(1), 1).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&with_suffix(&path, ".bak")), 0o600);
    assert_eq!(mode(&with_suffix(&path, ".lock")), 0o600);
    assert_eq!(mode(&kdir), 0o700);
    assert!(!with_suffix(&path, ".tmp").exists());
    assert!(!with_suffix(&path, ".bak.tmp").exists());
}

#[test]
fn no_plaintext_keys_in_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    let ks = open(&path, "pw").unwrap();
    user_key(&ks, Some("user-key"), "a user key").unwrap();
    let ctx = EncryptionContext::for_volume(&vol(1));
    let (dk, _) = ks.generate_data_key(None, &ctx).unwrap();
    let (dk2, _) = ks.generate_data_key(Some("user-key"), &ctx).unwrap();
    ks.record_generation(&vol(1), 1).unwrap();
    let state = ks.state().unwrap();
    let mut secrets: Vec<Vec<u8>> = vec![dk.expose().to_vec(), dk2.expose().to_vec()];
    for c in &state.cmks {
        for v in &c.versions {
            secrets.push(v.material.as_ref().unwrap().expose().to_vec());
            // Even a 16-byte window of the key must not appear.
            secrets.push(v.material.as_ref().unwrap().expose()[8..24].to_vec());
        }
    }
    assert_eq!(secrets.len(), 2 + 2 * 2);
    for file in [path.clone(), with_suffix(&path, ".bak")] {
        let bytes = fs::read(&file).unwrap();
        for s in &secrets {
            assert!(!find(&bytes, s), "secret bytes found in {}", file.display());
        }
        assert!(!find(&bytes, b"user-key"), "metadata is sealed too");
    }
}

#[test]
fn generation_marks_persist() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    let ks = open(&path, "pw").unwrap();
    assert_eq!(ks.generation_mark(&vol(1)).unwrap(), None);
    ks.record_generation(&vol(1), 0).unwrap();
    assert_eq!(ks.generation_mark(&vol(1)).unwrap(), Some(0));
    ks.record_generation(&vol(1), 7).unwrap();
    ks.record_generation(&vol(2), 3).unwrap();
    // The mark never goes down.
    ks.record_generation(&vol(1), 5).unwrap();
    assert_eq!(ks.generation_mark(&vol(1)).unwrap(), Some(7));
    drop(ks);
    let ks = open(&path, "pw").unwrap();
    assert_eq!(ks.generation_mark(&vol(1)).unwrap(), Some(7));
    assert_eq!(ks.generation_mark(&vol(2)).unwrap(), Some(3));
    assert_eq!(ks.generation_mark(&vol(3)).unwrap(), None);
    ks.record_generation(&vol(1), u64::MAX).unwrap();
    assert_eq!(ks.generation_mark(&vol(1)).unwrap(), Some(u64::MAX));
}

#[test]
fn re_encrypt_same_and_other_key() {
    let dir = tempfile::tempdir().unwrap();
    let ks = open(&dir.path().join("ks"), "pw").unwrap();
    let ctx = EncryptionContext::for_volume(&vol(4));
    let (dk, w) = ks.generate_data_key(None, &ctx).unwrap();
    let w2 = ks.re_encrypt(&w, &ctx, None).unwrap();
    assert_eq!(w2.cmk_id, w.cmk_id);
    assert_ne!(w2.ciphertext, w.ciphertext);
    assert_eq!(ks.decrypt(&w2, &ctx).unwrap().expose(), dk.expose());

    let user = user_key(&ks, Some("archive"), "for archives").unwrap();
    assert_eq!(user.kind, KeyKind::User);
    assert_eq!(user.origin, KeyOrigin::Generated);
    assert_eq!(user.state, KeyState::Enabled);
    let w3 = ks.re_encrypt(&w, &ctx, Some("archive")).unwrap();
    assert_eq!(w3.cmk_id, user.id);
    assert_eq!(ks.decrypt(&w3, &ctx).unwrap().expose(), dk.expose());
    let w4 = ks
        .re_encrypt(&w3, &ctx, Some(&ks.service_key_id()))
        .unwrap();
    assert_eq!(ks.decrypt(&w4, &ctx).unwrap().expose(), dk.expose());
    assert!(matches!(
        user_key(&ks, Some("archive"), ""),
        Err(KmsError::AliasInUse(_))
    ));
    assert!(matches!(
        user_key(&ks, Some("cmk-x"), ""),
        Err(KmsError::InvalidKeyName(_))
    ));
    assert!(matches!(
        user_key(&ks, Some("has space"), ""),
        Err(KmsError::InvalidKeyName(_))
    ));
    let anon = user_key(&ks, None, "no alias").unwrap();
    assert_eq!(anon.alias, None);
    assert_eq!(ks.list_keys().unwrap().len(), 3);
}

/// Sets a key's state directly in the file.
fn set_state(ks: &LocalKeystore, id: &str, state: KeyState, date: u64) {
    ks.run(None, true, |s, _| {
        let c = s.cmks.iter_mut().find(|c| c.id == id).unwrap();
        c.state = state;
        c.deletion_date = date;
        Ok(((), true))
    })
    .unwrap();
}

#[test]
fn disabled_key_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    let ks = open(&path, "pw").unwrap();
    let id = user_key(&ks, Some("k"), "").unwrap().id;
    let ctx = EncryptionContext::for_volume(&vol(1));
    let (_, w) = ks.generate_data_key(Some("k"), &ctx).unwrap();
    set_state(&ks, &id, KeyState::Disabled, 0);
    // Another instance (another process) sees the change.
    let other = open(&path, "pw").unwrap();
    for k in [&ks, &other] {
        match k.decrypt(&w, &ctx) {
            Err(e @ KmsError::KeyDisabled(_)) => {
                assert!(e.to_string().contains(&format!("kmsfs key enable {id}")));
            }
            r => panic!("expected KeyDisabled, got {r:?}"),
        }
        assert!(matches!(
            k.generate_data_key(Some("k"), &ctx),
            Err(KmsError::KeyDisabled(_))
        ));
        assert!(matches!(
            k.re_encrypt(&w, &ctx, None),
            Err(KmsError::KeyDisabled(_))
        ));
    }
    set_state(&ks, &id, KeyState::PendingDeletion, 4_000_000_000);
    assert!(matches!(
        ks.decrypt(&w, &ctx),
        Err(KmsError::KeyPendingDeletion {
            deletion_date: 4_000_000_000,
            ..
        })
    ));
    set_state(&ks, &id, KeyState::Enabled, 0);
    assert!(ks.decrypt(&w, &ctx).is_ok());
}

#[test]
fn rotation_old_versions_still_unwrap() {
    let dir = tempfile::tempdir().unwrap();
    let ks = open(&dir.path().join("ks"), "pw").unwrap();
    let ctx = EncryptionContext::for_volume(&vol(1));
    let (dk, w1) = ks.generate_data_key(None, &ctx).unwrap();
    let sid = ks.service_key_id();
    let k = ks.change_key(&sid, KeyChange::Rotate).unwrap();
    assert_eq!(k.primary_version, Some(2));
    let (_, w2) = ks.generate_data_key(None, &ctx).unwrap();
    assert_eq!(w2.cmk_version, 2);
    assert_eq!(ks.decrypt(&w1, &ctx).unwrap().expose(), dk.expose());
    let rw = ks.re_encrypt(&w1, &ctx, None).unwrap();
    assert_eq!(rw.cmk_version, 2);
    assert_eq!(ks.decrypt(&rw, &ctx).unwrap().expose(), dk.expose());
    // A wrap claiming the other version fails.
    let mut wrong = w1.clone();
    wrong.cmk_version = 2;
    assert!(matches!(
        ks.decrypt(&wrong, &ctx),
        Err(KmsError::UnwrapFailed)
    ));
}

#[test]
fn concurrent_updates_are_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    drop(open(&path, "pw").unwrap());
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let path = &path;
            s.spawn(move || {
                // Separate instances, as separate processes would have.
                let ks = open(path, "pw").unwrap();
                for g in 1..=5u64 {
                    ks.record_generation(&vol(t), g).unwrap();
                }
            });
        }
    });
    let ks = open(&path, "pw").unwrap();
    for t in 0..4u8 {
        assert_eq!(ks.generation_mark(&vol(t)).unwrap(), Some(5));
    }
}

#[test]
fn payload_roundtrip_and_strict_decoding() {
    let mut state = State::new();
    let mut c = Cmk::generate(
        "cmk-0011223344556677".into(),
        Some("service".into()),
        "déscription".into(),
        KeyKind::Service,
        7,
    );
    c.versions.push(CmkVersion {
        version: 3,
        created: 42,
        material: Some(SecretKey::random()),
    });
    state.cmks.push(c);
    state.marks.insert(vol(1), 10);
    state.marks.insert(vol(2), 20);
    let bytes = state.encode();
    let back = State::decode(&bytes, 2).unwrap();
    assert_eq!(back.encode()[..], bytes[..]);
    assert_eq!(back.cmks[0].versions.len(), 2);
    assert_eq!(back.marks.get(&vol(2)), Some(&20));
    // Trailing bytes and every truncation are refused.
    let mut longer = bytes.to_vec();
    longer.push(0);
    assert!(State::decode(&longer, 2).is_err());
    for cut in 0..bytes.len() {
        assert!(State::decode(&bytes[..cut], 2).is_err(), "cut {cut}");
    }
    // No service key.
    let mut none = State::new();
    none.cmks.push(Cmk::generate(
        "cmk-1".into(),
        None,
        String::new(),
        KeyKind::User,
        7,
    ));
    assert!(State::decode(&none.encode(), 2).is_err());
    // Huge counts do not allocate.
    assert!(State::decode(&u32::MAX.to_le_bytes(), 2).is_err());
    assert!(State::decode(&u32::MAX.to_le_bytes(), 1).is_err());
    let _ = KeyOrigin::Generated;
}

#[test]
fn wrap_aad_is_unambiguous() {
    let ctx = EncryptionContext::new();
    assert_ne!(wrap_aad("cmk-a", 1, &ctx), wrap_aad("cmk-a\x01", 0, &ctx));
    assert!(wrap_aad("cmk-a", 1, &ctx).starts_with(WRAP_AAD_PREFIX));
}

/// Issue 8: a damaged salt, parameter or key check is a damaged keystore, never a
/// wrong passphrase (format 2 checks a key-independent checksum first).
#[test]
fn damaged_header_is_corrupt_not_wrong_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    drop(open(&path, "pw").unwrap());
    let original = fs::read(&path).unwrap();
    for pos in (10..HEADER_LEN).step_by(3) {
        let mut bad = original.clone();
        bad[pos] ^= 0x10;
        fs::write(&path, &bad).unwrap();
        match open(&path, "pw") {
            Err(e @ KmsError::Corrupt { .. }) => {
                let m = e.to_string();
                assert!(m.contains("damaged"), "byte {pos}: {m}");
                assert!(!m.contains("wrong passphrase"), "byte {pos}: {m}");
            }
            other => panic!("byte {pos}: expected Corrupt, got {other:?}"),
        }
    }
    // The wrong passphrase on an intact file is still said as such.
    fs::write(&path, &original).unwrap();
    assert!(matches!(
        open(&path, "nope"),
        Err(KmsError::WrongPassphrase { .. })
    ));
}

/// A damaged audit log stops every key operation (fail closed) until it is reset;
/// the reset keeps the old log aside and starts a chain that verifies.
#[test]
fn damaged_audit_log_fails_closed_until_reset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    let ks = open(&path, "pw").unwrap();
    let ctx = EncryptionContext::for_volume(&vol(1));
    let (_, w) = ks.generate_data_key(None, &ctx).unwrap();
    ks.decrypt(&w, &ctx).unwrap();
    assert_eq!(ks.audit_verify().unwrap().records, 3);
    let log = with_suffix(&path, ".audit");
    let mut bytes = fs::read(&log).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1; // the last record's MAC
    fs::write(&log, &bytes).unwrap();
    let e = ks.decrypt(&w, &ctx).unwrap_err();
    assert!(e.to_string().contains("kmsfs audit reset"), "{e}");
    assert!(ks.audit_verify().is_err());
    let moved = ks.audit_reset().unwrap().unwrap();
    assert_eq!(fs::read(&moved).unwrap(), bytes);
    ks.decrypt(&w, &ctx).unwrap();
    let r = ks.audit_verify().unwrap();
    assert_eq!(r.records, 2);
    let (_, recs) = ks.audit_records().unwrap();
    assert_eq!(recs[0].record.op, AuditOp::Restore);
    assert!(recs[0].record.reason.contains("reset"));
    assert_eq!(recs[1].record.op, AuditOp::Decrypt);
}
