//! A copy-on-write B+tree of byte keys and byte values.
//!
//! Nodes are sealed blocks. A parent holds each child's `BlockPtr`, which
//! carries the child's block id and AEAD tag, so the tree is a MAC tree: the
//! root pointer (in the sealed root record) authenticates every node and, through
//! block-map values, every data block. Stored nodes are never modified: a change
//! copies the path from the root to the leaf into memory (`Child::Dirty`), and
//! `flush` writes the dirty nodes bottom-up as new blocks. An old root pointer
//! therefore keeps describing its old tree, which is all a snapshot needs.
//!
//! Internal nodes: `keys[i]` is a lower bound of every key under `kids[i]`;
//! `keys[0]` is ignored on lookup (it stands for minus infinity).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{BlockPtr, Dec, DecodeError, Enc, NODE_LEAF};

/// Nodes larger than this (encoded) are split.
pub const NODE_MAX: usize = 32 * 1024;
/// Nodes smaller than this after a removal are merged with a sibling.
const NODE_MIN: usize = NODE_MAX / 4;

/// Callback over leaf entries; returns false to stop.
pub type EntryFn<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool> + 'a;
/// Callback over leaf entries of a walk.
pub type VisitFn<'a> = dyn FnMut(&[u8], &[u8]) -> Result<()> + 'a;
/// Node pointer callback of a walk: false skips the subtree.
pub type NodeFn<'a> = dyn FnMut(&BlockPtr) -> bool + 'a;
/// Receives nodes that could not be read during a walk.
pub type ErrFn<'a> = dyn FnMut(&BlockPtr, Error) + 'a;
/// Relocation of a node pointer.
pub type MoveFn<'a> = dyn FnMut(&BlockPtr) -> Result<Option<BlockPtr>> + 'a;
/// Replacement of a leaf value.
pub type ValFn<'a> = dyn FnMut(&[u8], &[u8]) -> Result<Option<Vec<u8>>> + 'a;
/// The result of an insert below a node: the old value and a split-off sibling.
type InsertOutcome = (Option<Vec<u8>>, Option<(Vec<u8>, Node)>);

#[derive(Clone, Debug)]
pub enum Child {
    Clean(BlockPtr),
    Dirty(Box<Node>),
}

#[derive(Clone, Debug, Default)]
pub struct Node {
    pub leaf: bool,
    pub keys: Vec<Vec<u8>>,
    /// Leaves only.
    pub vals: Vec<Vec<u8>>,
    /// Internal nodes only.
    pub kids: Vec<Child>,
}

/// Where clean nodes come from, and where dirty ones go.
pub trait NodeStore {
    fn load(&self, ptr: &BlockPtr) -> Result<Arc<Node>>;
    /// Writes a node whose children are all clean. On failure nothing changed.
    fn store(&self, node: &Node) -> Result<BlockPtr>;
    /// Offers a just-stored node for caching.
    fn remember(&self, _ptr: &BlockPtr, _node: Node) {}
}

/// Decoded nodes hold names, attributes and xattr values in the clear: wipe
/// them when the node is dropped (evicted from the cache, or replaced).
impl Drop for Node {
    fn drop(&mut self) {
        for k in self.keys.iter_mut().chain(self.vals.iter_mut()) {
            crate::cache::wipe(k);
        }
    }
}

impl Node {
    pub fn empty_leaf() -> Self {
        Node {
            leaf: true,
            keys: Vec::new(),
            vals: Vec::new(),
            kids: Vec::new(),
        }
    }

    pub fn encoded_len(&self) -> usize {
        let mut n = 5;
        for (i, k) in self.keys.iter().enumerate() {
            n += 2 + k.len();
            n += if self.leaf {
                4 + self.vals[i].len()
            } else {
                crate::format::PTR_LEN
            };
        }
        n
    }

    /// Encodes a node whose children are all clean.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(self.encoded_len());
        e.u8(if self.leaf { NODE_LEAF } else { 1 })
            .u32(self.keys.len() as u32);
        for (i, k) in self.keys.iter().enumerate() {
            e.bytes16(k);
            if self.leaf {
                e.bytes32(&self.vals[i]);
            } else {
                match &self.kids[i] {
                    Child::Clean(p) => p.encode(&mut e),
                    Child::Dirty(_) => panic!("encode of a node with dirty children"),
                }
            }
        }
        e.buf
    }

    pub fn decode(b: &[u8]) -> std::result::Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        let leaf = match d.u8()? {
            NODE_LEAF => true,
            1 => false,
            x => return Err(DecodeError(format!("bad node type {x}"))),
        };
        let n = d.u32()? as usize;
        if n > d.remaining() / 6 {
            return Err(DecodeError("node entry count larger than the node".into()));
        }
        let mut node = Node {
            leaf,
            keys: Vec::with_capacity(n),
            vals: Vec::new(),
            kids: Vec::new(),
        };
        for _ in 0..n {
            let k = d.bytes16()?.to_vec();
            if let Some(prev) = node.keys.last()
                && prev.as_slice() >= k.as_slice()
            {
                return Err(DecodeError("node keys out of order".into()));
            }
            node.keys.push(k);
            if leaf {
                node.vals.push(d.bytes32()?.to_vec());
            } else {
                node.kids.push(Child::Clean(BlockPtr::decode(&mut d)?));
            }
        }
        // Nodes are zero-padded before sealing (sizes show only to the quantum).
        if d.take(d.remaining())?.iter().any(|&b| b != 0) {
            return Err(DecodeError("node has trailing garbage".into()));
        }
        if !leaf && n == 0 {
            return Err(DecodeError("internal node without children".into()));
        }
        Ok(node)
    }

    fn child_index(&self, key: &[u8]) -> usize {
        // Last i with keys[i] <= key, treating keys[0] as minus infinity.
        match self.keys[1..].binary_search_by(|k| k.as_slice().cmp(key)) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }

    /// Splits off the upper half (by bytes); returns (separator, right node).
    fn split(&mut self) -> (Vec<u8>, Node) {
        let total = self.encoded_len();
        let mut acc = 5;
        let mut at = self.keys.len() / 2;
        for (i, k) in self.keys.iter().enumerate() {
            acc += 2
                + k.len()
                + if self.leaf {
                    4 + self.vals[i].len()
                } else {
                    crate::format::PTR_LEN
                };
            if acc > total / 2 {
                at = i.max(1);
                break;
            }
        }
        let at = at.min(self.keys.len() - 1).max(1);
        let right = Node {
            leaf: self.leaf,
            keys: self.keys.split_off(at),
            vals: if self.leaf {
                self.vals.split_off(at)
            } else {
                Vec::new()
            },
            kids: if self.leaf {
                Vec::new()
            } else {
                self.kids.split_off(at)
            },
        };
        (right.keys[0].clone(), right)
    }
}

fn child_mut<'a>(c: &'a mut Child, s: &dyn NodeStore) -> Result<&'a mut Node> {
    if let Child::Clean(p) = c {
        let n = s.load(p)?;
        *c = Child::Dirty(Box::new((*n).clone()));
    }
    match c {
        Child::Dirty(b) => Ok(b),
        Child::Clean(_) => unreachable!(),
    }
}

/// A node reached either in memory or through the store.
enum NodeRef<'a> {
    Mem(&'a Node),
    Loaded(Arc<Node>),
}

impl std::ops::Deref for NodeRef<'_> {
    type Target = Node;
    fn deref(&self) -> &Node {
        match self {
            NodeRef::Mem(n) => n,
            NodeRef::Loaded(a) => a,
        }
    }
}

fn resolve<'a>(c: &'a Child, s: &dyn NodeStore) -> Result<NodeRef<'a>> {
    Ok(match c {
        Child::Dirty(b) => NodeRef::Mem(b),
        Child::Clean(p) => NodeRef::Loaded(s.load(p)?),
    })
}

#[derive(Clone, Debug)]
pub struct Tree {
    pub root: Child,
}

impl Tree {
    pub fn new_empty() -> Self {
        Tree {
            root: Child::Dirty(Box::new(Node::empty_leaf())),
        }
    }

    pub fn from_ptr(p: BlockPtr) -> Self {
        Tree {
            root: Child::Clean(p),
        }
    }

    pub fn is_dirty(&self) -> bool {
        matches!(self.root, Child::Dirty(_))
    }

    pub fn get(&self, s: &dyn NodeStore, key: &[u8]) -> Result<Option<Vec<u8>>> {
        fn go(n: &Node, s: &dyn NodeStore, key: &[u8]) -> Result<Option<Vec<u8>>> {
            if n.leaf {
                return Ok(n
                    .keys
                    .binary_search_by(|k| k.as_slice().cmp(key))
                    .ok()
                    .map(|i| n.vals[i].clone()));
            }
            let c = resolve(&n.kids[n.child_index(key)], s)?;
            go(&c, s, key)
        }
        let r = resolve(&self.root, s)?;
        go(&r, s, key)
    }

    /// Calls `f` for each entry with `start <= key < end` in order, until it returns false.
    ///
    /// Only entries that `get` and `remove` can reach are visited: a key stored
    /// under a child outside the range its parent gives that child (a damaged
    /// tree) is skipped, so that a scan-and-remove loop always makes progress.
    pub fn range(
        &self,
        s: &dyn NodeStore,
        start: &[u8],
        end: &[u8],
        f: &mut EntryFn,
    ) -> Result<()> {
        /// `lo..hi`: the keys the parent routes to this node (None: unbounded).
        fn go(
            n: &Node,
            s: &dyn NodeStore,
            start: &[u8],
            end: &[u8],
            (lo, hi): (Option<&[u8]>, Option<&[u8]>),
            f: &mut EntryFn,
        ) -> Result<bool> {
            if n.leaf {
                let from = match n.keys.binary_search_by(|k| k.as_slice().cmp(start)) {
                    Ok(i) | Err(i) => i,
                };
                for i in from..n.keys.len() {
                    let k = n.keys[i].as_slice();
                    if k >= end {
                        return Ok(false);
                    }
                    if hi.is_some_and(|hi| k >= hi) {
                        // The rest of this leaf is out of place too.
                        return Ok(true);
                    }
                    if lo.is_some_and(|lo| k < lo) {
                        continue;
                    }
                    if !f(k, &n.vals[i])? {
                        return Ok(false);
                    }
                }
                return Ok(true);
            }
            let first = n.child_index(start);
            for i in first..n.kids.len() {
                if i > 0 && n.keys[i].as_slice() >= end {
                    return Ok(false);
                }
                // keys[0] stands for the parent's lower bound; in a damaged tree
                // the parent's bounds may be the tighter ones.
                let kid_lo = match (i, lo) {
                    (0, lo) => lo,
                    (_, Some(lo)) => Some(lo.max(n.keys[i].as_slice())),
                    (_, None) => Some(n.keys[i].as_slice()),
                };
                let kid_hi = match (n.keys.get(i + 1), hi) {
                    (Some(k), Some(hi)) => Some(hi.min(k.as_slice())),
                    (k, hi) => k.map(Vec::as_slice).or(hi),
                };
                let c = resolve(&n.kids[i], s)?;
                if !go(&c, s, start, end, (kid_lo, kid_hi), f)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        let r = resolve(&self.root, s)?;
        go(&r, s, start, end, (None, None), f)?;
        Ok(())
    }

    /// Collects entries in [start, end).
    pub fn collect(
        &self,
        s: &dyn NodeStore,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut v = Vec::new();
        self.range(s, start, end, &mut |k, val| {
            v.push((k.to_vec(), val.to_vec()));
            Ok(v.len() < limit)
        })?;
        Ok(v)
    }

    pub fn insert(
        &mut self,
        s: &dyn NodeStore,
        key: &[u8],
        val: Vec<u8>,
    ) -> Result<Option<Vec<u8>>> {
        fn go(n: &mut Node, s: &dyn NodeStore, key: &[u8], val: Vec<u8>) -> Result<InsertOutcome> {
            let old = if n.leaf {
                match n.keys.binary_search_by(|k| k.as_slice().cmp(key)) {
                    Ok(i) => Some(std::mem::replace(&mut n.vals[i], val)),
                    Err(i) => {
                        n.keys.insert(i, key.to_vec());
                        n.vals.insert(i, val);
                        None
                    }
                }
            } else {
                let i = n.child_index(key);
                let c = child_mut(&mut n.kids[i], s)?;
                let (old, split) = go(c, s, key, val)?;
                if let Some((sep, right)) = split {
                    n.keys.insert(i + 1, sep);
                    n.kids.insert(i + 1, Child::Dirty(Box::new(right)));
                }
                old
            };
            let split = if n.encoded_len() > NODE_MAX && n.keys.len() >= 2 {
                Some(n.split())
            } else {
                None
            };
            Ok((old, split))
        }
        let root = child_mut(&mut self.root, s)?;
        let (old, split) = go(root, s, key, val)?;
        if let Some((sep, right)) = split {
            let left = std::mem::take(root);
            let left_key = left.keys.first().cloned().unwrap_or_default();
            *root = Node {
                leaf: false,
                keys: vec![left_key, sep],
                vals: Vec::new(),
                kids: vec![Child::Dirty(Box::new(left)), Child::Dirty(Box::new(right))],
            };
        }
        Ok(old)
    }

    pub fn remove(&mut self, s: &dyn NodeStore, key: &[u8]) -> Result<Option<Vec<u8>>> {
        fn go(n: &mut Node, s: &dyn NodeStore, key: &[u8]) -> Result<Option<Vec<u8>>> {
            if n.leaf {
                return Ok(match n.keys.binary_search_by(|k| k.as_slice().cmp(key)) {
                    Ok(i) => {
                        n.keys.remove(i);
                        Some(n.vals.remove(i))
                    }
                    Err(_) => None,
                });
            }
            let i = n.child_index(key);
            // Only copy the path when the key is really there.
            {
                let c = resolve(&n.kids[i], s)?;
                if c.leaf && c.keys.binary_search_by(|k| k.as_slice().cmp(key)).is_err() {
                    return Ok(None);
                }
            }
            let c = child_mut(&mut n.kids[i], s)?;
            let old = go(c, s, key)?;
            if old.is_none() {
                return Ok(None);
            }
            let (empty, small) = {
                let c = match &n.kids[i] {
                    Child::Dirty(b) => b,
                    Child::Clean(_) => unreachable!(),
                };
                (c.keys.is_empty(), c.encoded_len() < NODE_MIN)
            };
            if empty {
                n.kids.remove(i);
                n.keys.remove(i);
            } else if small && n.kids.len() > 1 {
                let (l, r) = if i + 1 < n.kids.len() {
                    (i, i + 1)
                } else {
                    (i - 1, i)
                };
                // Read both siblings before changing this node (a failed read
                // changes nothing), and merge only siblings that fit together:
                // in a damaged tree they may be out of order or of different levels.
                let right_stored = match &n.kids[r] {
                    Child::Clean(p) => Some(s.load(p)?),
                    Child::Dirty(_) => None,
                };
                child_mut(&mut n.kids[l], s)?;
                let right: Option<&Node> = match (&n.kids[r], &right_stored) {
                    (_, Some(stored)) => Some(stored),
                    (Child::Dirty(b), None) => Some(b),
                    (Child::Clean(_), None) => None,
                };
                let fits = match (&n.kids[l], right) {
                    (Child::Dirty(left), Some(right)) => siblings_fit(left, &n.keys[r], right),
                    _ => false,
                };
                if fits {
                    let sep = n.keys.remove(r);
                    let mut right = match (n.kids.remove(r), right_stored) {
                        (Child::Dirty(b), _) => *b,
                        (Child::Clean(_), Some(stored)) => (*stored).clone(),
                        (Child::Clean(_), None) => unreachable!("a clean child was loaded"),
                    };
                    if !right.leaf {
                        right.keys[0] = sep;
                    }
                    let Child::Dirty(left) = &mut n.kids[l] else {
                        unreachable!("made dirty above")
                    };
                    left.keys.append(&mut right.keys);
                    left.vals.append(&mut right.vals);
                    left.kids.append(&mut right.kids);
                    if left.encoded_len() > NODE_MAX && left.keys.len() >= 2 {
                        let (sep, right) = left.split();
                        n.keys.insert(l + 1, sep);
                        n.kids.insert(l + 1, Child::Dirty(Box::new(right)));
                    }
                }
            }
            Ok(old)
        }
        /// Whether `right` (after separator `sep`) can be appended to `left`:
        /// same level, and the merged keys strictly ordered.
        fn siblings_fit(left: &Node, sep: &[u8], right: &Node) -> bool {
            if left.leaf != right.leaf || (!right.leaf && right.keys.is_empty()) {
                return false;
            }
            // In internal nodes the separator stands for right's first key.
            let first = if right.leaf {
                right.keys.first().map(Vec::as_slice)
            } else {
                Some(sep)
            };
            let joined = match (left.keys.last(), first) {
                (Some(a), Some(b)) => a.as_slice() < b,
                _ => true,
            };
            joined && (right.leaf || right.keys.get(1).is_none_or(|k| sep < k.as_slice()))
        }
        // Avoid dirtying the root for a missing key.
        if self.get(s, key)?.is_none() {
            return Ok(None);
        }
        let root = child_mut(&mut self.root, s)?;
        let old = go(root, s, key)?;
        // Collapse a root with a single child.
        loop {
            let root = child_mut(&mut self.root, s)?;
            if root.leaf || root.kids.len() > 1 {
                break;
            }
            if root.kids.is_empty() {
                *root = Node::empty_leaf();
                break;
            }
            let only = root.kids.pop().unwrap();
            self.root = only;
        }
        Ok(old)
    }

    /// Writes every dirty node, bottom-up; returns the root pointer.
    pub fn flush(&mut self, s: &dyn NodeStore) -> Result<BlockPtr> {
        fn go(c: &mut Child, s: &dyn NodeStore) -> Result<BlockPtr> {
            match c {
                Child::Clean(p) => Ok(*p),
                Child::Dirty(b) => {
                    for k in b.kids.iter_mut() {
                        let p = go(k, s)?;
                        *k = Child::Clean(p);
                    }
                    // Store first: if the write fails the node stays dirty, intact.
                    let p = s.store(b)?;
                    let node = std::mem::take(&mut **b);
                    s.remember(&p, node);
                    *c = Child::Clean(p);
                    Ok(p)
                }
            }
        }
        go(&mut self.root, s)
    }

    /// Visits every node pointer (pre-order) and every leaf entry.
    /// `on_node` returns false to skip a subtree (already visited).
    pub fn walk(
        &self,
        s: &dyn NodeStore,
        on_node: &mut NodeFn,
        on_entry: &mut VisitFn,
        on_error: &mut ErrFn,
    ) -> Result<()> {
        fn go(
            c: &Child,
            s: &dyn NodeStore,
            on_node: &mut NodeFn,
            on_entry: &mut VisitFn,
            on_error: &mut ErrFn,
        ) -> Result<()> {
            if let Child::Clean(p) = c
                && !on_node(p)
            {
                return Ok(());
            }
            let n = match resolve(c, s) {
                Ok(n) => n,
                Err(e) => {
                    if let Child::Clean(p) = c {
                        on_error(p, e);
                        return Ok(());
                    }
                    return Err(e);
                }
            };
            if n.leaf {
                for (k, v) in n.keys.iter().zip(&n.vals) {
                    on_entry(k, v)?;
                }
            } else {
                for k in &n.kids {
                    go(k, s, on_node, on_entry, on_error)?;
                }
            }
            Ok(())
        }
        go(&self.root, s, on_node, on_entry, on_error)
    }

    /// Rewrites pointers: `node_map` may return a new location for a clean node
    /// pointer (the node is then copied there); leaf values are passed to
    /// `val_map`, which may return a replacement. Touched paths become dirty.
    pub fn relocate(
        &mut self,
        s: &dyn NodeStore,
        node_map: &mut MoveFn,
        needs_visit: &mut NodeFn,
        val_map: &mut ValFn,
    ) -> Result<()> {
        fn go(
            c: &mut Child,
            s: &dyn NodeStore,
            node_map: &mut MoveFn,
            needs_visit: &mut NodeFn,
            val_map: &mut ValFn,
        ) -> Result<()> {
            if let Child::Clean(p) = c
                && !needs_visit(p)
            {
                return Ok(());
            }
            // Find out whether anything below changes before copying this node.
            let n = resolve(c, s)?;
            let mut new_vals: Vec<(usize, Vec<u8>)> = Vec::new();
            let mut new_kids: Vec<(usize, Child)> = Vec::new();
            if n.leaf {
                for (i, (k, v)) in n.keys.iter().zip(&n.vals).enumerate() {
                    if let Some(nv) = val_map(k, v)? {
                        new_vals.push((i, nv));
                    }
                }
            } else {
                for (i, k) in n.kids.iter().enumerate() {
                    let mut k2 = k.clone();
                    if let Child::Clean(p) = k
                        && let Some(np) = node_map(p)?
                    {
                        k2 = Child::Clean(np);
                    }
                    let before = matches!(&k2, Child::Clean(_));
                    go(&mut k2, s, node_map, needs_visit, val_map)?;
                    let changed = match (&k2, k) {
                        (Child::Clean(a), Child::Clean(b)) => a != b,
                        _ => before || matches!(k2, Child::Dirty(_)),
                    };
                    if changed {
                        new_kids.push((i, k2));
                    }
                }
            }
            drop(n);
            if new_vals.is_empty() && new_kids.is_empty() {
                return Ok(());
            }
            let node = child_mut(c, s)?;
            for (i, v) in new_vals {
                node.vals[i] = v;
            }
            for (i, k) in new_kids {
                node.kids[i] = k;
            }
            Ok(())
        }
        if let Child::Clean(p) = &self.root
            && let Some(np) = node_map(p)?
        {
            self.root = Child::Clean(np);
        }
        go(&mut self.root, s, node_map, needs_visit, val_map)
    }
}

/// What [`relocate_stored`] asks of its caller: which places move, and a
/// memo of the nodes already rewritten (shared by every tree relocated with
/// it, so a subtree two trees share is rewritten once and stays shared).
pub trait Relocator {
    /// The new pointer of a node already relocated (from any tree).
    fn done(&self, p: &BlockPtr) -> Option<BlockPtr>;
    /// Notes where node `old` went (`new` may equal `old`).
    fn record(&mut self, old: &BlockPtr, new: BlockPtr);
    /// Whether anything under node `p` may move (false: it stays as it is).
    fn visit(&self, p: &BlockPtr) -> bool;
    /// A node whose contents stay the same: a copy of its record elsewhere
    /// when its own record must move (same id and tag), None to leave it.
    fn move_node(&mut self, p: &BlockPtr) -> Result<Option<BlockPtr>>;
    /// The replacement of a leaf value, if it changes.
    fn map_value(&mut self, key: &[u8], val: &[u8]) -> Result<Option<Vec<u8>>>;
}

/// Relocates the stored subtree under `p` and returns its new root pointer
/// (`p` itself when nothing in it moved). A node whose children or values
/// change is written anew (new id and tag, the parent names them); a node
/// that only has to leave its place is copied byte for byte. Every node is
/// handled once per `r` (see [`Relocator::done`]).
pub fn relocate_stored(p: &BlockPtr, s: &dyn NodeStore, r: &mut dyn Relocator) -> Result<BlockPtr> {
    if let Some(np) = r.done(p) {
        return Ok(np);
    }
    if !r.visit(p) {
        return Ok(*p);
    }
    let n = s.load(p)?;
    let mut changed: Option<Node> = None;
    if n.leaf {
        for (i, (k, v)) in n.keys.iter().zip(&n.vals).enumerate() {
            if let Some(nv) = r.map_value(k, v)? {
                changed.get_or_insert_with(|| (*n).clone()).vals[i] = nv;
            }
        }
    } else {
        for (i, kid) in n.kids.iter().enumerate() {
            // Decoded nodes have clean children only.
            if let Child::Clean(cp) = kid {
                let np = relocate_stored(cp, s, r)?;
                if np != *cp {
                    changed.get_or_insert_with(|| (*n).clone()).kids[i] = Child::Clean(np);
                }
            }
        }
    }
    drop(n);
    let np = match changed {
        Some(node) => {
            let np = s.store(&node)?;
            s.remember(&np, node);
            np
        }
        None => r.move_node(p)?.unwrap_or(*p),
    };
    r.record(p, np);
    Ok(np)
}

impl Tree {
    /// [`relocate_stored`] for every stored subtree of this tree; nodes
    /// changed in memory (dirty) are updated in place. The tree keeps its
    /// contents whatever happens (a failure leaves some pointers moved,
    /// which name the same blocks).
    pub fn relocate_shared(&mut self, s: &dyn NodeStore, r: &mut dyn Relocator) -> Result<()> {
        fn go(c: &mut Child, s: &dyn NodeStore, r: &mut dyn Relocator) -> Result<()> {
            match c {
                Child::Clean(p) => *p = relocate_stored(p, s, r)?,
                Child::Dirty(n) => {
                    if n.leaf {
                        for i in 0..n.keys.len() {
                            if let Some(nv) = r.map_value(&n.keys[i], &n.vals[i])? {
                                n.vals[i] = nv;
                            }
                        }
                    } else {
                        for k in n.kids.iter_mut() {
                            go(k, s, r)?;
                        }
                    }
                }
            }
            Ok(())
        }
        go(&mut self.root, s, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Default)]
    struct MemNodes {
        m: Mutex<HashMap<u64, Vec<u8>>>,
    }

    impl NodeStore for MemNodes {
        fn load(&self, p: &BlockPtr) -> Result<Arc<Node>> {
            let m = self.m.lock();
            let b = m.get(&p.segment).ok_or(Error::NotFound)?;
            Ok(Arc::new(
                Node::decode(b).map_err(|e| Error::decode("node", e))?,
            ))
        }
        fn store(&self, n: &Node) -> Result<BlockPtr> {
            let mut m = self.m.lock();
            let id = m.len() as u64 + 1;
            m.insert(id, n.encode());
            Ok(BlockPtr {
                segment: id,
                offset: 0,
                len: 0,
                block_id: [0; 16],
                tag: [0; 16],
            })
        }
    }

    #[test]
    fn random_against_btreemap() {
        let s = MemNodes::default();
        let mut t = Tree::new_empty();
        let mut model = BTreeMap::new();
        let mut x: u64 = 12345;
        for round in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = format!("key{:06}", x % 5000).into_bytes();
            if x.is_multiple_of(3) {
                assert_eq!(t.remove(&s, &k).unwrap(), model.remove(&k));
            } else {
                let v = vec![(x % 251) as u8; (x % 300) as usize];
                assert_eq!(t.insert(&s, &k, v.clone()).unwrap(), model.insert(k, v));
            }
            if round % 1000 == 0 {
                let p = t.flush(&s).unwrap();
                t = Tree::from_ptr(p);
            }
        }
        for (k, v) in &model {
            assert_eq!(t.get(&s, k).unwrap().as_ref(), Some(v));
        }
        let all = t.collect(&s, b"", b"\xff", usize::MAX).unwrap();
        let exp: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(all, exp);
        let part = t.collect(&s, b"key001", b"key002", usize::MAX).unwrap();
        let exp: Vec<_> = model
            .range(b"key001".to_vec()..b"key002".to_vec())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(part, exp);
        // Remove everything; the tree collapses to an empty leaf.
        for k in model.keys() {
            assert!(t.remove(&s, k).unwrap().is_some());
        }
        assert!(t.collect(&s, b"", b"\xff", 10).unwrap().is_empty());
    }

    /// A damaged (but authentic) tree: a leaf holds a key outside the range its
    /// parent routes to it. `get` cannot reach it, so `range` must not yield it
    /// either, or a scan-and-remove loop (deleting a file) never ends.
    #[test]
    fn range_skips_keys_out_of_place() {
        let s = MemNodes::default();
        let mut l = Node::empty_leaf();
        l.keys = vec![b"a".to_vec(), b"z".to_vec()];
        l.vals = vec![b"1".to_vec(), b"2".to_vec()];
        let mut r = Node::empty_leaf();
        r.keys = vec![b"c".to_vec(), b"m".to_vec()];
        r.vals = vec![b"3".to_vec(), b"4".to_vec()];
        let root = Node {
            leaf: false,
            keys: vec![Vec::new(), b"b".to_vec()],
            vals: Vec::new(),
            kids: vec![
                Child::Clean(s.store(&l).unwrap()),
                Child::Clean(s.store(&r).unwrap()),
            ],
        };
        let mut t = Tree::from_ptr(s.store(&root).unwrap());
        assert_eq!(t.get(&s, b"z").unwrap(), None);
        let keys = |t: &Tree| -> Vec<Vec<u8>> {
            t.collect(&s, b"", b"\xff", 100)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(keys(&t), [b"a".to_vec(), b"c".to_vec(), b"m".to_vec()]);
        // Deleting everything the scan finds terminates.
        for _ in 0..10 {
            let found = keys(&t);
            if found.is_empty() {
                break;
            }
            for k in found {
                assert!(t.remove(&s, &k).unwrap().is_some());
            }
        }
        assert!(keys(&t).is_empty());
    }

    #[test]
    fn node_decode_rejects_garbage() {
        let mut n = Node::empty_leaf();
        n.keys = vec![b"a".to_vec(), b"b".to_vec()];
        n.vals = vec![b"1".to_vec(), b"2".to_vec()];
        let e = n.encode();
        assert!(Node::decode(&e).is_ok());
        for cut in 0..e.len() {
            assert!(Node::decode(&e[..cut]).is_err());
        }
        n.keys.swap(0, 1);
        assert!(Node::decode(&n.encode()).is_err());
    }
}
