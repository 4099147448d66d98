//! POSIX ACL inheritance for new nodes, as `posix_acl_create` does in the
//! kernel for local filesystems. Only used when FUSE_POSIX_ACL is negotiated
//! (the kernel then enforces ACLs from the xattrs, but leaves inheritance and
//! the umask to the daemon).
//!
//! Xattr format (linux/posix_acl_xattr.h): u32 LE version 2, then entries of
//! u16 LE tag, u16 LE permission bits, u32 LE id.

pub const ACCESS_XATTR: &[u8] = b"system.posix_acl_access";
pub const DEFAULT_XATTR: &[u8] = b"system.posix_acl_default";
const VERSION: u32 = 2;
const HEADER_LEN: usize = 4;
const ENTRY_LEN: usize = 8;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// ACL xattrs to store on a new node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inherited {
    pub access: Option<Vec<u8>>,
    pub default: Option<Vec<u8>>,
}

/// The mode of a new node and the ACLs it inherits from its parent's
/// default ACL (`parent_default`). Without a usable default ACL the umask
/// applies; with one, the umask is ignored and the mode is masked by the ACL.
pub fn inherit(parent_default: Option<&[u8]>, mode: u32, umask: u32) -> (u32, Inherited) {
    let Some(mut entries) = parent_default.and_then(parse) else {
        return (mode & !(umask & 0o777), Inherited::default());
    };
    let default = Some(encode(&entries));
    let mut mode = mode;
    let mut not_equiv = false;
    let (mut group_obj, mut mask) = (None, None);
    for (i, e) in entries.iter_mut().enumerate() {
        match e.0 {
            USER_OBJ => {
                e.1 &= ((mode >> 6) & 7) as u16;
                mode &= ((e.1 as u32) << 6) | !0o700;
            }
            USER | GROUP => not_equiv = true,
            GROUP_OBJ => group_obj = Some(i),
            OTHER => {
                e.1 &= (mode & 7) as u16;
                mode &= (e.1 as u32) | !0o007;
            }
            MASK => {
                mask = Some(i);
                not_equiv = true;
            }
            _ => {}
        }
    }
    if let Some(i) = mask.or(group_obj) {
        let e = &mut entries[i];
        e.1 &= ((mode >> 3) & 7) as u16;
        mode &= ((e.1 as u32) << 3) | !0o070;
    }
    let access = not_equiv.then(|| encode(&entries));
    (mode, Inherited { access, default })
}

/// The permission bits an access ACL stands for (owner, mask or group,
/// other), and whether it is equivalent to them (no named entries, no
/// mask), in which case a local filesystem keeps only the mode.
pub fn mode_bits(v: &[u8]) -> Option<(u32, bool)> {
    let e = parse(v)?;
    let get = |t| e.iter().find(|x| x.0 == t).map(|x| x.1 as u32 & 7);
    let group = get(MASK).or_else(|| get(GROUP_OBJ))?;
    let bits = (get(USER_OBJ)? << 6) | (group << 3) | get(OTHER)?;
    let equivalent = !e.iter().any(|x| matches!(x.0, USER | GROUP | MASK));
    Some((bits, equivalent))
}

/// An access ACL updated for a chmod to `perm`, as `posix_acl_chmod`
/// does: owner, mask (or group when there is no mask) and other follow.
pub fn chmod(v: &[u8], perm: u32) -> Option<Vec<u8>> {
    let mut e = parse(v)?;
    let has_mask = e.iter().any(|x| x.0 == MASK);
    for x in e.iter_mut() {
        match x.0 {
            USER_OBJ => x.1 = ((perm >> 6) & 7) as u16,
            MASK => x.1 = ((perm >> 3) & 7) as u16,
            GROUP_OBJ if !has_mask => x.1 = ((perm >> 3) & 7) as u16,
            OTHER => x.1 = (perm & 7) as u16,
            _ => {}
        }
    }
    Some(encode(&e))
}

/// Entries (tag, perm, id) of a well-formed ACL xattr with at least the
/// three base entries; None otherwise.
fn parse(b: &[u8]) -> Option<Vec<(u16, u16, u32)>> {
    if b.len() < HEADER_LEN || !(b.len() - HEADER_LEN).is_multiple_of(ENTRY_LEN) {
        return None;
    }
    if u32::from_le_bytes(b[..4].try_into().ok()?) != VERSION {
        return None;
    }
    let entries: Vec<_> = b[HEADER_LEN..]
        .chunks_exact(ENTRY_LEN)
        .map(|c| {
            (
                u16::from_le_bytes([c[0], c[1]]),
                u16::from_le_bytes([c[2], c[3]]),
                u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    let has = |t| entries.iter().any(|e| e.0 == t);
    (has(USER_OBJ) && has(GROUP_OBJ) && has(OTHER)).then_some(entries)
}

fn encode(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut b = VERSION.to_le_bytes().to_vec();
    for (t, p, id) in entries {
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&p.to_le_bytes());
        b.extend_from_slice(&id.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(e: &[(u16, u16, u32)]) -> Vec<u8> {
        encode(e)
    }

    #[test]
    fn access_acl_mode_and_chmod() {
        let a = acl(&[
            (USER_OBJ, 6, u32::MAX),
            (USER, 6, 1234),
            (GROUP_OBJ, 0, u32::MAX),
            (MASK, 6, u32::MAX),
            (OTHER, 0, u32::MAX),
        ]);
        assert_eq!(mode_bits(&a), Some((0o660, false)));
        let base = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (GROUP_OBJ, 5, u32::MAX),
            (OTHER, 4, u32::MAX),
        ]);
        assert_eq!(mode_bits(&base), Some((0o754, true)));
        assert_eq!(mode_bits(b"\x02\x00\x00\x00"), None);
        let c = parse(&chmod(&a, 0o640).unwrap()).unwrap();
        assert!(c.contains(&(MASK, 4, u32::MAX)) && c.contains(&(GROUP_OBJ, 0, u32::MAX)));
        assert!(c.contains(&(USER, 6, 1234)) && c.contains(&(OTHER, 0, u32::MAX)));
        let c = parse(&chmod(&base, 0o600).unwrap()).unwrap();
        assert!(c.contains(&(GROUP_OBJ, 0, u32::MAX)));
    }

    #[test]
    fn no_default_acl_applies_umask() {
        assert_eq!(
            inherit(None, 0o100666, 0o022),
            (0o100644, Inherited::default())
        );
        assert_eq!(inherit(Some(b"junk"), 0o40777, 0o027).0, 0o40750);
    }

    #[test]
    fn minimal_default_acl_masks_mode_without_access_acl() {
        let d = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (GROUP_OBJ, 5, u32::MAX),
            (OTHER, 0, u32::MAX),
        ]);
        let (mode, inh) = inherit(Some(&d), 0o100666, 0o022);
        assert_eq!(mode, 0o100640);
        assert_eq!(inh.access, None);
        assert_eq!(inh.default, Some(d));
    }

    #[test]
    fn named_entries_give_an_access_acl_with_the_mask_as_group_bits() {
        let d = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, u32::MAX),
            (MASK, 7, u32::MAX),
            (OTHER, 5, u32::MAX),
        ]);
        let (mode, inh) = inherit(Some(&d), 0o100644, 0o077);
        // Umask ignored; group bits come from mask & mode.
        assert_eq!(mode, 0o100644);
        let a = parse(inh.access.as_deref().unwrap()).unwrap();
        assert!(a.contains(&(MASK, 4, u32::MAX)));
        assert!(a.contains(&(USER_OBJ, 6, u32::MAX)));
        assert!(a.contains(&(USER, 7, 1000)));
    }
}
