//! Checkpoints in a *real VM* (the container attacks its own checkpoints
//! here: never in the netns-simulated guest): the user's disk is btrfs, a
//! checkpoint is a read-only snapshot, a restore gives back exactly the
//! tree it had with the services and URLs up again, the recent ones are
//! read-only inside the container, and a full user disk breaks neither.

use std::fmt::Write as _;
use std::time::Duration;

use nestbox_tests::vms::{Host, body};

const VM: &str = "ck";
const WEB: &str = r#"{"name": "web", "cmd": "/bin/busybox", "args": ["httpd", "-f", "-p", "8080", "-h", "/www"], "http_port": 8080}"#;
const SCRIPT: Duration = Duration::from_mins(2);

/// The content hashes of the user's files (`/srv` and the web root).
const TREE: &str = "find /srv /www -type f | sort | xargs md5sum";

/// The checkpoint's id, after checking the stream ended with `complete`.
fn take(host: &Host, comment: &str) -> String {
    let json = serde_json::json!({ "comment": comment }).to_string();
    let out = host.api(VM, "POST", "/v1/checkpoints", Some(&json));
    let text = body(&out);
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(
        last["type"],
        "complete",
        "{text}\nconsole:\n{}",
        host.console(VM)
    );
    assert!(
        text.lines().any(|l| l.contains("\"type\":\"info\"")),
        "{text}"
    );
    last["checkpoint"]["id"].as_str().unwrap().to_owned()
}

fn lines_of(host: &Host, script: &str) -> Vec<String> {
    host.in_container(VM, script, SCRIPT)
        .into_iter()
        // The service manager's own line about the probe's start.
        .filter(|l| !l.is_empty() && l != "NB-DONE" && !l.starts_with("started, pid "))
        .collect()
}

#[test]
fn a_restore_gives_back_exactly_the_tree_with_services_and_urls() {
    let mut host = Host::new(70);
    host.create(VM);
    let status = body(&host.api(VM, "GET", "/v1/status", None));
    assert!(status.contains("\"role\":\"user\""), "{status}");
    host.create_service(VM, WEB);
    lines_of(
        &host,
        "mkdir -p /srv/app && echo one > /srv/app/a && echo bee > /srv/app/b && \
         echo v0 > /www/version.html && chown 1000 /srv/app/b && chmod 640 /srv/app/b",
    );
    host.wait_body(VM, "ck.test", "/version.html", "v0\n");
    let tree_v0 = lines_of(&host, &format!("{TREE}; ls -ln /srv/app/b | cut -c1-20"));
    assert_eq!(tree_v0.len(), 5, "{tree_v0:#?}");
    assert_eq!(take(&host, "before the change"), "v0");

    lines_of(
        &host,
        "echo two > /srv/app/a && rm /srv/app/b && echo new > /srv/app/c && \
         echo v1 > /www/version.html && rm /www/index.html",
    );
    host.wait_body(VM, "ck.test", "/version.html", "v1\n");
    let tree_v1 = lines_of(&host, TREE);
    assert_eq!(take(&host, "after"), "v1");

    // Both are listed, v1 descends from v0, both are shown in the
    // container, read-only, with their own files over the base image.
    let (list, ids) = host.checkpoints(VM);
    assert_eq!(ids, ["v0", "v1"], "{list}");
    assert_eq!(list["checkpoints"][1]["parent"], "v0", "{list}");
    assert_eq!(list["head"], "v1");
    let seen = lines_of(
        &host,
        "cat /.nestbox/checkpoints/v0/srv/app/a /.nestbox/checkpoints/v1/srv/app/a; \
         test -e /.nestbox/checkpoints/v1/srv/app/b || echo no-b-in-v1; \
         test -e /.nestbox/checkpoints/v0/bin/busybox && echo base-in-v0",
    );
    assert_eq!(seen, ["one", "two", "no-b-in-v1", "base-in-v0"]);

    // Restore v0: exactly its tree (owners and modes too), the service
    // back up, the URL serving v0's page.
    let out = host.api(VM, "POST", "/v1/checkpoints/v0/restore", None);
    let text = body(&out);
    assert!(
        text.lines()
            .last()
            .unwrap_or("")
            .contains("\"type\":\"complete\""),
        "{text}\nconsole:\n{}",
        host.console(VM)
    );
    host.wait_body(VM, "ck.test", "/version.html", "v0\n");
    // The base image's page that v1 deleted is back (its hash is in the tree).
    assert!(!host.get(VM, "ck.test", "/").is_empty());
    let tree_now = lines_of(&host, &format!("{TREE}; ls -ln /srv/app/b | cut -c1-20"));
    assert_eq!(tree_now, tree_v0);
    assert_ne!(tree_now, tree_v1);
    let status = body(&host.api(VM, "GET", "/v1/checkpoints", None));
    assert!(status.contains("\"head\":\"v0\""), "{status}");

    // Back to v1 and the change is there again; the VM's restart keeps
    // every checkpoint.
    let out = host.api(VM, "POST", "/v1/checkpoints/v1/restore", None);
    assert!(
        body(&out).contains("\"type\":\"complete\""),
        "{}",
        body(&out)
    );
    host.wait_body(VM, "ck.test", "/version.html", "v1\n");
    assert_eq!(lines_of(&host, TREE), tree_v1);
    host.launcher_ok(&["stop", VM]);
    host.launcher_ok(&["start", VM]);
    host.wait_ready(VM);
    let list = body(&host.api(VM, "GET", "/v1/checkpoints", None));
    assert!(list.contains("\"v0\"") && list.contains("\"v1\""), "{list}");
    assert_eq!(
        lines_of(&host, "cat /.nestbox/checkpoints/v0/srv/app/a"),
        ["one"],
        "after a restart\nconsole:\n{}",
        host.console(VM)
    );
    // Unknown ids are refused before the container stops.
    let out = host.api(VM, "POST", "/v1/checkpoints/v7/restore", None);
    assert!(body(&out).contains("\"not_found\""), "{}", body(&out));
}

#[test]
fn the_container_cannot_change_its_checkpoints_or_reach_the_others() {
    let mut host = Host::new(71);
    host.create(VM);
    lines_of(&host, "mkdir -p /srv && echo original > /srv/secret");
    for n in 0..6 {
        assert_eq!(take(&host, &format!("n{n}")), format!("v{n}"));
    }
    // Each attempt prints `blocked` or `ESCAPED`.
    let attempts = [
        ("write", "echo x > /.nestbox/checkpoints/v5/srv/secret"),
        ("create", "echo x > /.nestbox/checkpoints/v5/new"),
        ("mkdir", "mkdir /.nestbox/checkpoints/evil"),
        ("umount", "umount /.nestbox/checkpoints/v5"),
        ("umount-all", "umount -l /.nestbox/checkpoints"),
        ("remount", "mount -o remount,rw /.nestbox/checkpoints/v5"),
        ("bind", "mount --bind /tmp /.nestbox/checkpoints/v5"),
        (
            "userns-umount",
            "unshare -U -m -r sh -c 'umount /.nestbox/checkpoints/v5 && echo x > /.nestbox/checkpoints/v5/srv/secret'",
        ),
        (
            "mknod-disk",
            "mknod /tmp/disk b 254 32 && cat /tmp/disk > /dev/null",
        ),
        ("old-snapshot", "cat /.nestbox/checkpoints/v0/srv/secret"),
        (
            "user-disk",
            "ls /user/checkpoints || ls /layer || ls /checkpoints/v0",
        ),
    ];
    let mut script = String::new();
    for (name, cmd) in attempts {
        writeln!(
            script,
            "if ( {cmd} ) >/dev/null 2>&1; then echo \"{name} ESCAPED\"; else echo \"{name} blocked\"; fi"
        )
        .expect("a String takes any write");
    }
    let results = lines_of(&host, &script);
    for (name, _) in attempts {
        assert!(
            results.iter().any(|l| *l == format!("{name} blocked")),
            "{name} was not refused: {results:#?}"
        );
    }
    // The attempts were real: the tools exist and the view reads.
    let control = lines_of(
        &host,
        "for t in unshare mknod umount mount; do command -v $t >/dev/null || echo missing $t; done; \
         cat /.nestbox/checkpoints/v5/srv/secret",
    );
    assert_eq!(control, ["original"]);
    // Only the five most recent are shown.
    let shown = lines_of(&host, "ls /.nestbox/checkpoints");
    assert_eq!(shown, ["v1", "v2", "v3", "v4", "v5"]);
    // And nothing changed: v5 still holds the original, and a restore of
    // it gives it back.
    lines_of(&host, "echo changed > /srv/secret");
    let out = host.api(VM, "POST", "/v1/checkpoints/v5/restore", None);
    assert!(
        body(&out).contains("\"type\":\"complete\""),
        "{}",
        body(&out)
    );
    assert_eq!(lines_of(&host, "cat /srv/secret"), ["original"]);
}

#[test]
fn a_full_user_disk_neither_stops_a_checkpoint_nor_half_swaps_a_restore() {
    let mut host = Host::new(72);
    host.create_with(VM, &["--disk-size", "1"]);
    host.create_service(VM, WEB);
    lines_of(&host, "echo before > /www/state.html");
    assert_eq!(take(&host, "before the build"), "v0");
    // A runaway build fills the user's disk.
    let filled = lines_of(
        &host,
        "echo during > /www/state.html; dd if=/dev/zero of=/srv-fill bs=1M 2>&1; echo dd-exit=$?; df -k /",
    );
    assert!(
        filled.iter().any(|l| l.contains("No space left")),
        "the disk did not fill: {filled:#?}"
    );
    // The platform serves on and a checkpoint is made or refused clearly.
    let out = host.api(VM, "POST", "/v1/checkpoints", Some("{}"));
    let text = body(&out);
    let last = text.lines().last().unwrap_or("");
    eprintln!("a checkpoint on the full disk: {last}");
    assert!(
        last.contains("\"type\":\"complete\"")
            || (last.contains("\"code\":\"insufficient_storage\"") && last.contains("full")),
        "{text}"
    );
    // A restore: back to v0 whole, or refused with the layer untouched.
    let out = host.api(VM, "POST", "/v1/checkpoints/v0/restore", None);
    let text = body(&out);
    eprintln!(
        "a restore on the full disk: {}",
        text.lines().last().unwrap_or("")
    );
    if text.contains("\"type\":\"complete\"") {
        host.wait_body(VM, "ck.test", "/state.html", "before\n");
        assert_eq!(lines_of(&host, "test -e /srv-fill || echo gone"), ["gone"]);
    } else {
        assert!(text.contains("insufficient_storage"), "{text}");
        host.wait_body(VM, "ck.test", "/state.html", "during\n");
    }
    // Freed, it checkpoints again.
    lines_of(&host, "rm -f /srv-fill");
    let id = take(&host, "after");
    assert!(id == "v1" || id == "v2", "{id}");
}
