//! Port watcher in a netns-simulated inner container (root; run serially).

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use nestbox_guest::portwatch::{Origin, PortEvent, Watcher};
use nestbox_tests::{Lcg, Owner, Sandbox};

const NB_LISTEN: &str = env!("CARGO_BIN_EXE_nb-listen");

fn owner(sb: &Sandbox) -> Owner {
    Owner::spawn(sb.command(NB_LISTEN)).expect("start nb-listen in the sandbox")
}

async fn watch(sb: &Sandbox) -> Watcher {
    Watcher::start(sb.cgroup(), Some(&sb.netns()))
        .await
        .expect("start the watcher")
}

/// The next `n` events, failing after 10 s with what arrived.
async fn take(w: &mut Watcher, n: usize) -> Vec<PortEvent> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(event) => got.push(event.expect("watcher error")),
            Err(elapsed) => panic!(
                "expected {n} events, got {} ({elapsed}): {got:#?}",
                got.len()
            ),
        }
    }
    got
}

/// Fails if any event arrives within `ms`.
async fn quiet(w: &mut Watcher, ms: u64) {
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(ms), w.next()).await {
        panic!("expected no event, got {event:?}");
    }
}

fn summary(events: &[PortEvent]) -> Vec<(u16, bool)> {
    events
        .iter()
        .map(|e| (e.port(), e.is_listening()))
        .collect()
}

fn sorted(mut v: Vec<(u16, bool)>) -> Vec<(u16, bool)> {
    v.sort_unstable();
    v
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn t1_each_listener_opens_and_closes() {
    let sb = Sandbox::new("t1").unwrap();
    let mut w = watch(&sb).await;
    let mut v4 = owner(&sb);
    let mut v6 = owner(&sb);
    let mut lo = owner(&sb);
    let mut auto_owner = owner(&sb);
    v4.listen("0.0.0.0:8080", "").unwrap();
    v6.listen("[::]:9090", "v6only").unwrap();
    lo.listen("127.0.0.1:7070", "").unwrap();
    let auto = auto_owner.autobind().unwrap();

    let events = take(&mut w, 4).await;
    let expect = [
        (8080, ip("0.0.0.0"), v4.pid()),
        (9090, ip("::"), v6.pid()),
        (7070, ip("127.0.0.1"), lo.pid()),
        (auto.port, ip("0.0.0.0"), auto_owner.pid()),
    ];
    for (event, (port, addr, pid)) in events.iter().zip(expect) {
        let PortEvent::Listening {
            port: p,
            addrs,
            process,
            origin,
        } = event
        else {
            panic!("expected Listening, got {event:?}");
        };
        assert_eq!((*p, addrs.as_slice()), (port, &[addr][..]));
        assert_eq!(process.as_ref().unwrap().pid, pid);
        assert_eq!(process.as_ref().unwrap().comm, "nb-listen");
        assert!(matches!(origin, Origin::Kernel { .. }));
    }
    quiet(&mut w, 200).await;

    for owner in [v4, v6, lo, auto_owner] {
        owner.kill().unwrap();
    }
    let closed = take(&mut w, 4).await;
    assert_eq!(
        sorted(summary(&closed)),
        sorted(vec![
            (8080, false),
            (9090, false),
            (7070, false),
            (auto.port, false)
        ])
    );
    quiet(&mut w, 200).await;
    assert!(w.ports().is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn t2_listener_outside_the_cgroup_is_ignored() {
    let sb = Sandbox::new("t2").unwrap();
    let mut w = watch(&sb).await;
    // Same network namespace, but the test's own cgroup.
    let mut outside = Owner::spawn(sb.command_in(NB_LISTEN, None)).unwrap();
    outside.listen("0.0.0.0:6060", "").unwrap();
    quiet(&mut w, 300).await;
    // The watcher is alive: an inside listener is the very next event.
    let mut inside = owner(&sb);
    inside.listen("0.0.0.0:6061", "").unwrap();
    assert_eq!(summary(&take(&mut w, 1).await), vec![(6061, true)]);
    outside.kill().unwrap();
    quiet(&mut w, 200).await;
}

#[tokio::test(flavor = "current_thread")]
async fn t3_existing_listener_is_reconciled() {
    let sb = Sandbox::new("t3").unwrap();
    let mut before = owner(&sb);
    before.listen("0.0.0.0:8080", "").unwrap();
    before.listen("[::]:8080", "v6only").unwrap();
    let mut outside = Owner::spawn(sb.command_in(NB_LISTEN, None)).unwrap();
    outside.listen("0.0.0.0:5050", "").unwrap();

    let mut w = watch(&sb).await;
    let events = take(&mut w, 1).await;
    let PortEvent::Listening {
        port,
        process,
        origin,
        ..
    } = &events[0]
    else {
        panic!("expected Listening, got {events:?}");
    };
    assert_eq!(*port, 8080);
    assert_eq!(*origin, Origin::Reconcile);
    assert_eq!(process.as_ref().map(|p| p.pid), Some(before.pid()));
    assert_eq!(w.ports(), vec![(8080, vec![ip("0.0.0.0"), ip("::")])]);
    quiet(&mut w, 200).await;

    // The reconciled sockets close through the kernel path as usual.
    before.kill().unwrap();
    let closed = take(&mut w, 1).await;
    assert_eq!(summary(&closed), vec![(8080, false)]);
    assert!(matches!(closed[0].origin(), Origin::Kernel { .. }));
}

#[tokio::test(flavor = "current_thread")]
async fn t4_sockets_sharing_a_port_are_one_port() {
    let sb = Sandbox::new("t4").unwrap();
    let mut w = watch(&sb).await;
    let mut p1 = owner(&sb);
    let mut p2 = owner(&sb);
    p1.listen("0.0.0.0:8080", "reuseport").unwrap();
    p2.listen("0.0.0.0:8080", "reuseport").unwrap();
    let v4 = p1.listen("0.0.0.0:9090", "").unwrap();
    let v6 = p1.listen("[::]:9090", "v6only").unwrap();
    assert_eq!(
        sorted(summary(&take(&mut w, 2).await)),
        vec![(8080, true), (9090, true)]
    );
    quiet(&mut w, 200).await;
    assert_eq!(
        w.ports(),
        vec![
            (8080, vec![ip("0.0.0.0")]),
            (9090, vec![ip("0.0.0.0"), ip("::")])
        ]
    );

    // One of each pair goes: nothing changes.
    p2.kill().unwrap();
    p1.close(v4.id).unwrap();
    quiet(&mut w, 300).await;
    // The last socket of 9090 goes, then the last of 8080.
    p1.close(v6.id).unwrap();
    assert_eq!(summary(&take(&mut w, 1).await), vec![(9090, false)]);
    p1.kill().unwrap();
    assert_eq!(summary(&take(&mut w, 1).await), vec![(8080, false)]);
    quiet(&mut w, 200).await;
}

#[tokio::test(flavor = "current_thread")]
async fn t5_udp_and_outgoing_connections_are_not_ports() {
    let sb = Sandbox::new("t5").unwrap();
    let mut outside = Owner::spawn(sb.command_in(NB_LISTEN, None)).unwrap();
    outside.listen("127.0.0.1:4000", "").unwrap();
    let mut w = watch(&sb).await;
    let mut inside = owner(&sb);
    inside.udp("0.0.0.0:5353").unwrap();
    inside.udp("[::]:5354").unwrap();
    inside.connect("127.0.0.1:4000").unwrap();
    quiet(&mut w, 300).await;
    inside.listen("0.0.0.0:4001", "").unwrap();
    assert_eq!(summary(&take(&mut w, 1).await), vec![(4001, true)]);
}

#[tokio::test(flavor = "current_thread")]
async fn t6_churn_matches_the_truth_in_order() {
    const PROCS: usize = 5;
    const PORTS_EACH: usize = 10;
    const CYCLES_EACH: usize = 100;
    let sb = Sandbox::new("t6").unwrap();
    let mut w = watch(&sb).await;
    let mut owners: Vec<Owner> = (0..PROCS).map(|_| owner(&sb)).collect();
    // Each process owns its own ten ports; each cycle flips one of them.
    let mut open: Vec<BTreeMap<u16, u64>> = vec![BTreeMap::new(); PROCS];
    let mut truth: BTreeMap<u16, Vec<bool>> = BTreeMap::new();
    let mut rng = Lcg(42);
    for _ in 0..CYCLES_EACH {
        for (i, o) in owners.iter_mut().enumerate() {
            let port = u16::try_from(20_000 + i * PORTS_EACH).unwrap()
                + u16::try_from(rng.below(PORTS_EACH as u64)).unwrap();
            if let Some(id) = open[i].remove(&port) {
                o.close(id).unwrap();
                truth.entry(port).or_default().push(false);
            } else {
                let l = o.listen(&format!("0.0.0.0:{port}"), "").unwrap();
                open[i].insert(port, l.id);
                truth.entry(port).or_default().push(true);
            }
        }
    }
    let transitions: usize = truth.values().map(Vec::len).sum();
    assert_eq!(transitions, PROCS * CYCLES_EACH);

    let events = take(&mut w, transitions).await;
    quiet(&mut w, 300).await;
    let mut seen: BTreeMap<u16, Vec<bool>> = BTreeMap::new();
    for e in &events {
        assert!(matches!(e.origin(), Origin::Kernel { .. }), "{e:?}");
        seen.entry(e.port()).or_default().push(e.is_listening());
    }
    assert_eq!(seen, truth, "every transition, in order, per port");
    let published: BTreeSet<u16> = w.ports().into_iter().map(|(p, _)| p).collect();
    let expected: BTreeSet<u16> = open.iter().flat_map(|m| m.keys().copied()).collect();
    assert_eq!(published, expected);
}

#[tokio::test(flavor = "current_thread")]
async fn t7_child_cgroups_are_covered() {
    let sb = Sandbox::new("t7").unwrap();
    // One child made before the watcher (reconciliation must cover it)…
    let early = sb.child_cgroup("early").unwrap();
    let mut e = Owner::spawn(sb.command_in(NB_LISTEN, Some(&early))).unwrap();
    e.listen("0.0.0.0:3000", "").unwrap();
    let mut w = watch(&sb).await;
    let first = take(&mut w, 1).await;
    assert_eq!(summary(&first), vec![(3000, true)]);
    assert_eq!(first[0].origin(), Origin::Reconcile);
    // …and one, nested, made after it (the programs are inherited).
    let late = sb.child_cgroup("early/late").unwrap();
    let mut l = Owner::spawn(sb.command_in(NB_LISTEN, Some(&late))).unwrap();
    l.listen("[::]:3001", "").unwrap();
    let second = take(&mut w, 1).await;
    assert_eq!(summary(&second), vec![(3001, true)]);
    assert!(matches!(second[0].origin(), Origin::Kernel { .. }));
    l.kill().unwrap();
    assert_eq!(summary(&take(&mut w, 1).await), vec![(3001, false)]);
}

#[tokio::test(flavor = "current_thread")]
async fn lost_records_are_recovered_by_reconciliation() {
    let sb = Sandbox::new("lost").unwrap();
    // One page of ring: room for 46 records.
    let mut w = Watcher::start_with(sb.cgroup(), Some(&sb.netns()), Some(4096))
        .await
        .unwrap();
    let mut o = owner(&sb);
    let mut ids = Vec::new();
    // The watcher is not polled while these happen, so the ring overflows.
    for port in 21_000..21_200u16 {
        ids.push((port, o.listen(&format!("0.0.0.0:{port}"), "").unwrap().id));
    }
    for &(_, id) in ids.iter().step_by(4) {
        o.close(id).unwrap();
    }
    let truth: BTreeSet<u16> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 != 0)
        .map(|(_, (p, _))| *p)
        .collect();

    let mut state: BTreeMap<u16, bool> = BTreeMap::new();
    let mut reconciled = 0;
    while state.iter().filter(|(_, on)| **on).count() != truth.len()
        || state.iter().any(|(p, on)| *on != truth.contains(p))
    {
        let e = take(&mut w, 1).await.remove(0);
        let before = state.insert(e.port(), e.is_listening());
        assert_ne!(before, Some(e.is_listening()), "repeated transition {e:?}");
        reconciled += usize::from(e.origin() == Origin::Reconcile);
    }
    assert!(reconciled > 0, "the overflow must have been noticed");
    quiet(&mut w, 300).await;
    let published: BTreeSet<u16> = w.ports().into_iter().map(|(p, _)| p).collect();
    assert_eq!(published, truth);
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_the_watcher_detaches_everything() {
    let sb = Sandbox::new("drop").unwrap();
    let ours = |name: &str| name == "nb_sockops" || name == "nb_sock_release";
    let count = || {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| p.name_as_str().is_some_and(ours))
            .count()
    };
    let w = watch(&sb).await;
    assert_eq!(count(), 2);
    drop(w);
    // The kernel frees programs after an RCU grace period.
    for _ in 0..200 {
        if count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count(), 0, "programs left loaded after drop");
    // Nothing pinned either.
    let pinned = std::fs::read_dir("/sys/fs/bpf").map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("nb_"))
            .count()
    });
    assert_eq!(pinned, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn errors_say_what_is_wrong() {
    let missing = PathBuf::from("/sys/fs/cgroup/unified/nestbox-no-such-cgroup");
    let err = Watcher::start(&missing, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
    let err = Watcher::start(&std::env::temp_dir(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a cgroup v2 directory"), "{err}");
    let sb = Sandbox::new("err").unwrap();
    let err = Watcher::start(sb.cgroup(), Some(&PathBuf::from("/run/netns/nestbox-none")))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("/run/netns/nestbox-none"), "{err}");
}

#[test]
fn cli_watch_ports_prints_json_lines() {
    let sb = Sandbox::new("cli").unwrap();
    let mut early = owner(&sb);
    early.listen("0.0.0.0:8080", "").unwrap();
    let mut cli = Command::new(nestbox_tests::workspace_binary("nestbox-guest"))
        .args(["watch-ports", "--json", "--cgroup"])
        .arg(sb.cgroup())
        .arg("--netns")
        .arg(sb.netns())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Read on a thread so that a missing line fails the test instead of
    // hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = cli.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || -> serde_json::Value {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("watch-ports printed no line within 10 s");
        serde_json::from_str(&line).unwrap()
    };
    // The reconciled listener comes first: the watcher is attached.
    let first = next();
    assert_eq!(first["event"], "listening");
    assert_eq!(first["port"], 8080);
    assert_eq!(first["origin"]["via"], "reconcile");
    early.listen("[::1]:9000", "").unwrap();
    let second = next();
    assert_eq!(
        (second["event"].as_str(), second["port"].as_u64()),
        (Some("listening"), Some(9000))
    );
    assert_eq!(second["addrs"][0], "::1");
    assert_eq!(second["process"]["pid"], early.pid());
    early.kill().unwrap();
    let mut closed: Vec<u64> = (0..2).map(|_| next()["port"].as_u64().unwrap()).collect();
    closed.sort_unstable();
    assert_eq!(closed, vec![8080, 9000]);
    cli.kill().unwrap();
    cli.wait().unwrap();

    let out = Command::new(nestbox_tests::workspace_binary("nestbox-guest"))
        .args(["watch-ports", "--cgroup", "nestbox-no-such-cgroup"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn cli_without_privilege_says_to_run_as_root() {
    nestbox_tests::require_tool("setpriv", "util-linux");
    let sb = Sandbox::new("perm").unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(nestbox_tests::workspace_binary("nestbox-guest"))
        .args(["watch-ports", "--cgroup"])
        .arg(sb.cgroup())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not permit") && stderr.contains("run as root"),
        "{stderr}"
    );
}
