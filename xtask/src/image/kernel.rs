//! The guest kernel: Debian's `linux-image-cloud-amd64`, fetched with apt
//! into a cache directory, unpacked with `dpkg -x` and indexed with
//! `depmod` so that `modprobe -d` can resolve module dependencies in it.
//! The uncompressed kernel (PVH entry, faster to start under microvm) is
//! taken out of the bzImage's compressed payload.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::util;

/// The metapackage that names the current cloud kernel.
const METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Written into an unpacked kernel directory once it is complete.
const COMPLETE: &str = ".nestbox-complete";

/// An unpacked kernel package.
pub struct Kernel {
    /// `uname -r` of this kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The Debian package it came from, as `name=version`.
    pub package: String,
    /// Where the package is unpacked (`lib/modules/<release>` inside).
    pub root: PathBuf,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// The uncompressed kernel, when it could be extracted.
    pub vmlinux: Option<PathBuf>,
}

/// The current cloud kernel, unpacked under `cache` (downloaded and
/// unpacked only when that exact package version is not there yet).
pub fn fetch(cache: &Path) -> Result<Kernel> {
    let (name, version) = candidate()?;
    let release = name
        .strip_prefix("linux-image-")
        .context("kernel package name")?
        .to_owned();
    // apt writes an epoch's ':' as %3a in file names; do the same.
    let key = format!("{name}_{}", version.replace(':', "%3a"));
    let root = cache.join(&key);
    if root.join(COMPLETE).exists() {
        eprintln!("kernel {release}: cached in {}", root.display());
    } else {
        let deb = download(cache, &name, &version, &key)?;
        unpack(&deb, &root, &release)?;
    }
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    ensure!(vmlinuz.exists(), "{} is missing", vmlinuz.display());
    let elf = root.join("vmlinux");
    Ok(Kernel {
        release,
        package: format!("{name}={version}"),
        vmlinux: elf.exists().then_some(elf),
        root,
        vmlinuz,
    })
}

/// The versioned package the metapackage depends on, and its candidate
/// version. Updates apt's lists once if it does not know the metapackage.
fn candidate() -> Result<(String, String)> {
    let depends = || -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", METAPACKAGE])
            .output()
            .ok()?;
        parse_depends(&String::from_utf8_lossy(&out.stdout))
    };
    let name = if let Some(name) = depends() {
        name
    } else {
        util::run(Command::new("apt-get").args(["update", "-q"]))?;
        depends().with_context(|| {
            format!("apt-cache knows no {METAPACKAGE}: is Debian's main archive in apt's sources?")
        })?
    };
    let show = util::output(Command::new("apt-cache").args(["show", "--no-all-versions", &name]))?;
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .with_context(|| format!("no Version in `apt-cache show {name}`"))?
        .trim()
        .to_owned();
    Ok((name, version))
}

/// `linux-image-6.1.0-56-cloud-amd64` out of `apt-cache depends`' output.
fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.ends_with("-unsigned"))
        .map(str::to_owned)
}

/// `apt-get download`s `name=version` into `cache/<key>.deb` (kept there).
fn download(cache: &Path, name: &str, version: &str, key: &str) -> Result<PathBuf> {
    let deb = cache.join(format!("{key}.deb"));
    if deb.exists() {
        return Ok(deb);
    }
    let tmp = cache.join("download.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    util::run(
        Command::new("apt-get")
            // The _apt user cannot write into a root-owned cache directory.
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{name}={version}"))
            .current_dir(&tmp),
    )?;
    let got = std::fs::read_dir(&tmp)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", tmp.display()))?;
    std::fs::rename(&got, &deb)?;
    std::fs::remove_dir_all(&tmp)?;
    Ok(deb)
}

/// `dpkg -x`, `depmod` and the uncompressed kernel, in a temporary
/// directory renamed to `root` once complete: an interrupted run leaves
/// nothing that looks usable.
fn unpack(deb: &Path, root: &Path, release: &str) -> Result<()> {
    // Not with_extension: the version's dots are not an extension.
    let mut tmp = root.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(root);
    util::run(Command::new("dpkg").arg("-x").arg(deb).arg(&tmp))?;
    ensure!(
        tmp.join("lib/modules").join(release).is_dir(),
        "{} has no lib/modules/{release}",
        deb.display()
    );
    util::run(
        Command::new("/sbin/depmod")
            .arg("-b")
            .arg(&tmp)
            .arg(release),
    )?;
    let bz = tmp.join(format!("boot/vmlinuz-{release}"));
    let bz = std::fs::read(&bz).with_context(|| format!("read {}", bz.display()))?;
    match vmlinux(&bz) {
        Ok(elf) => std::fs::write(tmp.join("vmlinux"), elf)?,
        // The image works without it (the launcher boots the bzImage).
        Err(err) => eprintln!("warning: no uncompressed kernel: {err:#}"),
    }
    std::fs::write(tmp.join(COMPLETE), "")?;
    std::fs::rename(&tmp, root)
        .with_context(|| format!("rename {} to {}", tmp.display(), root.display()))
}

/// The uncompressed kernel (an ELF with the PVH entry note, plus the
/// relocation table the build appends) out of a bzImage. The setup header
/// says where the compressed payload is (boot protocol 2.08+:
/// `payload_offset`, `payload_length`, from the start of the protected-mode
/// code); this kernel compresses it with LZ4.
pub fn vmlinux(bz: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |at: usize| -> Result<usize> {
        let b = bz.get(at..at + 4).context("bzImage too short")?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
    };
    ensure!(
        bz.get(0x202..0x206) == Some(b"HdrS"),
        "not a bzImage (no HdrS)"
    );
    let protocol = u32_at(0x206)? & 0xffff;
    ensure!(
        protocol >= 0x208,
        "boot protocol {protocol:#x} has no payload fields"
    );
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let payload = bz
        .get(start..start + u32_at(0x24c)?)
        .context("bzImage payload out of bounds")?;
    let elf = lz4_legacy(payload)?;
    ensure!(
        elf.starts_with(b"\x7fELF"),
        "decompressed kernel is not an ELF file"
    );
    Ok(elf)
}

/// LZ4's legacy frame format (`lz4 -l`, what the kernel build uses): a
/// magic number, then blocks of at most 8 MiB each preceded by their
/// compressed size. The kernel build appends the uncompressed size.
fn lz4_legacy(payload: &[u8]) -> Result<Vec<u8>> {
    const MAGIC: usize = 0x184C_2102;
    let word = |b: &[u8], at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    ensure!(payload.len() >= 8, "kernel payload too short");
    let (stream, size) = payload.split_at(payload.len() - 4);
    let size = word(size, 0).expect("4 bytes");
    if word(stream, 0) != Some(MAGIC) {
        bail!("kernel payload is not LZ4-compressed (did the kernel's compression change?)");
    }
    let mut out = vec![0; size];
    let (mut pos, mut at) = (4, 0);
    while pos < stream.len() {
        let n = word(stream, pos).context("truncated LZ4 block header")?;
        pos += 4;
        if n == MAGIC {
            // Concatenated frames.
            continue;
        }
        let block = stream.get(pos..pos + n).context("truncated LZ4 block")?;
        pos += n;
        at += lz4_flex::block::decompress_into(block, &mut out[at..])
            .context("corrupt LZ4 block in the kernel payload")?;
    }
    ensure!(
        at == size,
        "kernel payload decompressed to {at} bytes, its trailer says {size}"
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_versioned_package() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(parse_depends("linux-image-cloud-amd64\n"), None);
    }

    #[test]
    fn decodes_legacy_lz4_blocks() {
        let a = vec![b'a'; 1000];
        let b = b"\x7fELF and some more text".to_vec();
        let mut payload = 0x184C_2102u32.to_le_bytes().to_vec();
        for part in [&b, &a] {
            let block = lz4_flex::block::compress(part);
            payload.extend(u32::try_from(block.len()).unwrap().to_le_bytes());
            payload.extend(block);
        }
        payload.extend(u32::try_from(a.len() + b.len()).unwrap().to_le_bytes());
        let out = lz4_legacy(&payload).unwrap();
        assert_eq!(out, [b, a].concat());
    }

    #[test]
    fn refuses_other_compression() {
        let mut payload = b"\x28\xb5\x2f\xfd".to_vec(); // zstd
        payload.extend([0; 8]);
        assert!(lz4_legacy(&payload).is_err());
    }
}
