//! Property test: random operation sequences against an in-memory reference
//! model, with commits, clean reopens and simulated crashes (the model then
//! rolls back to its last committed state) in between.

mod engine_common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use engine_common::*;
use kmsfs::store::{MemStorage, Storage};
use kmsfs::volume::{ROOT_INO, RenameFlags, SetAttr, Volume};
use proptest::prelude::*;

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    File,
    Dir,
    Symlink(Vec<u8>),
}

#[derive(Clone, Debug)]
struct MNode {
    kind: Kind,
    data: Vec<u8>,
    perm: u32,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    nodes: HashMap<u64, MNode>,
    dirs: HashMap<u64, BTreeMap<Vec<u8>, u64>>,
    parent: HashMap<u64, u64>,
}

impl Model {
    fn new() -> Self {
        let mut m = Model::default();
        m.nodes.insert(
            ROOT_INO,
            MNode {
                kind: Kind::Dir,
                data: vec![],
                perm: 0o755,
                xattrs: BTreeMap::new(),
            },
        );
        m.dirs.insert(ROOT_INO, BTreeMap::new());
        m
    }
    fn entries(&self) -> Vec<(u64, Vec<u8>, u64)> {
        let mut v: Vec<_> = self
            .dirs
            .iter()
            .flat_map(|(d, m)| m.iter().map(move |(n, i)| (*d, n.clone(), *i)))
            .collect();
        v.sort();
        v
    }
    fn dir_list(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.dirs.keys().copied().collect();
        v.sort();
        v
    }
    fn files(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.kind == Kind::File)
            .map(|(i, _)| *i)
            .collect();
        v.sort();
        v
    }
    fn links(&self, ino: u64) -> u32 {
        self.dirs
            .values()
            .map(|d| d.values().filter(|i| **i == ino).count() as u32)
            .sum()
    }
    fn within(&self, mut d: u64, anc: u64) -> bool {
        loop {
            if d == anc {
                return true;
            }
            if d == ROOT_INO {
                return false;
            }
            d = self.parent[&d];
        }
    }
    fn drop_if_unlinked(&mut self, ino: u64) {
        if self.links(ino) == 0 {
            self.nodes.remove(&ino);
            self.dirs.remove(&ino);
            self.parent.remove(&ino);
        }
    }
    fn dump(&self) -> Dump {
        let mut out = BTreeMap::new();
        let mut stack = vec![(ROOT_INO, String::new())];
        while let Some((d, path)) = stack.pop() {
            for (name, ino) in &self.dirs[&d] {
                let p = format!("{path}/{}", String::from_utf8_lossy(name));
                let n = &self.nodes[ino];
                let mut xs: Vec<String> = n
                    .xattrs
                    .iter()
                    .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), digest(v)))
                    .collect();
                xs.sort();
                let (body, nlink) = match &n.kind {
                    Kind::File => (
                        format!("file size={} data={}", n.data.len(), digest(&n.data)),
                        self.links(*ino),
                    ),
                    Kind::Dir => {
                        stack.push((*ino, p.clone()));
                        let sub = self.dirs[ino]
                            .values()
                            .filter(|i| self.nodes[*i].kind == Kind::Dir)
                            .count() as u32;
                        ("dir".to_string(), 2 + sub)
                    }
                    Kind::Symlink(t) => (
                        format!("symlink {}", String::from_utf8_lossy(t)),
                        self.links(*ino),
                    ),
                };
                out.insert(
                    p,
                    format!(
                        "{body} mode={:o} nlink={nlink} xattrs=[{}]",
                        n.perm,
                        xs.join(",")
                    ),
                );
            }
        }
        out
    }
}

const NAMES: [&str; 5] = ["a", "b", "c", "dd", "e"];

fn name(i: u32) -> Vec<u8> {
    if i % 97 == 96 {
        vec![b'x'; 255]
    } else {
        NAMES[(i % 5) as usize].as_bytes().to_vec()
    }
}

fn errno<T>(r: &Result<T, kmsfs::error::Error>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.errno(),
    }
}

struct Harness {
    env: Env,
    storage: MemStorage,
    vol: Option<Volume>,
    model: Model,
    committed: Model,
}

impl Harness {
    fn v(&self) -> &Volume {
        self.vol.as_ref().unwrap()
    }

    fn check(&self, ctx: &str) {
        let real = dump(self.v()).unwrap();
        let exp = self.model.dump();
        if real != exp {
            for (k, v) in &exp {
                if real.get(k) != Some(v) {
                    eprintln!("expected {k}: {v}\n     got {:?}", real.get(k));
                }
            }
            for k in real.keys() {
                if !exp.contains_key(k) {
                    eprintln!("unexpected {k}: {}", real[k]);
                }
            }
            panic!("volume differs from the model after {ctx}");
        }
    }

    fn step(&mut self, op: u8, a: u32, b: u32, c: u32) {
        let m = &self.model;
        let dirs = m.dir_list();
        let files = m.files();
        let entries = m.entries();
        let d = dirs[a as usize % dirs.len()];
        let nm = name(b);
        match op % 16 {
            0..=3 => {
                let exists = m.dirs[&d].contains_key(&nm);
                let r = match op % 16 {
                    2 => self.v().mkdir(d, &nm, 0o750, 0, 0),
                    3 => self.v().symlink(d, &nm, format!("t{c}").as_bytes(), 0, 0),
                    _ => self.v().create(d, &nm, 0o640, 0, 0),
                };
                assert_eq!(
                    errno(&r),
                    if exists { libc::EEXIST } else { 0 },
                    "create {nm:?}"
                );
                if let Ok(attr) = r {
                    let (kind, perm) = match op % 16 {
                        2 => (Kind::Dir, 0o750),
                        3 => (Kind::Symlink(format!("t{c}").into_bytes()), 0o777),
                        _ => (Kind::File, 0o640),
                    };
                    if kind == Kind::Dir {
                        self.model.dirs.insert(attr.ino, BTreeMap::new());
                        self.model.parent.insert(attr.ino, d);
                    }
                    self.model.nodes.insert(
                        attr.ino,
                        MNode {
                            kind,
                            data: vec![],
                            perm,
                            xattrs: BTreeMap::new(),
                        },
                    );
                    self.model.dirs.get_mut(&d).unwrap().insert(nm, attr.ino);
                }
            }
            4..=6 if !files.is_empty() => {
                let f = files[a as usize % files.len()];
                let off = (b % 40_000) as usize;
                let data = pattern(c as u64, (c % 12_000) as usize);
                self.v().write(f, off as u64, &data).unwrap();
                let md = &mut self.model.nodes.get_mut(&f).unwrap().data;
                if md.len() < off + data.len() {
                    md.resize(off + data.len(), 0);
                }
                md[off..off + data.len()].copy_from_slice(&data);
            }
            7 if !files.is_empty() => {
                let f = files[a as usize % files.len()];
                let size = (b % 50_000) as u64;
                self.v()
                    .setattr(
                        f,
                        &SetAttr {
                            size: Some(size),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                self.model
                    .nodes
                    .get_mut(&f)
                    .unwrap()
                    .data
                    .resize(size as usize, 0);
            }
            8 | 9 if !entries.is_empty() => {
                let (p, n, ino) = entries[a as usize % entries.len()].clone();
                let is_dir = m.nodes[&ino].kind == Kind::Dir;
                let (got, exp) = if op % 16 == 8 {
                    (
                        errno(&self.v().unlink(p, &n)),
                        if is_dir { libc::EISDIR } else { 0 },
                    )
                } else {
                    let exp = if !is_dir {
                        libc::ENOTDIR
                    } else if !m.dirs[&ino].is_empty() {
                        libc::ENOTEMPTY
                    } else {
                        0
                    };
                    (errno(&self.v().rmdir(p, &n)), exp)
                };
                assert_eq!(got, exp, "unlink/rmdir {p}/{n:?}");
                if got == 0 {
                    self.model.dirs.get_mut(&p).unwrap().remove(&n);
                    self.model.drop_if_unlinked(ino);
                }
            }
            10 if !entries.is_empty() => {
                let (p, n, ino) = entries[a as usize % entries.len()].clone();
                let np = d;
                let nn = name(c);
                let flags = match (c / 5) % 3 {
                    0 => RenameFlags::default(),
                    1 => RenameFlags {
                        noreplace: true,
                        exchange: false,
                    },
                    _ => RenameFlags {
                        noreplace: false,
                        exchange: true,
                    },
                };
                let r = self.v().rename(p, &n, np, &nn, flags);
                let src_dir = m.nodes[&ino].kind == Kind::Dir;
                let dst = m.dirs[&np].get(&nn).copied();
                let exp = if flags.exchange {
                    match dst {
                        None => libc::ENOENT,
                        Some(di) => {
                            let dst_dir = m.nodes[&di].kind == Kind::Dir;
                            if (src_dir && m.within(np, ino)) || (dst_dir && m.within(p, di)) {
                                libc::EINVAL
                            } else {
                                0
                            }
                        }
                    }
                } else {
                    let mut e = 0;
                    if let Some(di) = dst {
                        let dst_dir = m.nodes[&di].kind == Kind::Dir;
                        e = if flags.noreplace {
                            libc::EEXIST
                        } else if di == ino {
                            -1
                        } else if src_dir && !dst_dir {
                            libc::ENOTDIR
                        } else if !src_dir && dst_dir {
                            libc::EISDIR
                        } else if src_dir && !m.dirs[&di].is_empty() {
                            libc::ENOTEMPTY
                        } else {
                            0
                        };
                    }
                    if e == 0 && src_dir && m.within(np, ino) {
                        e = libc::EINVAL;
                    }
                    e
                };
                assert_eq!(
                    errno(&r),
                    exp.max(0),
                    "rename {p}/{n:?} -> {np}/{nn:?} {flags:?}"
                );
                if exp == 0 {
                    let mm = &mut self.model;
                    if flags.exchange {
                        let di = dst.unwrap();
                        mm.dirs.get_mut(&p).unwrap().insert(n.clone(), di);
                        mm.dirs.get_mut(&np).unwrap().insert(nn.clone(), ino);
                        if mm.nodes[&ino].kind == Kind::Dir {
                            mm.parent.insert(ino, np);
                        }
                        if mm.nodes[&di].kind == Kind::Dir {
                            mm.parent.insert(di, p);
                        }
                    } else {
                        mm.dirs.get_mut(&p).unwrap().remove(&n);
                        if let Some(di) = mm.dirs.get_mut(&np).unwrap().insert(nn.clone(), ino) {
                            mm.drop_if_unlinked(di);
                        }
                        if src_dir {
                            mm.parent.insert(ino, np);
                        }
                    }
                }
            }
            11 if !files.is_empty() => {
                let f = files[a as usize % files.len()];
                let exists = m.dirs[&d].contains_key(&nm);
                let r = self.v().link(f, d, &nm);
                assert_eq!(errno(&r), if exists { libc::EEXIST } else { 0 }, "link");
                if r.is_ok() {
                    self.model.dirs.get_mut(&d).unwrap().insert(nm, f);
                }
            }
            12 | 13 if !entries.is_empty() => {
                let (_, _, ino) = entries[a as usize % entries.len()].clone();
                let xn = format!("user.x{}", b % 3).into_bytes();
                if op % 16 == 12 {
                    let val = pattern(c as u64, (c % 3000) as usize);
                    self.v().setxattr(ino, &xn, &val, 0).unwrap();
                    self.model
                        .nodes
                        .get_mut(&ino)
                        .unwrap()
                        .xattrs
                        .insert(xn, val);
                } else {
                    let has = m.nodes[&ino].xattrs.contains_key(&xn);
                    let r = self.v().removexattr(ino, &xn);
                    assert_eq!(errno(&r), if has { 0 } else { libc::ENODATA });
                    self.model.nodes.get_mut(&ino).unwrap().xattrs.remove(&xn);
                }
            }
            14 if !files.is_empty() => {
                let f = files[a as usize % files.len()];
                let off = (b % 40_000) as u64;
                let len = (c % 20_000) as u64 + 1;
                if c.is_multiple_of(2) {
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    self.v().fallocate(f, off, len, mode).unwrap();
                    let md = &mut self.model.nodes.get_mut(&f).unwrap().data;
                    let end = ((off + len) as usize).min(md.len());
                    if (off as usize) < end {
                        md[off as usize..end].fill(0);
                    }
                } else {
                    self.v().fallocate(f, off, len, 0).unwrap();
                    let md = &mut self.model.nodes.get_mut(&f).unwrap().data;
                    if md.len() < (off + len) as usize {
                        md.resize((off + len) as usize, 0);
                    }
                }
            }
            15 => match c % 5 {
                0 => {
                    self.v().commit().unwrap();
                    self.committed = self.model.clone();
                }
                1 => {
                    self.vol.take().unwrap().close().unwrap();
                    self.committed = self.model.clone();
                    self.vol = Some(open(&self.env, Arc::new(self.storage.clone())));
                    self.check("reopen");
                }
                2 => {
                    // Power loss: only the last commit survives.
                    drop(self.vol.take());
                    self.storage = self.storage.reboot();
                    self.model = self.committed.clone();
                    self.vol = Some(open(&self.env, Arc::new(self.storage.clone())));
                    self.check("crash");
                }
                3 => {
                    self.v().clean(0.9).unwrap();
                    self.committed = self.model.clone();
                }
                _ => {
                    // Sealed and recorded, not committed: a crash still
                    // returns to the last commit.
                    self.v().write_back().unwrap();
                    self.check("write-back");
                }
            },
            _ => {}
        }
    }
}

fn run(ops: &[(u8, u32, u32, u32)]) {
    let env = env();
    let storage = MemStorage::new();
    let vol = init(
        &env,
        Arc::new(storage.clone()) as Arc<dyn Storage>,
        &small_opts(),
    );
    let mut h = Harness {
        env,
        storage,
        vol: Some(vol),
        model: Model::new(),
        committed: Model::new(),
    };
    for (i, (op, a, b, c)) in ops.iter().enumerate() {
        h.step(*op, *a, *b, *c);
        if i % 64 == 63 {
            h.check(&format!("op {i}"));
        }
    }
    h.check("the last op");
    h.v().commit().unwrap();
    let r = h.v().fsck().unwrap();
    assert!(r.is_clean(), "fsck: {:?}", r.errors);
    // A clean reopen sees the same tree.
    h.vol.take().unwrap().close().unwrap();
    h.vol = Some(open(&h.env, Arc::new(h.storage.clone())));
    h.check("final reopen");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn random_ops_match_model(ops in proptest::collection::vec(any::<(u8, u32, u32, u32)>(), 150..400)) {
        run(&ops);
    }
}

#[test]
fn long_deterministic_sequence() {
    // Thousands of operations in one volume, several reopens and crashes.
    let mut x: u64 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ops: Vec<(u8, u32, u32, u32)> = (0..4000)
        .map(|_| (next() as u8, next() as u32, next() as u32, next() as u32))
        .collect();
    run(&ops);
}
