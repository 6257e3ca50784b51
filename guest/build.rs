//! Compiles the inner container's reaper (`src/container/reaper.c`): a
//! libc-free static program of a few KiB that the container's PID 1 becomes
//! once the container is built (see `container::init`). Written for x86-64;
//! elsewhere PID 1 stays `nestbox-guest container-init`.
#![allow(
    clippy::disallowed_methods,
    reason = "blocking calls are denied only in the modules that run on the runtime thread (see clippy.toml)"
)]

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/container/reaper.c");
    println!("cargo::rerun-if-env-changed=CC");
    println!("cargo::rustc-check-cfg=cfg(nestbox_reaper)");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
        return;
    }
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("reaper");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args([
            "-Os",
            "-static",
            "-nostdlib",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fno-pie",
            "-no-pie",
            "-Wall",
            "-Werror",
            "-Wl,--build-id=none",
            "-s",
            "src/container/reaper.c",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run the C compiler `{cc}` for the container reaper: {e} (apt-get install gcc)")
        });
    assert!(
        status.success(),
        "`{cc}` could not compile src/container/reaper.c ({status})"
    );
    println!("cargo::rustc-cfg=nestbox_reaper");
}
