//! `nb-fake-qemu`: stands in for `qemu-system-x86_64` in the launcher's
//! tests (`qemu = ".../nb-fake-qemu"` in `launcher.toml`), so they exercise
//! everything the launcher does on the host — tap, routes, nftables,
//! records, detached start, QMP stop, kill — in milliseconds and without a
//! guest image.
//!
//! It takes QEMU's command line, prints it (to the VMM log), writes a line
//! to the `-chardev file` console (a descriptor set of `-add-fd`), and
//! serves QMP on the `-chardev socket,fd=N` control socket the launcher
//! passed: the greeting, `qmp_capabilities`, and `system_powerdown`, after
//! which it exits like a guest that powered off. It runs where QEMU would:
//! jailed, as the VM's own user, with nothing but those descriptors. It
//! also prints who it runs as (`uid`, `gid`, `root`), so the tests can
//! check the jail. Environment (inherited from the
//! launcher): `NB_FAKE_QEMU_IGNORE_POWERDOWN=1` answers the power button but
//! keeps running (a hung guest); `NB_FAKE_QEMU_FAIL=1` fails at start the
//! way QEMU does when it cannot open the tap.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;

/// The value of `key=` in a QEMU option string (`,,` is a literal comma).
fn option_value(opts: &str, key: &str) -> Option<String> {
    let unescaped = opts.replace(",,", "\u{0}");
    unescaped
        .split(',')
        .find_map(|part| part.strip_prefix(&format!("{key}=")))
        .map(|v| v.replace('\u{0}', ","))
}

/// The argument after `flag`, for each time it appears.
fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("nb-fake-qemu {}", args.join(" "));
    if std::env::var_os("NB_FAKE_QEMU_FAIL").is_some() {
        eprintln!("nb-fake-qemu: could not open tap: Device or resource busy");
        std::process::exit(1);
    }
    let root: Vec<String> = std::fs::read_dir("/")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut root = root;
    root.sort();
    println!(
        "nb-fake-qemu runs as uid {} gid {}; / holds {}",
        nix::unistd::getuid(),
        nix::unistd::getgid(),
        root.join(" ")
    );
    // -add-fd fd=N,set=S: descriptor sets, opened as /dev/fdset/S.
    let mut sets: BTreeMap<String, RawFd> = BTreeMap::new();
    for add in values(&args, "-add-fd") {
        if let (Some(fd), Some(set)) = (option_value(add, "fd"), option_value(add, "set")) {
            sets.entry(set).or_insert_with(|| fd.parse().expect("fd=N"));
        }
    }
    let mut control = None;
    for chardev in values(&args, "-chardev") {
        if let Some(path) = option_value(chardev, "path") {
            let set = path
                .strip_prefix("/dev/fdset/")
                .expect("the console is a descriptor set");
            // SAFETY: the launcher passed this descriptor; nothing else owns it.
            let mut console = unsafe { std::fs::File::from_raw_fd(sets[set]) };
            writeln!(console, "fake qemu: booted")?;
        }
        if chardev.starts_with("socket,") {
            control = option_value(chardev, "fd").map(|fd| fd.parse::<RawFd>().expect("fd=N"));
        }
    }
    let control = control.expect("-chardev socket,id=control,fd=N,server=on,wait=off");
    // SAFETY: the launcher passed this bound, listening socket.
    let listener = unsafe { UnixListener::from_raw_fd(control) };
    let ignore_powerdown = std::env::var_os("NB_FAKE_QEMU_IGNORE_POWERDOWN").is_some();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let mut out = stream.try_clone()?;
        if out
            .write_all(b"{\"QMP\": {\"version\": {\"package\": \"nb-fake-qemu\"}, \"capabilities\": []}}\n")
            .is_err()
        {
            continue;
        }
        let mut powerdown = false;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let request: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let reply = match request["execute"].as_str() {
                Some("qmp_capabilities") => "{\"return\": {}}".to_owned(),
                Some("system_powerdown") => {
                    powerdown = true;
                    "{\"return\": {}}".to_owned()
                }
                other => format!(
                    "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command {} has not been found\"}}}}",
                    other.unwrap_or("?")
                ),
            };
            let _ = out.write_all(format!("{reply}\n").as_bytes());
            if powerdown && !ignore_powerdown {
                std::process::exit(0);
            }
        }
    }
    Ok(())
}
