//! The checkpoint store on a real btrfs filesystem (a loop device on the
//! test machine: no container, nothing of the machine's is touched but
//! the mounts the test makes under its own directory): snapshots,
//! read-only views over a base, restore by an atomic swap, ids that are
//! never reused, records rebuilt from the disk, a full disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use nestbox_guest::storage::checkpoints::{Paths, Store};
use nestbox_guest::storage::{StoreError, layer};

/// A btrfs filesystem on a loop device under a directory of the test's,
/// unmounted (views first) and removed on drop.
struct Btrfs {
    dir: PathBuf,
}

impl Btrfs {
    fn new(tag: &str, mib: u64) -> Self {
        nestbox_tests::require_root();
        nestbox_tests::require_tool("mkfs.btrfs", "btrfs-progs");
        let dir = std::env::temp_dir().join(format!("nb-storage-{tag}-{}", std::process::id()));
        // A previous run's, if it left one (none: umount says so, quietly).
        let _ = Command::new("umount")
            .arg("-R")
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("user")).unwrap();
        std::fs::create_dir_all(dir.join("base/etc")).unwrap();
        std::fs::write(dir.join("base/etc/base"), "from the image").unwrap();
        let img = dir.join("user.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        run("mkfs.btrfs", &["-q", "-f", img.to_str().unwrap()]);
        run(
            "mount",
            &[
                "-o",
                "loop",
                img.to_str().unwrap(),
                dir.join("user").to_str().unwrap(),
            ],
        );
        Self { dir }
    }

    fn user(&self) -> PathBuf {
        self.dir.join("user")
    }

    fn paths(&self) -> Paths {
        Paths {
            user: self.user(),
            index_dir: self.dir.join("platform/checkpoints"),
            base: self.dir.join("base"),
            views: Some(self.dir.join("views")),
            image: Some("test-image".into()),
        }
    }

    fn upper(&self) -> PathBuf {
        layer::upper(&self.user())
    }

    fn view(&self, id: &str) -> PathBuf {
        self.dir.join("views").join(id)
    }

    /// As a VM whose platform disk is replaced: no index, no views.
    fn lose_the_platform_disk(&self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("views"))
            .status();
        std::fs::remove_dir_all(self.dir.join("platform")).unwrap();
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("views"))
            .status();
        let _ = Command::new("umount").arg(self.dir.join("user")).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[test]
fn checkpoints_snapshot_show_restore_and_never_reuse_an_id() {
    let fs = Btrfs::new("cycle", 256);
    layer::prepare(&fs.user()).unwrap();
    std::fs::create_dir_all(fs.upper().join("app")).unwrap();
    std::fs::write(fs.upper().join("app/a"), "one").unwrap();
    std::fs::write(fs.upper().join("app/b"), "bee").unwrap();
    let store = Store::open(fs.paths()).unwrap();
    let mut heard = None;
    let v0 = store
        .create(Some("first".into()), |id| heard = Some(id.to_owned()))
        .unwrap();
    assert_eq!((v0.id.as_str(), heard.as_deref()), ("v0", Some("v0")));
    assert_eq!(v0.size_bytes, 6);
    assert_eq!(v0.image.as_deref(), Some("test-image"));
    assert_eq!(v0.mounted_at.as_deref(), Some("/.nestbox/checkpoints/v0"));

    std::fs::write(fs.upper().join("app/a"), "two").unwrap();
    std::fs::remove_file(fs.upper().join("app/b")).unwrap();
    std::fs::write(fs.upper().join("app/c"), "new").unwrap();
    let v1 = store.create(None, |_| {}).unwrap();
    assert_eq!((v1.id.as_str(), v1.parent.as_deref()), ("v1", Some("v0")));

    // The views: v0's files over the base, read-only.
    assert_eq!(read(&fs.view("v0").join("app/a")).as_deref(), Some("one"));
    assert_eq!(read(&fs.view("v0").join("app/b")).as_deref(), Some("bee"));
    assert_eq!(
        read(&fs.view("v0").join("etc/base")).as_deref(),
        Some("from the image")
    );
    assert_eq!(read(&fs.view("v1").join("app/a")).as_deref(), Some("two"));
    assert!(!fs.view("v1").join("app/b").exists());
    let write = std::fs::write(fs.view("v0").join("app/a"), "tamper").unwrap_err();
    assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");
    let snapshot = fs.user().join("checkpoints/v0/upper/app/a");
    let write = std::fs::write(&snapshot, "tamper").unwrap_err();
    assert_eq!(
        write.raw_os_error(),
        Some(libc::EROFS),
        "the snapshot itself: {write}"
    );

    // Restore v0: exactly v0's tree, whatever came after.
    let restored = store.restore("v0").unwrap();
    assert_eq!(restored.id, "v0");
    assert_eq!(read(&fs.upper().join("app/a")).as_deref(), Some("one"));
    assert_eq!(read(&fs.upper().join("app/b")).as_deref(), Some("bee"));
    assert!(!fs.upper().join("app/c").exists());
    assert!(nestbox_guest::storage::btrfs::is_subvolume(
        &fs.user().join("layer")
    ));
    assert!(
        !fs.user().join("layer.swap").exists(),
        "the old layer is deleted"
    );
    assert_eq!(store.list().head.as_deref(), Some("v0"));
    // The restored layer is writable and leaves the checkpoint alone.
    std::fs::write(fs.upper().join("app/a"), "three").unwrap();
    assert_eq!(read(&fs.view("v0").join("app/a")).as_deref(), Some("one"));

    // Deleting v1 frees its id for nobody.
    store.delete("v1").unwrap();
    assert!(!fs.view("v1").exists() && !fs.user().join("checkpoints/v1").exists());
    assert!(matches!(store.get("v1"), Err(StoreError::NotFound(_))));
    let v2 = store.create(None, |_| {}).unwrap();
    assert_eq!((v2.id.as_str(), v2.parent.as_deref()), ("v2", Some("v0")));
    assert!(matches!(store.restore("v9"), Err(StoreError::NotFound(_))));
    assert!(matches!(
        store.delete("../layer"),
        Err(StoreError::NotFound(_))
    ));
    drop(store);

    // The platform's disk lost: the snapshots are adopted, none deleted,
    // and the next id is still new.
    fs.lose_the_platform_disk();
    let store = Store::open(fs.paths()).unwrap();
    let ids: Vec<String> = store.list().checkpoints.into_iter().map(|c| c.id).collect();
    assert_eq!(ids, ["v0", "v2"]);
    assert_eq!(store.get("v0").unwrap().size_bytes, 6);
    // Its time is the snapshot's own (its root directory's is the layer's).
    let adopted = store.get("v0").unwrap().created_ms;
    assert!(
        adopted.abs_diff(v0.created_ms) < 2_000,
        "{adopted} vs {}",
        v0.created_ms
    );
    assert_eq!(read(&fs.view("v2").join("app/a")).as_deref(), Some("three"));
    assert_eq!(store.create(None, |_| {}).unwrap().id, "v3");
}

#[test]
fn only_the_five_most_recent_checkpoints_are_shown() {
    let fs = Btrfs::new("views", 256);
    layer::prepare(&fs.user()).unwrap();
    std::fs::create_dir_all(fs.upper()).unwrap();
    let store = Store::open(fs.paths()).unwrap();
    for n in 0..7 {
        std::fs::write(fs.upper().join("n"), n.to_string()).unwrap();
        store.create(None, |_| {}).unwrap();
    }
    let shown: Vec<String> = store
        .list()
        .checkpoints
        .into_iter()
        .filter(|c| c.mounted_at.is_some())
        .map(|c| c.id)
        .collect();
    assert_eq!(shown, ["v2", "v3", "v4", "v5", "v6"]);
    assert!(!fs.view("v1").exists());
    assert_eq!(read(&fs.view("v2").join("n")).as_deref(), Some("2"));
    // Deleting a shown one brings an older one back into view.
    store.delete("v6").unwrap();
    assert_eq!(read(&fs.view("v1").join("n")).as_deref(), Some("1"));
}

#[test]
fn a_full_disk_fails_cleanly_and_never_half_swaps_the_layer() {
    let fs = Btrfs::new("full", 256);
    layer::prepare(&fs.user()).unwrap();
    std::fs::create_dir_all(fs.upper()).unwrap();
    std::fs::write(fs.upper().join("keep"), "v0's").unwrap();
    let store = Store::open(fs.paths()).unwrap();
    store.create(None, |_| {}).unwrap();
    std::fs::write(fs.upper().join("keep"), "after").unwrap();
    // Fill the disk as a runaway build would.
    let mut filler = std::fs::File::create(fs.upper().join("filler")).unwrap();
    let block = vec![0x5au8; 1 << 20];
    loop {
        use std::io::Write;
        if filler
            .write_all(&block)
            .and_then(|()| filler.sync_data())
            .is_err()
        {
            break;
        }
    }
    drop(filler);
    // A checkpoint on a full disk: made, or refused as full with nothing
    // left behind.
    match store.create(None, |_| {}) {
        Ok(c) => assert_eq!(c.id, "v1"),
        Err(e) => {
            assert!(matches!(e, StoreError::Full(_)), "{e}");
            assert!(e.to_string().contains("full"), "{e}");
            assert!(!fs.user().join("checkpoints/v1").exists());
        }
    }
    // A restore: the layer is v0's, or the one before, never neither.
    match store.restore("v0") {
        Ok(_) => assert_eq!(read(&fs.upper().join("keep")).as_deref(), Some("v0's")),
        Err(e) => {
            assert_eq!(e.code(), "insufficient_storage", "{e}");
            assert_eq!(read(&fs.upper().join("keep")).as_deref(), Some("after"));
        }
    }
    assert!(nestbox_guest::storage::btrfs::is_subvolume(
        &fs.user().join("layer")
    ));
}

#[test]
fn scheduled_checkpoints_keep_only_the_last_few_and_never_the_users() {
    let fs = Btrfs::new("auto", 256);
    layer::prepare(&fs.user()).unwrap();
    std::fs::create_dir_all(fs.upper()).unwrap();
    let store = Store::open(fs.paths()).unwrap();
    store.create(Some("mine".into()), |_| {}).unwrap();
    for n in 0..4 {
        std::fs::write(fs.upper().join("n"), n.to_string()).unwrap();
        let made = store.create_auto(2).unwrap();
        assert_eq!(made.id, format!("auto-{n}"));
    }
    let ids: Vec<String> = store.list().checkpoints.into_iter().map(|c| c.id).collect();
    assert_eq!(ids, ["v0", "auto-2", "auto-3"]);
    assert!(!fs.user().join("checkpoints/auto-0").exists());
    assert_eq!(read(&fs.view("auto-3").join("n")).as_deref(), Some("3"));
    assert_eq!(store.list().head.as_deref(), Some("auto-3"));
    // A user checkpoint after them goes on from its own counter.
    assert_eq!(store.create(None, |_| {}).unwrap().id, "v1");
    drop(store);
    // Rebuilt from the disk alone, both counters go on past what is there.
    fs.lose_the_platform_disk();
    let store = Store::open(fs.paths()).unwrap();
    let ids: Vec<String> = store.list().checkpoints.into_iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(store.create_auto(5).unwrap().id, "auto-4");
    assert_eq!(store.create(None, |_| {}).unwrap().id, "v2");
}
