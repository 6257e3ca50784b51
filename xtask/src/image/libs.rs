//! Host programs copied into the image with the shared libraries they load.
//! `ldd` (the dynamic loader itself) says which libraries, at which paths,
//! and which ELF interpreter; each lands at the path `ldd` names, as a
//! regular file with the contents of the file that path resolves to, so
//! the loader finds it at the same place in the VM.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::tree::Tree;

/// Copies `host` to `path` in the image, with its libraries.
pub fn add_program(tree: &mut Tree, path: &str, host: &Path) -> Result<()> {
    tree.copy(path, host)?;
    for lib in needed(host)? {
        tree.copy(&lib, Path::new(&lib))?;
    }
    Ok(())
}

/// The libraries (and interpreter) `binary` loads; none for a static one.
pub fn needed(binary: &Path) -> Result<Vec<String>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd (libc-bin)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse(&stdout).with_context(|| format!("ldd {}", binary.display()))
}

/// Library paths out of `ldd`'s output:
/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and the
/// interpreter line `/lib64/ld-linux-x86-64.so.2 (0x…)`; the vDSO has no
/// file.
fn parse(out: &str) -> Result<Vec<String>> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        if line.is_empty() || line == "statically linked" {
            continue;
        }
        let path = match line.split_once(" => ") {
            Some((name, rest)) => {
                let path = rest.split(" (").next().unwrap_or(rest).trim();
                if path == "not found" || path.is_empty() {
                    bail!("library {name} not found");
                }
                path
            }
            None => line.split(" (").next().unwrap_or(line).trim(),
        };
        if path.starts_with('/') {
            libs.push(path.to_owned());
        } else if !path.starts_with("linux-vdso") {
            bail!("unexpected ldd line: {line}");
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libraries_and_interpreter() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f41)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f41)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f41)\n";
        assert_eq!(
            parse(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn a_missing_library_is_an_error() {
        assert!(parse("\tlibfoo.so.1 => not found\n").is_err());
    }
}
