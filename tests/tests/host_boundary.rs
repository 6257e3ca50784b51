//! The VM ↔ host boundary, with real packets from real VMs (root; QEMU):
//! code in a VM connects to listeners this test starts on the host's tap
//! address, on a link-local address, on private and CGNAT addresses
//! standing in for the host's LAN (network namespaces the test makes), and
//! to a second VM — each must fail, while the same listeners answer the
//! host, and an allow-listed address answers the VM. And the VMM itself:
//! QEMU runs as the VM's own unprivileged user, sandboxed, jailed, limited.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nestbox_tests::Sandbox;
use nestbox_tests::vms::Host;

const VM: &str = "tenant";

/// How long a connection attempt from the VM waits (a dropped SYN never
/// answers).
const ATTEMPT_SECS: u32 = 5;

/// Removes the rules of chain `chain` of VM `name`'s table (its NAT stays):
/// the control that shows a refusal was the firewall's.
fn flush(host: &Host, name: &str, chain: &str) {
    let tap = host.record(name).unwrap()["tap"]
        .as_str()
        .unwrap()
        .to_owned();
    let status = std::process::Command::new("nft")
        .args(["flush", "chain", "inet", &format!("nestbox-{tap}"), chain])
        .status()
        .unwrap();
    assert!(status.success(), "nft flush chain {chain}");
}

/// A one-line web server in a namespace of its own at `ns_cidr`, linked to
/// the host at `host_cidr`; answers `marker`.
fn lan_server(
    tag: &str,
    links: &[(&str, &str)],
    listen: &[&str],
    marker: &str,
) -> (Sandbox, Vec<std::process::Child>) {
    let ns = Sandbox::new(tag).unwrap();
    for (host_cidr, ns_cidr) in links {
        ns.link_to_host(host_cidr, ns_cidr).unwrap();
    }
    let www = std::env::temp_dir().join(format!("nb-www-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), format!("{marker}\n")).unwrap();
    let servers = listen
        .iter()
        .map(|addr| {
            ns.command("busybox")
                .args(["httpd", "-f", "-p", addr, "-h"])
                .arg(&www)
                .spawn()
                .unwrap()
        })
        .collect();
    (ns, servers)
}

/// Whether the host itself reaches `url` (the listener is up and routed:
/// a refusal from the VM is the firewall's).
fn host_reaches(url: &str, marker: &str) -> bool {
    for _ in 0..50 {
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "2", url])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(marker) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Tries each `url` from the VM's container; returns the lines `OK url`,
/// `DROPPED url` (no answer at all within the time: what the firewall does)
/// or `FAIL <exit code> url <wget's words>` (anything else, which the tests
/// treat as unexplained). busybox 1.35's `wget -T` crashes, so `timeout`
/// bounds the wait.
fn from_vm(host: &Host, urls: &[String]) -> Vec<String> {
    let mut script = String::new();
    for u in urls {
        let _ = writeln!(
            script,
            "timeout {ATTEMPT_SECS} wget -q -O /dev/null {u} 2>/tmp/err; code=$?; \
             if [ $code = 0 ]; then echo OK {u}; elif [ $code = 143 ]; then echo DROPPED {u}; \
             else echo FAIL $code {u} $(cat /tmp/err); fi"
        );
    }
    host.in_container(VM, &script, Duration::from_mins(2))
}

#[test]
fn a_vm_reaches_nothing_on_the_host_itself() {
    let k = 40;
    let mut host = Host::new(k);
    host.create(VM);
    let tap_address = format!("10.124.{k}.1");
    let listener = TcpListener::bind((tap_address.as_str(), 18080)).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                accepted.fetch_add(1, Ordering::SeqCst);
                let mut stream = stream;
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost\n");
            }
        });
    }
    let url = format!("http://{tap_address}:18080/");
    assert!(host_reaches(&url, "host"), "the host's own listener is up");
    let before = accepted.load(Ordering::SeqCst);
    let lines = from_vm(&host, std::slice::from_ref(&url));
    assert!(lines.contains(&format!("DROPPED {url}")), "{lines:#?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before,
        "a connection from the VM reached the host's listener"
    );
    // The control: without the input rules, the same attempt gets through.
    flush(&host, VM, "input");
    let lines = from_vm(&host, std::slice::from_ref(&url));
    assert!(
        lines.contains(&format!("OK {url}")),
        "the test proves nothing: {lines:#?}"
    );
    assert!(accepted.load(Ordering::SeqCst) > before);
}

#[test]
fn a_vm_reaches_no_link_local_private_or_cgnat_address_but_an_allow_listed_one() {
    let k = 41;
    let mut host = Host::new(k);
    host.create(VM);
    let (_metadata, _m) = lan_server(
        "meta",
        &[("169.254.169.1/16", "169.254.169.254/16")],
        &["169.254.169.254:80"],
        "metadata",
    );
    let (_lan, _l) = lan_server(
        "lan",
        &[
            (&format!("192.168.{k}.1/24"), &format!("192.168.{k}.2/24")),
            (&format!("172.16.{k}.1/24"), &format!("172.16.{k}.2/24")),
            (&format!("100.64.{k}.1/24"), &format!("100.64.{k}.2/24")),
        ],
        &[
            &format!("192.168.{k}.2:80"),
            &format!("172.16.{k}.2:80"),
            &format!("100.64.{k}.2:80"),
        ],
        "lan",
    );
    let refused = [
        ("http://169.254.169.254/".to_owned(), "metadata"),
        (format!("http://192.168.{k}.2/"), "lan"),
        (format!("http://172.16.{k}.2/"), "lan"),
        (format!("http://100.64.{k}.2/"), "lan"),
    ];
    for (url, marker) in &refused {
        assert!(host_reaches(url, marker), "the host reaches {url}");
    }
    // Pebble's namespace is allow-listed in this host's launcher.toml.
    let marker = std::env::temp_dir().join(format!("allowed-{}.txt", std::process::id()));
    std::fs::write(&marker, "allowed\n").unwrap();
    let allowed = host.serve(&marker);
    let mut urls: Vec<String> = refused.iter().map(|(u, _)| u.clone()).collect();
    urls.push(allowed.clone());
    let lines = from_vm(&host, &urls);
    for (url, _) in &refused {
        assert!(
            lines.contains(&format!("DROPPED {url}")),
            "{url}: {lines:#?}"
        );
    }
    assert!(lines.contains(&format!("OK {allowed}")), "{lines:#?}");
    // The control: without the forward rules, every one gets through.
    flush(&host, VM, "forward");
    let lines = from_vm(&host, &urls);
    for (url, _) in &refused {
        assert!(
            lines.contains(&format!("OK {url}")),
            "the test proves nothing for {url}: {lines:#?}"
        );
    }
    let _ = std::fs::remove_file(marker);
}

#[test]
fn a_vm_cannot_reach_another_vm() {
    let k = 42;
    let mut host = Host::new(k);
    host.create(VM);
    let other = host.create("neighbour");
    host.create_service(
        "neighbour",
        r#"{"name": "web", "cmd": "/bin/busybox", "args": ["httpd", "-f", "-p", "8080", "-h", "/www"], "http_port": 8080}"#,
    );
    // The neighbour serves the host.
    host.wait_body("neighbour", "neighbour.test", "/", "hello from nestbox\n");
    // The guest sees the pool as its link, so it asks for the neighbour by
    // ARP, and nothing on the tap answers for another VM (a guest kernel
    // that routes through the host instead is the next test's).
    let urls = [format!("http://{other}/"), format!("http://{other}:443/")];
    let lines = from_vm(&host, &urls);
    for url in &urls {
        assert!(
            lines.contains(&format!("DROPPED {url}"))
                || lines
                    .iter()
                    .any(|l| l.starts_with(&format!("FAIL 1 {url} "))
                        && l.ends_with("No route to host")),
            "{url}: {lines:#?}"
        );
    }
}

/// Half-open connections from `source` in `netns` (a SYN that arrived and
/// was answered: the destination's own record of it).
fn syn_received(netns: &Sandbox, source: std::net::Ipv4Addr) -> usize {
    let out = netns
        .command_in("ss", None)
        .args(["-Htn", "state", "syn-recv"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // Pebble listens on `*`: IPv4 peers show as [::ffff:a.b.c.d]:port.
        .filter(|l| l.contains(&format!("{source}:")) || l.contains(&format!("{source}]:")))
        .count()
}

#[test]
fn a_guest_kernel_on_its_tap_reaches_no_other_vm_no_host_no_private_range_and_cannot_spoof() {
    use std::net::Ipv4Addr;
    let k = 44;
    let mut host = Host::new(k);
    let alpha: Ipv4Addr = host.create("alpha").parse().unwrap();
    let beta: Ipv4Addr = host.create("beta").parse().unwrap();
    let (lan, _servers) = lan_server(
        "wire",
        &[
            (&format!("192.168.{k}.1/24"), &format!("192.168.{k}.2/24")),
            ("169.254.169.1/16", "169.254.169.254/16"),
        ],
        &[&format!("192.168.{k}.2:80"), "169.254.169.254:80"],
        "lan",
    );
    // Replies find their way back, so that only the firewall can stop them.
    lan.default_route(&format!("192.168.{k}.1")).unwrap();
    assert!(host_reaches(&format!("http://192.168.{k}.2/"), "lan"));
    let record = host.record("alpha").unwrap();
    let tap = record["tap"].as_str().unwrap().to_owned();
    let mac = record["mac"].as_str().unwrap().to_owned();
    // alpha's guest is gone; what follows is its kernel's worst.
    host.launcher_ok(&["stop", "alpha"]);
    let mut wire = nestbox_tests::wire::Wire::attach(&tap, &mac).unwrap();
    let wait = Duration::from_secs(3);
    let pebble: Ipv4Addr = host.pebble.address().parse().unwrap();
    let pebble_ns = host.pebble.netns().unwrap();
    let spoofed = Ipv4Addr::new(10, 124, k, 200);
    let tap_address = Ipv4Addr::new(10, 124, k, 1);
    let lan_address = Ipv4Addr::new(192, 168, k, 2);
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    let probe = |wire: &mut nestbox_tests::wire::Wire| {
        [
            (
                "another VM, through the host",
                wire.reaches(alpha, beta, 443, wait).unwrap(),
            ),
            // A closed port of the host answers RST unless dropped.
            (
                "the host's tap address",
                wire.reaches(alpha, tap_address, 22, wait).unwrap(),
            ),
            (
                "the LAN",
                wire.reaches(alpha, lan_address, 80, wait).unwrap(),
            ),
            (
                "the metadata address",
                wire.reaches(alpha, metadata, 80, wait).unwrap(),
            ),
        ]
    };
    // The method works: the allow-listed ACME server answers alpha.
    assert!(
        wire.reaches(alpha, pebble, 14000, wait).unwrap(),
        "the allow-listed address answers"
    );
    for (what, reached) in probe(&mut wire) {
        assert!(!reached, "{what} answered the VM");
    }
    // A spoofed source, towards the allow-listed address: it never arrives.
    wire.reaches(spoofed, pebble, 14000, wait).unwrap();
    assert_eq!(syn_received(pebble_ns, spoofed), 0, "a spoofed SYN arrived");

    // The control: without the VM's filter rules (its NAT kept), every one
    // of those gets through, so the refusals above are the firewall's.
    for chain in ["forward", "input"] {
        flush(&host, "alpha", chain);
    }
    for (what, reached) in probe(&mut wire) {
        assert!(
            reached,
            "without the firewall, {what} should answer: the test proves nothing"
        );
    }
    wire.reaches(spoofed, pebble, 14000, wait).unwrap();
    let all = pebble_ns
        .command_in("ss", None)
        .args(["-Htan"])
        .output()
        .unwrap();
    assert!(
        syn_received(pebble_ns, spoofed) > 0,
        "without the firewall the spoofed SYN should arrive: {}",
        String::from_utf8_lossy(&all.stdout)
    );
}

#[test]
fn the_vmm_runs_as_the_vms_own_user_sandboxed_jailed_and_limited() {
    let k = 43;
    let mut host = Host::new(k);
    let address = host.create(VM);
    let pid = host.record(VM).unwrap()["pid"].as_u64().unwrap();
    let proc = format!("/proc/{pid}");
    let status = std::fs::read_to_string(format!("{proc}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let uid = u32::from(address.parse::<std::net::Ipv4Addr>().unwrap()).to_string();
    assert_eq!(field("Uid:"), [uid.as_str(); 4].join(" "), "{status}");
    assert_eq!(field("Gid:"), [uid.as_str(); 4].join(" "), "{status}");
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(field(set), "0000000000000000", "{set} {status}");
    }
    assert_eq!(field("NoNewPrivs:"), "1", "QEMU's sandbox sets it");
    assert_eq!(field("Seccomp:"), "2", "QEMU's seccomp filter is on");
    // Its own namespaces: it sees no host network and no host files.
    for ns in ["net", "mnt", "ipc", "uts"] {
        assert_ne!(
            std::fs::read_link(format!("{proc}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns}"
        );
    }
    let mut root: Vec<String> = std::fs::read_dir(format!("{proc}/root"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    for absent in ["home", "root", "var", "proc", "sys", "run", "boot"] {
        assert!(
            !root.contains(&absent.to_owned()),
            "{absent} in its root: {root:?}"
        );
    }
    assert!(
        root.contains(&"usr".to_owned()) && root.contains(&"dev".to_owned()),
        "{root:?}"
    );
    let devices: Vec<String> = std::fs::read_dir(format!("{proc}/root/dev"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        devices
            .iter()
            .all(|d| ["null", "zero", "full", "random", "urandom", "kvm"].contains(&d.as_str())),
        "{devices:?}"
    );
    // Its network namespace has nothing but a loopback that is down.
    let links = std::process::Command::new("nsenter")
        .arg(format!("--net={proc}/ns/net"))
        .args(["ip", "-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && !links.contains(",UP"), "{links}");
    // Its cgroup caps memory at the guest's 512 MiB + the translation
    // cache + the VMM's overhead, and CPU at its one virtual CPU.
    let tap = host.record(VM).unwrap()["tap"].as_str().unwrap().to_owned();
    let hierarchy = nestbox_launcher::vmm::cgroup::host().unwrap();
    let dirs = hierarchy.dirs(&tap);
    let limit = nestbox_launcher::vmm::cgroup::memory_for(512, 128);
    match hierarchy {
        nestbox_launcher::vmm::cgroup::Hierarchy::V2(_) => {
            let max = std::fs::read_to_string(dirs[0].join("memory.max")).unwrap();
            assert_eq!(max.trim(), limit.to_string());
            let cpu = std::fs::read_to_string(dirs[0].join("cpu.max")).unwrap();
            assert_eq!(cpu.trim(), "10000 10000");
        }
        nestbox_launcher::vmm::cgroup::Hierarchy::V1 { .. } => {
            let max = std::fs::read_to_string(dirs[0].join("memory.limit_in_bytes")).unwrap();
            assert_eq!(max.trim(), limit.to_string());
            let quota = std::fs::read_to_string(dirs[1].join("cpu.cfs_quota_us")).unwrap();
            let period = std::fs::read_to_string(dirs[1].join("cpu.cfs_period_us")).unwrap();
            assert_eq!((quota.trim(), period.trim()), ("10000", "10000"));
        }
    }
    for dir in &dirs {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|p| p == pid.to_string()), "{procs}");
    }
    // The guest kernel keeps its mitigations.
    assert!(!host.console(VM).contains("mitigations=off"));
    let cmdline = std::fs::read_to_string(format!("{proc}/cmdline")).unwrap();
    assert!(!cmdline.contains("mitigations=off"), "{cmdline}");
}
