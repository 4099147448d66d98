use super::*;

#[test]
fn rsync_lines() {
    assert_eq!(
        parse_rsync_line("@@kmsfs 3000000 >f+++++++++ dir/a file"),
        RsyncLine::Item {
            update: b'>',
            kind: b'f',
            size: 3000000
        }
    );
    assert_eq!(
        parse_rsync_line("@@kmsfs 3000000 .f          f1"),
        RsyncLine::Item {
            update: b'.',
            kind: b'f',
            size: 3000000
        }
    );
    assert_eq!(
        parse_rsync_line("      3,000,000   4%  217.67MB/s    0:00:00 (xfr#1, to-chk=5/22)"),
        RsyncLine::Progress { bytes: 3_000_000 }
    );
    assert_eq!(
        parse_rsync_line("         32.768   0%    0,00kB/s    0:00:00"),
        RsyncLine::Progress { bytes: 32_768 }
    );
    assert_eq!(parse_rsync_line("created directory x"), RsyncLine::Other);
    assert_eq!(parse_rsync_line(""), RsyncLine::Other);
}

#[test]
fn vanished() {
    let m = vec![
        "file has vanished: \"/src/a/b c\"".to_string(),
        "rsync warning: some files vanished before they could be transferred (code 24)".to_string(),
    ];
    assert_eq!(vanished_paths(&m, Path::new("/src")), vec!["a/b c"]);
}

#[test]
fn changes_of_the_source_are_apart() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("old"), b"x").unwrap();
    // ctimes come from a coarse clock: keep them well apart.
    std::thread::sleep(Duration::from_millis(100));
    fs::write(d.path().join("new"), b"y").unwrap();
    let new = fs::metadata(d.path().join("new")).unwrap();
    let start = UNIX_EPOCH + Duration::from_nanos(ctime_ns(&new) as u64);
    let diff = |p: &str| Diff {
        path: p.into(),
        what: "content",
        detail: String::new(),
    };
    let mut v = Verified {
        diffs: ["old", "new", "gone", "vanished"].map(diff).to_vec(),
        extras: vec![("extra".into(), PathBuf::new())],
        ..Verified::default()
    };
    let (real, changed, extras) = classify(d.path(), start, &mut v, &["vanished".into()]);
    let paths = |v: &[Diff]| v.iter().map(|d| d.path.clone()).collect::<Vec<_>>();
    assert_eq!(paths(&real), ["old"]);
    assert_eq!(paths(&changed), ["extra", "gone", "new", "vanished"]);
    assert!(extras.is_empty()); // the root's ctime changed with "new"
}

#[test]
fn etas() {
    assert_eq!(eta(5.2), "5s");
    assert_eq!(eta(65.0), "1m05s");
    assert_eq!(eta(7260.0), "2h01m");
}
