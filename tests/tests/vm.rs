//! Real VMs (root; QEMU, TCG here; run serially): `nestbox-launcher` boots
//! the guest image (`cargo xtask image`) with `nestbox-guest` as PID 1, and
//! the host reaches the user's service at its HTTPS URL.
//!
//! Layout per test K: a launcher state directory of its own with the pool
//! `10.124.K.0/24` (the host is `10.124.K.1` on every tap) and tap prefix
//! `nvK`; Pebble runs in a network namespace of its own at `10.125.K.2`
//! (allow-listed in the firewall: VMs reach nothing on the host itself) and
//! its DNS answers each VM's names with the VM's address. The client is
//! curl on the host, verifying against Pebble's issuing root.

use std::time::{Duration, Instant};

use nestbox_tests::vms::{Host, body};

const WEB: &str = r#"{"name": "web", "cmd": "/bin/busybox", "args": ["httpd", "-f", "-p", "8080", "-h", "/www"], "http_port": 8080}"#;

/// Writes the time of its first run into the container's writable layer
/// (on the data disk), once: a file that survives stop/start keeps it.
const STAMP: &str = r#"{"name": "stamp", "cmd": "/bin/sh", "args": ["-c", "test -f /www/stamp.txt || date +%s%N > /www/stamp.txt; exec sleep 2147483647"]}"#;

const INDEX: &str = "hello from nestbox\n";

#[test]
fn a_vm_serves_its_user_service_and_keeps_it_across_bounce_and_restart() {
    let mut host = Host::new(1);
    host.create("vm1");
    let (mut stream, mut events) = host.api_stream("vm1", "/v1/ports/events");
    host.create_service("vm1", WEB);
    host.create_service("vm1", STAMP);
    host.wait_body("vm1", "vm1.test", "/", INDEX);
    host.wait_body("vm1", "8080.vm1.test", "/", INDEX);
    let open = events
        .next()
        .expect("the event stream ended without the open")
        .unwrap();
    assert!(
        open.contains("\"event\":\"open\"") && open.contains("\"port\":8080"),
        "{open}"
    );
    let _ = stream.kill();
    let _ = stream.wait();

    // Bounce: the container restarts, the URL comes back.
    let out = host.api("vm1", "POST", "/v1/bounce", None);
    assert!(
        out.status.success() && body(&out).contains("running"),
        "bounce: {}\nconsole:\n{}",
        body(&out),
        host.console("vm1")
    );
    host.wait_body("vm1", "vm1.test", "/", INDEX);

    // Stop and start: the definitions and the data disk survive.
    let stamp = host.get("vm1", "vm1.test", "/stamp.txt");
    assert!(!stamp.trim().is_empty());
    host.launcher_ok(&["stop", "vm1"]);
    assert_eq!(host.state("vm1"), "stopped");
    host.launcher_ok(&["start", "vm1"]);
    host.wait_ready("vm1");
    host.wait_body("vm1", "vm1.test", "/", INDEX);
    assert_eq!(host.get("vm1", "vm1.test", "/stamp.txt"), stamp);
    let services = body(&host.api("vm1", "GET", "/v1/services", None));
    assert!(
        services.contains("\"web\"") && services.contains("\"stamp\""),
        "{services}"
    );
}

#[test]
fn a_crashed_vm_is_reported_and_destroy_leaves_nothing() {
    let mut host = Host::new(2);
    let ip = host.create("vm2");
    let record = host.record("vm2").unwrap();
    let tap = record["tap"].as_str().unwrap().to_owned();
    let pid = record["pid"].as_u64().expect("a running VM has a pid");
    assert!(
        !host.leftovers("vm2", &tap, &ip).is_empty(),
        "a running VM shows up"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.state("vm2") != "crashed" {
        assert!(Instant::now() < deadline, "list never said crashed");
        std::thread::sleep(Duration::from_millis(100));
    }
    host.launcher_ok(&["destroy", "vm2"]);
    host.created.clear();
    assert_eq!(host.leftovers("vm2", &tap, &ip), Vec::<String>::new());
    assert!(host.record("vm2").is_none());
}

#[test]
fn two_vms_have_their_own_address_and_url() {
    let mut host = Host::new(3);
    let a = host.create("alpha");
    let b = host.create("beta");
    assert_ne!(a, b);
    host.create_service("alpha", WEB);
    host.create_service("beta", WEB);
    host.wait_body("alpha", "alpha.test", "/", INDEX);
    host.wait_body("beta", "beta.test", "/", INDEX);
    let tap = host.record("alpha").unwrap()["tap"]
        .as_str()
        .unwrap()
        .to_owned();
    host.launcher_ok(&["destroy", "alpha"]);
    host.created.retain(|n| n != "alpha");
    assert_eq!(host.leftovers("alpha", &tap, &a), Vec::<String>::new());
    host.wait_body("beta", "beta.test", "/", INDEX);
}
