//! The guest image as the launcher sees it: a directory with
//! `manifest.json` naming the kernel(s) and the initramfs (made by
//! `cargo xtask image`; format in `notes/issue5-contract.md`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// Errors opening the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No manifest (or unreadable).
    #[error(
        "no guest image at {dir}: {source}. Build one with `cargo xtask image` and set `image` in launcher.toml to its directory"
    )]
    Missing {
        /// The image directory.
        dir: PathBuf,
        /// The error reading the manifest.
        source: std::io::Error,
    },
    /// The manifest is not what the launcher expects.
    #[error("the guest image manifest {path} is not valid: {source}; rebuild the image")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
    /// A file the manifest names is not there.
    #[error("the guest image at {dir} is incomplete: {file} is missing; rebuild the image")]
    Incomplete {
        /// The image directory.
        dir: PathBuf,
        /// The missing file.
        file: PathBuf,
    },
}

/// `manifest.json`. Unknown fields are accepted: a newer image may say more
/// than this launcher needs.
#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    /// The image version (reported by the guest's API).
    pub version: String,
    /// The kernel release (`uname -r` in the guest).
    pub kernel_release: String,
    /// The compressed kernel (bzImage), relative to the image directory.
    pub kernel: String,
    /// The uncompressed kernel (PVH entry, boots faster), if the image has one.
    pub vmlinux: Option<String>,
    /// The initramfs (newc cpio).
    pub initramfs: String,
}

/// An opened image.
#[derive(Clone, Debug)]
pub struct Image {
    /// Its directory (absolute).
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Image {
    /// Reads the manifest in `dir` and checks that the files it names exist.
    ///
    /// # Errors
    /// [`ImageError`] saying how to get a usable image.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        let path = dir.join(MANIFEST);
        let text = std::fs::read(&path).map_err(|source| ImageError::Missing {
            dir: dir.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|source| ImageError::Manifest {
                path: path.clone(),
                source,
            })?;
        let image = Self { dir, manifest };
        for file in [image.kernel(), image.initramfs()] {
            if !file.is_file() {
                return Err(ImageError::Incomplete {
                    dir: image.dir.clone(),
                    file,
                });
            }
        }
        Ok(image)
    }

    /// The kernel to boot: the uncompressed `vmlinux` when the image has
    /// one (microvm boots it through PVH, faster), else the bzImage.
    #[must_use]
    pub fn kernel(&self) -> PathBuf {
        let vmlinux = self.manifest.vmlinux.as_ref().map(|f| self.dir.join(f));
        vmlinux
            .filter(|p| p.is_file())
            .unwrap_or_else(|| self.dir.join(&self.manifest.kernel))
    }

    /// The initramfs.
    #[must_use]
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join(&self.manifest.initramfs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_dir(tag: &str, manifest: &str, files: &[&str]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nb-image-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MANIFEST), manifest).unwrap();
        for f in files {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        dir
    }

    const MANIFEST_JSON: &str = r#"{"version": "0.1.0+abc", "kernel_release": "6.1.0-56-cloud-amd64",
        "kernel": "vmlinuz", "vmlinux": "vmlinux", "initramfs": "initramfs.cpio", "later": 1}"#;

    #[test]
    fn prefers_vmlinux_when_present() {
        let dir = image_dir(
            "full",
            MANIFEST_JSON,
            &["vmlinuz", "vmlinux", "initramfs.cpio"],
        );
        let image = Image::open(&dir).unwrap();
        assert_eq!(image.manifest.version, "0.1.0+abc");
        assert_eq!(image.kernel(), dir.join("vmlinux"));
        assert_eq!(image.initramfs(), dir.join("initramfs.cpio"));
        std::fs::remove_file(dir.join("vmlinux")).unwrap();
        assert_eq!(image.kernel(), dir.join("vmlinuz"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_null_vmlinux_means_the_bzimage() {
        let manifest = MANIFEST_JSON.replace("\"vmlinux\",", "null,");
        let dir = image_dir("null", &manifest, &["vmlinuz", "initramfs.cpio"]);
        assert_eq!(Image::open(&dir).unwrap().kernel(), dir.join("vmlinuz"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_pieces_say_how_to_get_an_image() {
        let dir = image_dir("partial", MANIFEST_JSON, &["vmlinuz"]);
        let err = Image::open(&dir).unwrap_err().to_string();
        assert!(err.contains("initramfs.cpio is missing"), "{err}");
        std::fs::write(dir.join(MANIFEST), "{").unwrap();
        let err = Image::open(&dir).unwrap_err().to_string();
        assert!(err.contains("not valid"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = Image::open(&dir).unwrap_err().to_string();
        assert!(err.contains("cargo xtask image"), "{err}");
    }
}
