//! `cargo xtask install`: the guest image where the launcher looks for it
//! by default (`/usr/share/nestbox/image`) and the `nestbox` and
//! `nestbox-launcher` binaries in `PREFIX/bin`, so that `nestbox create web`
//! works with the defaults. Each is replaced whole: a new copy beside the
//! old one, then a rename (a directory is swapped with `renameat2`'s
//! exchange), so a VM starting meanwhile sees the old image or the new one,
//! never half of each.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{deps, image, util};

#[derive(clap::Args)]
pub struct Args {
    /// Where the binaries go (`PREFIX/bin`).
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    /// Where the image goes (the launcher's default `image`).
    #[arg(long, default_value = "/usr/share/nestbox/image")]
    image_dir: PathBuf,
}

/// The binaries installed.
const BINARIES: [(&str, &str); 2] = [
    ("nestbox-cli", "nestbox"),
    ("nestbox-launcher", "nestbox-launcher"),
];

pub fn run(args: &Args) -> Result<()> {
    util::require_root("cargo xtask install")?;
    deps::install()?;
    let image = image::build(&image::Args {
        out: None,
        faults: false,
    })?;
    let built = util::build_host_binaries(&BINARIES)?;
    replace_dir(&image, &args.image_dir)?;
    println!("image    {}", args.image_dir.display());
    let bin = args.prefix.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("create {}", bin.display()))?;
    for (_, name) in BINARIES {
        let from = built.join(name);
        let to = bin.join(name);
        replace_file(&from, &to)?;
        println!("binary   {}", to.display());
    }
    println!("try:     nestbox create web && nestbox exec web -- uname -a");
    Ok(())
}

/// Copies `from` over `to` (mode kept) through a temporary file beside
/// it, fsynced, then renamed (a running copy of the old binary keeps its
/// inode).
fn replace_file(from: &Path, to: &Path) -> Result<()> {
    nestbox_durable::copy_atomic(from, to)
        .with_context(|| format!("install {} as {}", from.display(), to.display()))
}

fn file_name(p: &Path) -> Result<String> {
    Ok(p.file_name()
        .with_context(|| format!("{} has no file name", p.display()))?
        .to_string_lossy()
        .into_owned())
}

/// Makes `to` a copy of the directory `from` (its files, one level: an
/// image has no subdirectories): the copy is made beside `to`, then the
/// two are exchanged in one `renameat2(RENAME_EXCHANGE)` (or renamed into
/// place when `to` is new), then the old one is removed.
fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    let parent = to.parent().context("a directory has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    let new = parent.join(format!(
        ".{}.install-{}",
        file_name(to)?,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&new);
    std::fs::create_dir(&new)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        anyhow::ensure!(
            entry.file_type()?.is_file(),
            "{} is not a file: an image is files only",
            entry.path().display()
        );
        replace_file(&entry.path(), &new.join(entry.file_name()))?;
    }
    std::fs::File::open(&new)?.sync_all()?;
    if to.exists() {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &new,
            nix::fcntl::AT_FDCWD,
            to,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .with_context(|| format!("exchange {} and {}", new.display(), to.display()))?;
        // `new` now holds the old image.
        std::fs::remove_dir_all(&new)?;
    } else {
        std::fs::rename(&new, to)?;
    }
    std::fs::File::open(parent)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_installed_image_is_replaced_whole() {
        let base = std::env::temp_dir().join(format!("nb-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (v1, v2, to) = (base.join("v1"), base.join("v2"), base.join("share/image"));
        for (dir, text) in [(&v1, "one"), (&v2, "two")] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("manifest.json"), text).unwrap();
        }
        std::fs::write(v1.join("only-in-v1"), "x").unwrap();
        replace_dir(&v1, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.join("manifest.json")).unwrap(),
            "one"
        );
        replace_dir(&v2, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.join("manifest.json")).unwrap(),
            "two"
        );
        assert!(
            !to.join("only-in-v1").exists(),
            "the old image's files are gone"
        );
        let left: Vec<_> = std::fs::read_dir(base.join("share")).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary directory is left");
        replace_file(&v2.join("manifest.json"), &base.join("bin")).unwrap();
        assert_eq!(std::fs::read_to_string(base.join("bin")).unwrap(), "two");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
