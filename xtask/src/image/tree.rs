//! The initramfs as it is assembled: a sorted map from path to node, so
//! that the archive and the image version come out the same for the same
//! inputs whatever order the parts were added in.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::cpio;

/// One node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory with these permission bits.
    Dir(u32),
    /// A regular file.
    File {
        /// Permission bits.
        perm: u32,
        /// Contents.
        data: Vec<u8>,
    },
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device node (`/dev/console`).
    CharDev {
        /// Permission bits.
        perm: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

/// Paths (relative, no leading `/`) to nodes, sorted: a directory sorts
/// before everything under it, which is the order the kernel needs.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
    /// Subtrees with an owner other than root: (path, id).
    owners: Vec<(String, u32)>,
}

impl Tree {
    /// A directory; its parents are made as needed (0755). Giving an
    /// existing directory sets its permissions.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<()> {
        let path = normalize(path)?;
        if let Some(Node::Dir(p)) = self.nodes.get_mut(&path) {
            *p = perm;
            return Ok(());
        }
        self.insert(path, Node::Dir(perm))
    }

    /// A regular file with these contents.
    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<()> {
        self.insert(normalize(path)?, Node::File { perm, data })
    }

    /// A copy of the host file `from` (symlinks followed), with its
    /// permissions, at `path`.
    pub fn copy(&mut self, path: &str, from: &Path) -> Result<()> {
        let data = std::fs::read(from).with_context(|| format!("read {}", from.display()))?;
        let perm = std::fs::metadata(from)
            .with_context(|| format!("stat {}", from.display()))?
            .permissions()
            .mode()
            & 0o7777;
        self.file(path, perm, data)
    }

    /// A symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(normalize(path)?, Node::Symlink(target.to_owned()))
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.insert(normalize(path)?, Node::CharDev { perm, major, minor })
    }

    /// Adds `node` at `path` after its parent directories. Adding the same
    /// node twice is fine (two programs share a library); a different one
    /// at the same path is a mistake.
    fn insert(&mut self, path: String, node: Node) -> Result<()> {
        let mut parent = path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            parent = p;
            match self.nodes.get(parent) {
                Some(Node::Dir(_)) => break,
                Some(_) => bail!("image path {parent} is not a directory (adding {path})"),
                None => {
                    self.nodes.insert(parent.to_owned(), Node::Dir(0o755));
                }
            }
        }
        match self.nodes.get(&path) {
            Some(old) if *old == node => Ok(()),
            Some(_) => bail!("image path {path} added twice with different contents"),
            None => {
                self.nodes.insert(path, node);
                Ok(())
            }
        }
    }

    /// Gives `path` and everything under it to user and group `id` (the
    /// inner container's base rootfs belongs to the container's root).
    pub fn own(&mut self, path: &str, id: u32) -> Result<()> {
        self.owners.push((normalize(path)?, id));
        Ok(())
    }

    /// The owner of `path`: the deepest subtree given to someone, else 0.
    fn owner(&self, path: &str) -> u32 {
        self.owners
            .iter()
            .filter(|(p, _)| {
                path == p
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|r| r.starts_with('/'))
            })
            .max_by_key(|(p, _)| p.len())
            .map_or(0, |(_, id)| *id)
    }

    /// The node at `path`, if any.
    #[cfg(test)]
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path.trim_start_matches('/'))
    }

    /// How many entries the archive will have.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// SHA-256 over every entry's path, mode and contents, `except` one
    /// path (the file that will hold the result). Each field is length
    /// prefixed so that no two trees hash alike by shifting bytes.
    pub fn digest(&self, except: &str) -> [u8; 32] {
        let mut hash = Sha256::new();
        for entry in self.entries() {
            if entry.path == except.trim_start_matches('/') {
                continue;
            }
            let rdev = match entry.kind {
                cpio::Kind::CharDev { major, minor } => [major, minor],
                _ => [0, 0],
            };
            hash.update((entry.path.len() as u64).to_le_bytes());
            hash.update(entry.path.as_bytes());
            hash.update(entry.mode().to_le_bytes());
            hash.update(entry.owner.to_le_bytes());
            hash.update(rdev[0].to_le_bytes());
            hash.update(rdev[1].to_le_bytes());
            hash.update((entry.data().len() as u64).to_le_bytes());
            hash.update(entry.data());
        }
        hash.finalize().into()
    }

    /// Writes the tree as a newc cpio archive; returns its size.
    pub fn write_cpio(&self, out: impl Write) -> std::io::Result<u64> {
        cpio::write(out, self.entries())
    }

    fn entries(&self) -> impl Iterator<Item = cpio::Entry<'_>> {
        self.nodes.iter().map(|(path, node)| {
            let (perm, kind) = match node {
                Node::Dir(perm) => (*perm, cpio::Kind::Dir),
                Node::File { perm, data } => (*perm, cpio::Kind::File(data)),
                Node::Symlink(target) => (0o777, cpio::Kind::Symlink(target)),
                Node::CharDev { perm, major, minor } => (
                    *perm,
                    cpio::Kind::CharDev {
                        major: *major,
                        minor: *minor,
                    },
                ),
            };
            cpio::Entry {
                path,
                perm,
                owner: self.owner(path),
                kind,
            }
        })
    }
}

/// `/usr/sbin/nft` → `usr/sbin/nft`; refuses what the kernel's unpacker
/// would treat differently (`..`, `.`, empty components).
fn normalize(path: &str) -> Result<String> {
    let rel = path.trim_start_matches('/');
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("bad image path {path:?}");
    }
    Ok(rel.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_are_made() {
        let mut t = Tree::default();
        t.file("/usr/sbin/nft", 0o755, b"x".to_vec()).unwrap();
        t.file("/usr-extra", 0o644, Vec::new()).unwrap();
        t.symlink("usr/sbin/mkfs.ext4", "mke2fs").unwrap();
        let paths: Vec<&str> = t.entries().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "usr",
                "usr-extra",
                "usr/sbin",
                "usr/sbin/mkfs.ext4",
                "usr/sbin/nft"
            ]
        );
    }

    #[test]
    fn same_node_twice_is_fine_a_different_one_is_not() {
        let mut t = Tree::default();
        t.file("lib/libc.so.6", 0o755, b"elf".to_vec()).unwrap();
        t.file("lib/libc.so.6", 0o755, b"elf".to_vec()).unwrap();
        assert!(t.file("lib/libc.so.6", 0o755, b"other".to_vec()).is_err());
        assert!(t.file("lib/libc.so.6/x", 0o644, Vec::new()).is_err());
    }

    #[test]
    fn an_owned_subtree_and_only_it_gets_the_owner() {
        let mut t = Tree::default();
        t.file("usr/share/rootfs/bin/sh", 0o755, b"x".to_vec())
            .unwrap();
        t.file("usr/share/rootfs2", 0o644, Vec::new()).unwrap();
        let before = t.digest("none");
        t.own("usr/share/rootfs", 100_000).unwrap();
        let owners: Vec<(&str, u32)> = t.entries().map(|e| (e.path, e.owner)).collect();
        assert!(owners.contains(&("usr/share/rootfs", 100_000)));
        assert!(owners.contains(&("usr/share/rootfs/bin/sh", 100_000)));
        assert!(owners.contains(&("usr/share/rootfs2", 0)));
        assert!(owners.contains(&("usr/share", 0)));
        assert_ne!(t.digest("none"), before, "the owner is part of the version");
    }

    #[test]
    fn explicit_dir_mode_wins() {
        let mut t = Tree::default();
        t.file("tmp/x", 0o644, Vec::new()).unwrap();
        t.dir("tmp", 0o1777).unwrap();
        assert_eq!(t.get("/tmp"), Some(&Node::Dir(0o1777)));
    }

    #[test]
    fn rejects_odd_paths() {
        let mut t = Tree::default();
        for bad in ["", "/", "a//b", "a/../b", "./a"] {
            assert!(t.dir(bad, 0o755).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn digest_skips_the_version_file_and_sees_modes() {
        let mut a = Tree::default();
        a.file("init", 0o755, b"x".to_vec()).unwrap();
        a.dir("etc", 0o755).unwrap();
        let base = a.digest("etc/version");
        a.file("etc/version", 0o644, b"1".to_vec()).unwrap();
        assert_eq!(a.digest("/etc/version"), base);
        let mut b = Tree::default();
        b.file("init", 0o644, b"x".to_vec()).unwrap();
        b.dir("etc", 0o755).unwrap();
        assert_ne!(b.digest("etc/version"), base);
    }
}
