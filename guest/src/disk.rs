//! The VM's disks: the platform's (service definitions, logs,
//! certificates; ext4) and the user's (the container's writable layer and
//! its checkpoints; btrfs, see [`crate::storage`]), on virtio disks found
//! by serial.
//!
//! A disk is formatted only when it holds nothing: its first 128 KiB and
//! the places filesystems mirror their superblocks are zero (a new VM's
//! sparse image). Otherwise it is mounted as the
//! filesystem its superblock says (an older VM's ext4 user disk stays
//! ext4). An ext4 disk that does not mount gets the repair a user would
//! run, `e2fsck -p` (preen: only the fixes that need no decision), and one
//! more mount; btrfs has no such preen. A disk that still does not mount
//! is *refused*: left exactly as it is, the reason logged on the console
//! and reported by `GET /v1/status` ([`DiskReport`]), and the rest of the
//! platform serves on. Formatting a disk because it did not mount would
//! wipe the user's files for a repairable checksum or an `EBUSY`.
//!
//! The steps go through [`DiskOps`], so the decisions are tested without
//! root or disks; [`System`] is the real one (`mount(2)`, `e2fsck`,
//! `mkfs.ext4`, `mkfs.btrfs`).

use std::path::Path;

use nix::mount::MsFlags;

/// How much of a disk's start [`probe`] reads: past the partition
/// tables, the ext2/3/4 superblock (1 KiB in) and btrfs's (64 KiB in).
const SIGNATURE_BYTES: usize = 128 << 10;
/// The ext2/3/4 magic (0xEF53, little-endian) in the superblock at 1 KiB.
const EXT_MAGIC_AT: usize = 1024 + 0x38;
/// btrfs's magic in its superblock at 64 KiB.
const BTRFS_MAGIC_AT: usize = (64 << 10) + 0x40;
const BTRFS_MAGIC: &[u8; 8] = b"_BHRfS_M";
/// btrfs's first mirror of its superblock, at 64 MiB: mkfs.btrfs zeroes
/// the disk's first MiB around the primary one, so a btrfs disk whose
/// primary superblock is lost reads as zeros in [`SIGNATURE_BYTES`] — and
/// must not be taken for a blank one.
const BTRFS_MIRROR: u64 = 64 << 20;
/// More places a filesystem keeps copies of its superblock (ext4's first
/// backup, block group 1 with 4 KiB blocks, at 128 MiB); a new disk is
/// zero there too.
const OTHER_SAMPLES: [u64; 1] = [128 << 20];
/// How much is read at each of those places.
const SAMPLE_BYTES: usize = 4 << 10;

/// A filesystem the VM's disks hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    /// The platform's disk, and user disks made before btrfs.
    Ext4,
    /// The user's disk: subvolumes and snapshots for checkpoints.
    Btrfs,
}

impl Fs {
    /// The name `mount(2)` takes.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Btrfs => "btrfs",
        }
    }
}

/// What a disk's first bytes say it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// All zero: a new VM's sparse disk, with nothing to lose.
    Blank,
    /// A filesystem nestbox knows.
    Holds(Fs),
    /// Something else (a partition table, another filesystem).
    Unknown,
}

/// What `device` holds, from its first [`SIGNATURE_BYTES`] and the
/// places superblocks are mirrored ([`BTRFS_MIRROR`], [`OTHER_SAMPLES`]):
/// blank only if all of them are zero.
///
/// # Errors
/// Why the device cannot be read.
pub fn probe(device: &Path) -> std::io::Result<Probe> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(device)?;
    let mut start = Vec::with_capacity(SIGNATURE_BYTES);
    (&file)
        .take(SIGNATURE_BYTES as u64)
        .read_to_end(&mut start)?;
    // A place past the device's end reads as nothing.
    let sample = |at: u64| -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; SAMPLE_BYTES];
        let n = file.read_at(&mut buf, at)?;
        buf.truncate(n);
        Ok(buf)
    };
    let mirror = sample(BTRFS_MIRROR)?;
    if start.get(BTRFS_MAGIC_AT..BTRFS_MAGIC_AT + 8) == Some(BTRFS_MAGIC) {
        return Ok(Probe::Holds(Fs::Btrfs));
    }
    if start.get(EXT_MAGIC_AT..EXT_MAGIC_AT + 2) == Some(&[0x53, 0xef]) {
        return Ok(Probe::Holds(Fs::Ext4));
    }
    if mirror.get(0x40..0x48) == Some(BTRFS_MAGIC) {
        // The primary superblock is lost; its mirror says what this was.
        return Ok(Probe::Holds(Fs::Btrfs));
    }
    let mut zero = start.iter().chain(&mirror).all(|&b| b == 0);
    for at in OTHER_SAMPLES {
        zero = zero && sample(at)?.iter().all(|&b| b == 0);
    }
    Ok(if zero { Probe::Blank } else { Probe::Unknown })
}

/// How a blank disk is formatted.
#[derive(Clone, Copy, Debug)]
pub struct Format {
    /// The filesystem.
    pub fs: Fs,
    /// `mkfs.<fs>`'s arguments before the device.
    pub args: &'static [&'static str],
}

pub use nestbox_api::types::{DiskReport, DiskState};

/// What `e2fsck -p` ended with (its exit status is a bit set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fsck {
    /// The exit status.
    pub code: i32,
    /// What it printed, trimmed.
    pub output: String,
}

impl Fsck {
    /// Whether the filesystem is consistent now: 0 (clean), 1 (errors
    /// corrected), 2 (corrected, reboot wanted, for a mounted root).
    /// 4 (errors left), 8 (operational error, such as no ext superblock)
    /// and above mean it is not.
    #[must_use]
    pub fn consistent(&self) -> bool {
        (0..=2).contains(&self.code)
    }
}

/// The steps of mounting a disk, so that their order is tested without
/// root.
pub trait DiskOps {
    /// `mount(2)` as `fs`; the error's text.
    ///
    /// # Errors
    /// Why it did not mount.
    fn mount(&mut self, device: &Path, dir: &Path, fs: Fs) -> Result<(), String>;
    /// What the disk holds.
    ///
    /// # Errors
    /// It cannot be read.
    fn probe(&mut self, device: &Path) -> Result<Probe, String>;
    /// `e2fsck -p`.
    ///
    /// # Errors
    /// It could not be run at all.
    fn fsck(&mut self, device: &Path) -> Result<Fsck, String>;
    /// `mkfs.<fs> ARGS DEVICE`.
    ///
    /// # Errors
    /// It failed.
    fn mkfs(&mut self, device: &Path, format: Format) -> Result<(), String>;
}

/// Mounts `device` on `dir`: formats it as `format` says only if blank,
/// mounts the filesystem it holds otherwise (an older VM's ext4 user disk
/// stays ext4), repairs an ext4 one that does not mount with `e2fsck -p`,
/// and otherwise refuses it (`Err`, with the reason; the disk is not
/// written).
///
/// # Errors
/// The reason the disk is refused.
pub fn mount_disk(
    ops: &mut impl DiskOps,
    device: &Path,
    dir: &Path,
    format: Format,
) -> Result<(DiskState, Option<String>), String> {
    let shown = device.display();
    let fs = match ops
        .probe(device)
        .map_err(|e| format!("read {shown}: {e}"))?
    {
        Probe::Blank => {
            ops.mkfs(device, format)?;
            ops.mount(device, dir, format.fs)
                .map_err(|e| format!("mount the new filesystem on {shown}: {e}"))?;
            return Ok((DiskState::Formatted, None));
        }
        Probe::Unknown => {
            return Err(format!(
                "{shown} holds data that is neither ext4 nor btrfs (a partition table, another \
                 filesystem); the disk is left untouched: attach a blank one or the VM's own"
            ));
        }
        Probe::Holds(fs) => fs,
    };
    let first = match ops.mount(device, dir, fs) {
        Ok(()) => return Ok((DiskState::Mounted, None)),
        Err(e) => e,
    };
    if fs == Fs::Btrfs {
        // `btrfs check --repair` is no preen: it may make things worse.
        return Err(format!(
            "{shown} holds btrfs but does not mount ({first}); the disk is left untouched: \
             inspect it with `btrfs check --readonly`, restore a lost superblock from its \
             mirror with `btrfs rescue super-recover`, or mount it with `-o rescue=all,ro` to \
             copy the data off"
        ));
    }
    tracing::warn!(device = %shown, err = %first, "the disk does not mount; running e2fsck -p");
    let fsck = ops.fsck(device)?;
    if !fsck.consistent() {
        return Err(format!(
            "{shown} holds data but does not mount ({first}), and `e2fsck -p` cannot repair it \
             without a decision (exit {}: {}); the disk is left untouched: repair it by hand \
             (e2fsck, or e2fsck -b 32768 for a lost superblock) or attach another",
            fsck.code, fsck.output
        ));
    }
    match ops.mount(device, dir, fs) {
        Ok(()) => Ok((DiskState::Repaired, Some(fsck.output))),
        Err(e) => Err(format!(
            "{shown} does not mount ({first}); `e2fsck -p` found it consistent ({}) but it \
             still does not mount ({e}); the disk is left untouched",
            fsck.output
        )),
    }
}

/// The real steps.
#[derive(Debug, Default)]
pub struct System;

impl DiskOps for System {
    fn mount(&mut self, device: &Path, dir: &Path, fs: Fs) -> Result<(), String> {
        nix::mount::mount(
            Some(device),
            dir,
            Some(fs.name()),
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| format!("mount on {}: {e}", dir.display()))
    }

    fn probe(&mut self, device: &Path) -> Result<Probe, String> {
        probe(device).map_err(|e| e.to_string())
    }

    fn fsck(&mut self, device: &Path) -> Result<Fsck, String> {
        let out = std::process::Command::new("e2fsck")
            .arg("-p")
            .arg(device)
            .output()
            .map_err(|e| format!("run e2fsck (e2fsprogs): {e}"))?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let output = text.split_whitespace().collect::<Vec<_>>().join(" ");
        Ok(Fsck {
            // Killed by a signal: as bad as an operational error.
            code: out.status.code().unwrap_or(8),
            output,
        })
    }

    fn mkfs(&mut self, device: &Path, format: Format) -> Result<(), String> {
        let (program, package) = match format.fs {
            Fs::Ext4 => ("mkfs.ext4", "e2fsprogs"),
            Fs::Btrfs => ("mkfs.btrfs", "btrfs-progs"),
        };
        let status = std::process::Command::new(program)
            .arg("-q")
            .args(format.args)
            .arg(device)
            .status()
            .map_err(|e| format!("run {program} ({package}): {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{program} {} failed: {status}", device.display()))
        }
    }
}

/// Brings up the disk `role` (blocking: run it off the runtime thread):
/// finds the device, creates the mount point and mounts it as
/// [`mount_disk`] says, logging the outcome.
#[must_use]
pub fn bring_up(role: &'static str, spec: &Path, dir: &Path, format: Format) -> DiskReport {
    let mut report = DiskReport {
        role: role.to_owned(),
        device: spec.display().to_string(),
        mount: dir.display().to_string(),
        state: DiskState::Refused,
        detail: None,
    };
    let outcome = crate::init::resolve_device(spec).and_then(|device| {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        mount_disk(&mut System, &device, dir, format)
    });
    match outcome {
        Ok((state, detail)) => {
            tracing::info!(role, device = %report.device, ?state, "disk mounted");
            report.state = state;
            report.detail = detail;
        }
        Err(why) => {
            // The console shows this even without a log reader.
            eprintln!("nestbox-guest: the {role} disk is refused: {why}");
            tracing::error!(role, device = %report.device, %why, "disk refused");
            report.detail = Some(why);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk in memory: what each step returns, and what was done.
    #[derive(Default)]
    struct Fake {
        mounts: Vec<Result<(), String>>,
        probe: Option<Probe>,
        fsck: Option<Fsck>,
        done: Vec<&'static str>,
    }

    impl DiskOps for Fake {
        fn mount(&mut self, _: &Path, _: &Path, fs: Fs) -> Result<(), String> {
            self.done.push(if fs == Fs::Btrfs {
                "mount btrfs"
            } else {
                "mount"
            });
            self.mounts.remove(0)
        }
        fn probe(&mut self, _: &Path) -> Result<Probe, String> {
            Ok(self.probe.unwrap_or(Probe::Holds(Fs::Ext4)))
        }
        fn fsck(&mut self, _: &Path) -> Result<Fsck, String> {
            self.done.push("fsck");
            Ok(self.fsck.clone().expect("fsck not expected"))
        }
        fn mkfs(&mut self, _: &Path, format: Format) -> Result<(), String> {
            self.done.push(if format.fs == Fs::Btrfs {
                "mkfs btrfs"
            } else {
                "mkfs"
            });
            Ok(())
        }
    }

    fn run(fake: &mut Fake) -> Result<(DiskState, Option<String>), String> {
        mount_disk(fake, Path::new("/dev/vdb"), Path::new("/data"), EXT4)
    }

    const EXT4: Format = Format {
        fs: Fs::Ext4,
        args: &[],
    };

    fn fsck(code: i32) -> Fsck {
        let output = format!("exit {code}");
        Fsck { code, output }
    }

    #[test]
    fn a_disk_that_mounts_is_only_mounted() {
        let mut f = Fake {
            mounts: vec![Ok(())],
            ..Fake::default()
        };
        assert_eq!(run(&mut f).unwrap().0, DiskState::Mounted);
        assert_eq!(f.done, ["mount"]);
    }

    #[test]
    fn only_a_blank_disk_is_formatted() {
        let mut f = Fake {
            mounts: vec![Ok(())],
            probe: Some(Probe::Blank),
            ..Fake::default()
        };
        assert_eq!(run(&mut f).unwrap().0, DiskState::Formatted);
        assert_eq!(f.done, ["mkfs", "mount"]);
        let mut f = Fake {
            mounts: vec![Ok(())],
            probe: Some(Probe::Blank),
            ..Fake::default()
        };
        let btrfs = Format {
            fs: Fs::Btrfs,
            args: &[],
        };
        let state = mount_disk(&mut f, Path::new("/dev/vdc"), Path::new("/user"), btrfs);
        assert_eq!(state.unwrap().0, DiskState::Formatted);
        assert_eq!(f.done, ["mkfs btrfs", "mount btrfs"]);
    }

    #[test]
    fn a_disk_keeps_the_filesystem_it_holds() {
        // An older VM's ext4 user disk stays ext4 under a btrfs format.
        let mut f = Fake {
            mounts: vec![Ok(())],
            ..Fake::default()
        };
        let btrfs = Format {
            fs: Fs::Btrfs,
            args: &[],
        };
        let state = mount_disk(&mut f, Path::new("/dev/vdc"), Path::new("/user"), btrfs);
        assert_eq!(state.unwrap().0, DiskState::Mounted);
        assert_eq!(f.done, ["mount"]);
    }

    #[test]
    fn a_btrfs_or_unknown_disk_that_does_not_mount_is_refused_untouched() {
        let mut f = Fake {
            mounts: vec![Err("EUCLEAN".into())],
            probe: Some(Probe::Holds(Fs::Btrfs)),
            ..Fake::default()
        };
        let why = run(&mut f).unwrap_err();
        assert!(
            why.contains("left untouched") && why.contains("btrfs check"),
            "{why}"
        );
        assert_eq!(f.done, ["mount btrfs"], "no fsck, no mkfs");
        let mut f = Fake {
            probe: Some(Probe::Unknown),
            ..Fake::default()
        };
        assert!(run(&mut f).unwrap_err().contains("neither ext4 nor btrfs"));
        assert!(f.done.is_empty());
    }

    #[test]
    fn a_repairable_disk_is_repaired_not_formatted() {
        for code in [0, 1, 2] {
            let mut f = Fake {
                mounts: vec![Err("EUCLEAN".into()), Ok(())],
                fsck: Some(fsck(code)),
                ..Fake::default()
            };
            let (state, detail) = run(&mut f).unwrap();
            assert_eq!(state, DiskState::Repaired);
            assert_eq!(detail.as_deref(), Some(format!("exit {code}").as_str()));
            assert_eq!(f.done, ["mount", "fsck", "mount"]);
        }
    }

    #[test]
    fn a_disk_that_cannot_be_repaired_is_refused_untouched() {
        for code in [4, 8, 12, 128] {
            let mut f = Fake {
                mounts: vec![Err("EINVAL".into())],
                fsck: Some(fsck(code)),
                ..Fake::default()
            };
            let why = run(&mut f).unwrap_err();
            assert!(why.contains("left untouched"), "{why}");
            assert!(why.contains("EINVAL"), "{why}");
            assert_eq!(f.done, ["mount", "fsck"], "no mkfs, no second mount");
        }
        let mut f = Fake {
            mounts: vec![Err("EBUSY".into()), Err("EBUSY".into())],
            fsck: Some(fsck(0)),
            ..Fake::default()
        };
        assert!(run(&mut f).unwrap_err().contains("still does not mount"));
        assert_eq!(f.done, ["mount", "fsck", "mount"]);
    }

    #[test]
    fn the_start_of_a_disk_tells_blank_ext4_and_btrfs() {
        let path = std::env::temp_dir().join(format!("nb-blank-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(probe(&path).unwrap(), Probe::Blank);
        let mut ext4 = vec![0u8; 1 << 20];
        // The ext4 superblock's magic, 0xEF53 at 1080.
        ext4[1080] = 0x53;
        ext4[1081] = 0xef;
        std::fs::write(&path, ext4).unwrap();
        assert_eq!(probe(&path).unwrap(), Probe::Holds(Fs::Ext4));
        let mut btrfs = vec![0u8; 1 << 20];
        btrfs[BTRFS_MAGIC_AT..BTRFS_MAGIC_AT + 8].copy_from_slice(BTRFS_MAGIC);
        std::fs::write(&path, btrfs).unwrap();
        assert_eq!(probe(&path).unwrap(), Probe::Holds(Fs::Btrfs));
        std::fs::write(&path, [0u8, 1, 2]).unwrap();
        assert_eq!(probe(&path).unwrap(), Probe::Unknown);
        // A btrfs disk whose primary superblock is lost is still btrfs (its
        // mirror at 64 MiB), never blank; data far in makes a disk not blank.
        let sparse = |at: u64, bytes: &[u8]| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(200 << 20).unwrap();
            f.write_all_at(bytes, at).unwrap();
        };
        sparse(BTRFS_MIRROR + 0x40, BTRFS_MAGIC);
        assert_eq!(probe(&path).unwrap(), Probe::Holds(Fs::Btrfs));
        sparse(OTHER_SAMPLES[0] + 100, b"data");
        assert_eq!(probe(&path).unwrap(), Probe::Unknown);
        sparse(190 << 20, b"");
        assert_eq!(probe(&path).unwrap(), Probe::Blank);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_real_steps_repair_a_bad_checksum_and_refuse_a_lost_superblock() {
        // Without root the loop mount cannot be tried; e2fsck on an image
        // file can (e2fsprogs is a build dependency of the image).
        let dir = std::env::temp_dir().join(format!("nb-fsck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        System
            .mkfs(
                &img,
                Format {
                    fs: Fs::Ext4,
                    args: &["-F"],
                },
            )
            .expect("mkfs.ext4 (apt-get install e2fsprogs)");
        assert!(System.fsck(&img).unwrap().consistent());
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[1024..2048].fill(0);
        std::fs::write(&img, &bytes).unwrap();
        let lost = System.fsck(&img).unwrap();
        assert!(!lost.consistent(), "{lost:?}");
        assert_eq!(
            std::fs::read(&img).unwrap(),
            bytes,
            "e2fsck -p changed nothing"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
