//! Compiles the escape suite's attacker (`src/escape/nb-escape.c`): a static
//! program the real-VM tests serve to the inner container (see
//! `tests/escape.rs`). `NB_ESCAPE` points the tests at it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/escape/nb-escape.c");
    println!("cargo::rerun-if-env-changed=CC");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("nb-escape");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args(["-O2", "-static", "-s", "-Wall", "-Werror"])
        .arg("src/escape/nb-escape.c")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run the C compiler `{cc}` for nb-escape: {e} (apt-get install gcc libc6-dev)")
        });
    assert!(
        status.success(),
        "`{cc}` could not compile src/escape/nb-escape.c statically ({status}): apt-get install libc6-dev"
    );
    println!("cargo::rustc-env=NB_ESCAPE={}", out.display());
}
