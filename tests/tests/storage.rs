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
            uploads: false,
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

/// Random bytes (a file whose chunks no other file shares).
fn random_file(path: &Path, mib: usize) {
    let mut data = vec![0u8; mib << 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut data).unwrap();
    std::fs::write(path, data).unwrap();
}

/// Waits until checkpoint `id` is durable (its last upload state on
/// timeout).
fn durable(store: &Store, id: &str) -> nestbox_api::types::Upload {
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(2);
    loop {
        let up = store.get(id).unwrap().upload.expect("uploads are on");
        if up.state == nestbox_api::types::UploadState::Durable {
            return up;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never became durable: {up:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn deletes_done(store: &Store) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
    while !store.remote_deletes().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the copies were never deleted"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Takes checkpoint `id` and kills the server while it uploads: the
/// upload must report the failure, and be durable once the server is back.
fn upload_through_a_server_kill(
    store: &Store,
    sw: &mut nestbox_tests::seaweed::Seaweed,
    id: &str,
) -> nestbox_api::types::Upload {
    use nestbox_api::types::UploadState;
    // The server killed during an upload: retried, then durable, and no
    // object in the bucket is half-written (`contents` hashes each).
    store.create(None, |_| {}).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
    loop {
        let up = store.get(id).unwrap().upload.unwrap();
        if up.state == UploadState::Uploading && up.sent_bytes > 0 {
            break;
        }
        assert_ne!(
            up.state,
            UploadState::Durable,
            "the checkpoint was uploaded before it could be interrupted"
        );
        assert!(std::time::Instant::now() < deadline, "{up:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    sw.kill();
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
    loop {
        let up = store.get(id).unwrap().upload.unwrap();
        if up.error.is_some() {
            break;
        }
        assert_ne!(
            up.state,
            UploadState::Durable,
            "durable with the server down"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no retry reported: {up:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    sw.resume();
    let up3 = durable(store, id);
    assert!(up3.attempts >= 2, "{up3:?}");
    up3
}

/// A new disk rebuilt from the bucket holds v3's files, byte for byte.
fn rebuild_matches(fs: &Btrfs, sw: &nestbox_tests::seaweed::Seaweed, rt: &tokio::runtime::Runtime) {
    use nestbox_guest::storage::{Storage, rebuild, remote};
    let fs2 = Btrfs::new("rebuilt", 512);
    let from = remote::From {
        url: "s3://nestbox/host/vm1".to_owned(),
        checkpoint: "v3".to_owned(),
    };
    let progress = Storage::default();
    let rebuilt = rt
        .block_on(rebuild::rebuild(
            &fs2.user(),
            &from,
            &sw.settings(),
            &progress,
        ))
        .unwrap()
        .expect("a blank disk is rebuilt");
    // The chain follows each base (v3 descends from v1 once v2 is gone);
    // v0, deleted at the source, is received for v1's stream, not kept.
    let ids: Vec<&str> = rebuilt.chain.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["v1", "v3"]);
    assert!(!fs2.user().join("checkpoints/v0").exists());
    assert_eq!(rebuilt.next, 4);
    // (c came in v2, whose checkpoint is gone; the layer kept the file.)
    for f in ["a", "b", "c", "d"] {
        assert_eq!(
            std::fs::read(fs2.upper().join(f)).unwrap(),
            std::fs::read(fs.upper().join(f)).unwrap(),
            "{f}"
        );
    }
    let r = progress.rebuild().unwrap();
    assert_eq!(r.state, nestbox_api::types::RebuildState::Done);
    assert_eq!(r.bytes, r.total_bytes);
    // A disk with a layer is not rebuilt again.
    assert!(
        rt.block_on(rebuild::rebuild(
            &fs2.user(),
            &from,
            &sw.settings(),
            &progress
        ))
        .unwrap()
        .is_none()
    );
}

#[test]
fn uploads_are_stored_once_collected_by_their_own_chunks_retried_and_rebuilt() {
    use nestbox_guest::storage::{Storage, upload};
    use nestbox_tests::seaweed::{self, Seaweed};

    let fs = Btrfs::new("objects", 512);
    nestbox_tests::require_tool("btrfs", "btrfs-progs");
    let ns = nestbox_tests::sandbox::Sandbox::new("s3").unwrap();
    ns.link_to_host("10.126.9.1/24", "10.126.9.2/24").unwrap();
    let mut sw = Seaweed::start("10.126.9.2", &fs.dir.join("s3"), Some(ns.netns()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let remote = sw.remote("host/vm1");
    let look = || rt.block_on(seaweed::contents(&remote));

    layer::prepare(&fs.user()).unwrap();
    std::fs::create_dir_all(fs.upper()).unwrap();
    random_file(&fs.upper().join("a"), 4);
    let store = Store::open(Paths {
        uploads: true,
        ..fs.paths()
    })
    .unwrap();
    let storage = Storage::default();
    storage.set(Ok(store));
    let store = storage.shared_store().unwrap();
    {
        let (storage, remote, settings) = (storage.clone(), remote.clone(), sw.settings());
        rt.block_on(async move { upload::spawn(storage, remote, &settings) });
    }

    // v0: a full stream, durable.
    store.create(None, |_| {}).unwrap();
    let up0 = durable(&store, "v0");
    assert_eq!((up0.base.as_deref(), up0.depth), (None, 0), "{up0:?}");
    let after_v0 = look();
    assert_eq!(after_v0.manifests.len(), 1);
    assert!(after_v0.chunk_bytes >= 4 << 20, "{}", after_v0.chunk_bytes);

    // v1 adds a file: its stream is incremental to v0, and v0's data
    // (in both checkpoints) is stored once.
    random_file(&fs.upper().join("b"), 4);
    store.create(None, |_| {}).unwrap();
    let up1 = durable(&store, "v1");
    assert_eq!((up1.base.as_deref(), up1.depth), (Some("v0"), 1), "{up1:?}");
    let after_v1 = look();
    let grew = after_v1.chunk_bytes - after_v0.chunk_bytes;
    assert!(
        (4 << 20..(4 << 20) + (512 << 10)).contains(&grew),
        "v1 stored {grew} new bytes for a 4 MiB file"
    );
    assert!(after_v0.chunks.iter().all(|c| after_v1.chunks.contains(c)));

    // v2 (the leaf) deleted: exactly its own chunks go, v0's and v1's stay.
    random_file(&fs.upper().join("c"), 2);
    store.create(None, |_| {}).unwrap();
    durable(&store, "v2");
    assert!(look().chunks.len() > after_v1.chunks.len());
    store.delete("v2").unwrap();
    deletes_done(&store);
    let after_delete = look();
    assert_eq!(after_delete.chunks, after_v1.chunks);
    let mut ids: Vec<&str> = after_delete
        .manifests
        .iter()
        .map(|m| m.id.as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["v0", "v1"]);
    // v0 deleted while v1's stream needs it: marked, nothing freed.
    store.delete("v0").unwrap();
    deletes_done(&store);
    let after_v0_gone = look();
    assert_eq!(after_v0_gone.chunks, after_v1.chunks);
    assert_eq!(after_v0_gone.manifests.len(), 2);
    assert_eq!(after_v0_gone.marks, ["v0"]);

    random_file(&fs.upper().join("d"), 48);
    let up3 = upload_through_a_server_kill(&store, &mut sw, "v3");
    // v2 is gone: v3 descends from v1, its stream is incremental to it.
    assert_eq!(up3.base.as_deref(), Some("v1"), "{up3:?}");
    let after_v3 = look();
    assert!(after_v3.manifests.iter().any(|m| m.id == "v3"));

    rebuild_matches(&fs, &sw, &rt);
    drop(sw);
}
