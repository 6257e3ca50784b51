//! The escape suite: user code in the inner container of a *real VM* tries
//! to take the platform, one attempt per test; each test fails if its
//! attempt works. (Never in the netns-simulated guest: there the container
//! shares the CI machine's kernel, and a success would change the machine.)
//!
//! Each attempt runs as a user would run it — a service registered through
//! the VM's API, in busybox `sh`, or the static `nb-escape` helper fetched
//! with `wget` from an allow-listed address — and reports what the kernel
//! answered. Besides the answer, each test checks the effect: the value
//! read back, the console, the mount table.

use std::time::Duration;

use nestbox_tests::vms::{EXHAUST, Host, INDEX, NB_ESCAPE, WEB_NO_FORK, body};

/// The VM every test attacks.
const VM: &str = "victim";

/// How long one attack script may take under TCG.
const SCRIPT: Duration = Duration::from_mins(2);

/// A host with the victim VM (pool `10.124.K.0/24`).
fn victim(k: u8) -> Host {
    let mut host = Host::new(k);
    host.create(VM);
    host
}

/// Runs `script` in the victim's container.
fn attack(host: &Host, script: &str) -> Vec<String> {
    host.in_container(VM, script, SCRIPT)
}

/// Fetches `nb-escape` into the container and runs it with `what`; returns
/// its `RESULT` lines, after checking that it ran to the end.
fn nb_escape(host: &mut Host, what: &str) -> Vec<String> {
    let url = host.serve(std::path::Path::new(NB_ESCAPE));
    let lines = attack(
        host,
        &format!(
            "wget -q -O /tmp/nb-escape {url} && chmod 755 /tmp/nb-escape && /tmp/nb-escape {what}"
        ),
    );
    assert!(
        lines.iter().any(|l| l == "RESULT done"),
        "nb-escape did not run to the end (the allow-listed download, or the helper): {lines:#?}"
    );
    lines
        .into_iter()
        .filter(|l| l.starts_with("RESULT ") && l != "RESULT done")
        .collect()
}

/// Every attempt was refused by the kernel; returns the refusals.
fn all_blocked(results: &[String], expected: &[&str]) -> Vec<String> {
    let escaped: Vec<&String> = results.iter().filter(|l| l.contains(" ESCAPED ")).collect();
    assert!(
        escaped.is_empty(),
        "the boundary did not hold: {escaped:#?}"
    );
    for attempt in expected {
        assert!(
            results
                .iter()
                .any(|l| l.starts_with(&format!("RESULT {attempt} blocked "))),
            "{attempt} was not attempted, or not refused: {results:#?}"
        );
    }
    results.to_vec()
}

/// `line` is among `lines`.
fn said(lines: &[String], line: &str) -> bool {
    lines.iter().any(|l| l == line)
}

#[test]
fn kernel_sysctls_cannot_be_written_core_pattern_modprobe_and_sysrq_included() {
    let host = victim(10);
    // A `|` core pattern would make the kernel run the user's program as
    // the VM's root, outside every namespace, at the next core dump: the
    // program's path as the VM sees it is in the overlay's upper layer,
    // which the container's mount table names.
    let lines = attack(
        &host,
        r#"upper=$(sed -n 's/.*upperdir=\([^,]*\).*/\1/p' /proc/self/mountinfo | head -1)
echo upper $upper
printf '#!/bin/sh\necho NB-PWNED > /dev/kmsg\n' > /tmp/pwn
chmod 755 /tmp/pwn
for knob in kernel/core_pattern:"|$upper/tmp/pwn %p" kernel/modprobe:$upper/tmp/pwn kernel/sysrq:1 kernel/panic_on_oops:1; do
  file=/proc/sys/${knob%%:*}; value=${knob#*:}
  before=$(cat $file)
  if echo "$value" > $file; then echo "WROTE $file"; else echo "REFUSED $file"; fi
  if sysctl -w "$(echo ${knob%%:*} | tr / .)=$value"; then echo "SYSCTL-WROTE $file"; fi
  if [ "$(cat $file)" = "$before" ]; then echo "SAME $file"; else echo "CHANGED $file"; fi
done
# If the pattern had changed, this core dump would run /tmp/pwn as root.
sh -c 'ulimit -c unlimited; kill -SEGV $$'
sleep 1"#,
    );
    for file in [
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/modprobe",
        "/proc/sys/kernel/sysrq",
        "/proc/sys/kernel/panic_on_oops",
    ] {
        assert!(
            said(&lines, &format!("REFUSED {file}")),
            "{file}: {lines:#?}"
        );
        assert!(
            !said(&lines, &format!("SYSCTL-WROTE {file}")),
            "{file}: {lines:#?}"
        );
        assert!(
            said(&lines, &format!("SAME {file}")),
            "{file} changed: {lines:#?}"
        );
    }
    assert!(
        lines.iter().any(|l| l.starts_with("upper /")),
        "the attack found the layer's path: {lines:#?}"
    );
    assert!(
        !host.console(VM).contains("NB-PWNED"),
        "the kernel ran the user's handler"
    );
}

#[test]
fn sysrq_trigger_cannot_be_written() {
    let host = victim(11);
    // `h` only prints the help to the console: harmless if it works, and
    // visible there.
    let lines = attack(
        &host,
        "if echo h > /proc/sysrq-trigger; then echo WROTE; else echo REFUSED; fi; sleep 1",
    );
    assert!(said(&lines, "REFUSED"), "{lines:#?}");
    let console = host.console(VM);
    assert!(!console.contains("sysrq: HELP"), "sysrq ran: {console}");
}

#[test]
fn nothing_can_be_mounted_and_proc_cannot_be_remounted() {
    let mut host = victim(12);
    let lines = attack(
        &host,
        "for fs in tmpfs proc sysfs cgroup2; do \
           if mount -t $fs none /mnt; then echo MOUNTED $fs; else echo REFUSED $fs; fi; \
         done; \
         if mount -o remount,rw /proc/sys; then echo REMOUNTED; else echo REFUSED remount; fi; \
         if umount /proc/sys; then echo UNMOUNTED; else echo REFUSED umount; fi; \
         echo mounts-on-mnt $(grep -c ' /mnt ' /proc/self/mountinfo)",
    );
    for fs in ["tmpfs", "proc", "sysfs", "cgroup2", "remount", "umount"] {
        assert!(said(&lines, &format!("REFUSED {fs}")), "{fs}: {lines:#?}");
    }
    assert!(said(&lines, "mounts-on-mnt 0"), "{lines:#?}");
    all_blocked(
        &nb_escape(&mut host, "namespaces"),
        &[
            "mount-tmpfs",
            "mount-proc",
            "mount-sysfs",
            "mount-cgroup2",
            "umount-proc-sys",
            "remount-proc-sys-rw",
        ],
    );
}

#[test]
fn a_block_device_cannot_be_made_or_read() {
    let mut host = victim(13);
    let lines = attack(
        &host,
        "if mknod /tmp/vda b 253 0; then echo MADE; dd if=/tmp/vda bs=512 count=1 of=/dev/null && echo READ; \
         else echo REFUSED; fi",
    );
    assert!(
        said(&lines, "REFUSED") && !said(&lines, "READ"),
        "{lines:#?}"
    );
    all_blocked(&nb_escape(&mut host, "mknod"), &["mknod-block"]);
}

#[test]
fn bpf_programs_and_perf_events_are_refused() {
    let mut host = victim(14);
    all_blocked(
        &nb_escape(&mut host, "bpf"),
        &["bpf-prog-load", "bpf-map-create"],
    );
    all_blocked(
        &nb_escape(&mut host, "perf"),
        &["perf-event-open-self", "perf-event-open-cpu"],
    );
}

#[test]
fn modules_kexec_keyrings_io_ports_swap_reboot_and_the_clock_are_refused() {
    let mut host = victim(15);
    all_blocked(
        &nb_escape(&mut host, "module"),
        &["finit-module", "init-module", "delete-module", "kexec-load"],
    );
    all_blocked(
        &nb_escape(&mut host, "keyring"),
        &["add-key", "keyctl", "request-key"],
    );
    all_blocked(
        &nb_escape(&mut host, "hardware"),
        &[
            "iopl",
            "ioperm",
            "reboot",
            "swapon",
            "clock-settime",
            "settimeofday",
        ],
    );
}

#[test]
fn new_namespaces_and_setns_regain_no_privilege() {
    let mut host = victim(16);
    // busybox's own tools first: a user namespace of one's own with root in
    // it, then a mount in it.
    let lines = attack(
        &host,
        "if unshare -U -r -m sh -c 'mount -t tmpfs none /mnt && echo MOUNTED-IN-USERNS'; then echo UNSHARED; \
         else echo REFUSED unshare; fi; \
         if nsenter -t 1 -m -u -i -n -p true; then echo ENTERED; else echo REFUSED nsenter; fi",
    );
    assert!(said(&lines, "REFUSED unshare"), "{lines:#?}");
    assert!(!said(&lines, "MOUNTED-IN-USERNS"), "{lines:#?}");
    assert!(said(&lines, "REFUSED nsenter"), "{lines:#?}");
    all_blocked(
        &nb_escape(&mut host, "namespaces"),
        &[
            "unshare-user",
            "unshare-mount",
            "unshare-net",
            "clone-newuser",
            "setns-pid1-mnt",
            "setns-pid1-net",
            "setns-pid1-user",
        ],
    );
}

#[test]
fn the_platforms_files_are_out_of_reach() {
    let host = victim(17);
    // The token's hash is in the VM's configuration; the ACME and
    // certificate keys are PEM private keys on the platform's disk.
    let hash = nestbox_launcher::token::sha256_hex(&host.token(VM));
    let lines = attack(
        &host,
        &format!(
            "for p in /data /user /etc/nestbox /sys/fs/cgroup /dev/vda /dev/vdb /proc/1/root/data; do \
               if [ -e $p ]; then echo VISIBLE $p; fi; done; \
             echo nestbox-dir $(ls -A /.nestbox); \
             if cat /proc/1/environ >/dev/null 2>&1; then echo READ-PID1-ENVIRON; fi; \
             if ls /proc/1/root/ >/dev/null 2>&1; then echo LISTED-PID1-ROOT; fi; \
             files() {{ find / -xdev -type f; find /.nestbox /tmp /dev/shm -type f; }}; \
             echo files $(files | wc -l); \
             echo hash-files $(files | xargs grep -l {hash} 2>/dev/null | wc -l); \
             echo key-files $(files | xargs grep -l 'PRIVATE KEY' 2>/dev/null | wc -l); \
             echo fds $(ls /proc/self/fd | wc -l)"
        ),
    );
    let visible: Vec<&String> = lines.iter().filter(|l| l.starts_with("VISIBLE")).collect();
    assert!(visible.is_empty(), "{visible:#?}");
    // The API's socket and the mount point of the checkpoints' views.
    assert!(
        said(&lines, "nestbox-dir api.sock checkpoints"),
        "{lines:#?}"
    );
    assert!(!said(&lines, "READ-PID1-ENVIRON"), "{lines:#?}");
    assert!(!said(&lines, "LISTED-PID1-ROOT"), "{lines:#?}");
    let files: usize = lines
        .iter()
        .find_map(|l| l.strip_prefix("files "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        files > 0,
        "the search saw the container's files: {lines:#?}"
    );
    assert!(
        said(&lines, "hash-files 0"),
        "the token's hash is readable: {lines:#?}"
    );
    assert!(
        said(&lines, "key-files 0"),
        "a private key is readable: {lines:#?}"
    );
    // stdin, stdout, stderr and the one `ls` opens: no descriptor of the
    // platform's leaked in.
    assert!(said(&lines, "fds 4"), "{lines:#?}");
}

#[test]
fn the_api_refuses_the_container_without_the_token_over_tcp_and_the_socket() {
    let mut host = victim(18);
    let lines = attack(
        &host,
        "wget -S -O /dev/null http://10.88.0.1:7070/v1/status 2>&1 | grep -m1 'HTTP/'; \
         wget -S -O /dev/null --header 'Authorization: Bearer not-the-token' http://10.88.0.1:7070/v1/services 2>&1 | grep -m1 'HTTP/'",
    );
    let statuses: Vec<&String> = lines.iter().filter(|l| l.contains("HTTP/")).collect();
    assert_eq!(statuses.len(), 2, "{lines:#?}");
    assert!(statuses.iter().all(|l| l.contains("401")), "{lines:#?}");
    let socket = nb_escape(&mut host, "api");
    assert!(
        socket
            .iter()
            .any(|l| l.starts_with("RESULT api-socket-no-token status") && l.contains(" 401")),
        "{socket:#?}"
    );
    // With the token the same socket answers (the test holds the token).
    let token = host.token(VM);
    let lines = attack(
        &host,
        &format!(
            "wget -q -O - --header 'Authorization: Bearer {token}' http://10.88.0.1:7070/v1/status"
        ),
    );
    assert!(
        lines.iter().any(|l| l.contains("\"running\"")),
        "{lines:#?}"
    );
    let out = host.api(VM, "GET", "/v1/status", None);
    assert!(out.status.success(), "{}", body(&out));
}

#[test]
fn a_fork_bomb_a_memory_hog_and_a_cpu_spin_leave_the_platform_serving_and_bounce_recovers() {
    let mut host = victim(20);
    // The user's app: one process that never forks (a bomb in the same
    // container leaves no process for busybox httpd to fork per request).
    host.install_helper(VM);
    host.create_service(VM, WEB_NO_FORK);
    host.wait_body(VM, "victim.test", "/", INDEX);
    let spec = serde_json::json!({"name": "exhaust", "cmd": "/bin/sh", "args": ["-c", EXHAUST]});
    host.create_service(VM, &spec.to_string());
    // Let it take hold: the hog reaches memory.max, then the bomb pids.max.
    // Under TCG on a loaded host the bomb, throttled by memory.high, can
    // take well over a minute to reach pids.max: the platform must serve
    // through every round of it, and the rounds go on until the VM's API
    // has counted both limits (or the deadline fails the test).
    std::thread::sleep(Duration::from_secs(25));
    let deadline = std::time::Instant::now() + Duration::from_mins(3);
    let mut round = 0;
    let status = loop {
        let out = host.api(VM, "GET", "/v1/status", None);
        assert!(
            out.status.success() && body(&out).contains("\"running\""),
            "round {round}: status under attack: {}{}\nconsole:\n{}",
            body(&out),
            String::from_utf8_lossy(&out.stderr),
            host.console(VM)
        );
        assert_eq!(host.get(VM, "victim.test", "/"), INDEX, "round {round}");
        let status: serde_json::Value = serde_json::from_str(&body(&out)).unwrap();
        let hit = |key: &str| status["usage"][key].as_u64().unwrap_or(0) > 0;
        if (round >= 5 && hit("pids_max_events") && hit("oom_kills"))
            || std::time::Instant::now() > deadline
        {
            break status;
        }
        round += 1;
        std::thread::sleep(Duration::from_secs(2));
    };
    // The attack was real: the bomb ran into pids.max, the hog into the
    // container's own OOM killer (the VM's API counts both).
    let usage = &status["usage"];
    assert!(
        usage["pids_max_events"].as_u64().unwrap_or(0) > 0,
        "the fork bomb never hit pids.max: {status}"
    );
    assert!(
        usage["oom_kills"].as_u64().unwrap_or(0) > 0,
        "the memory hog never hit memory.max: {status}"
    );
    let out = host.api(VM, "POST", "/v1/bounce", None);
    assert!(
        out.status.success() && body(&out).contains("running"),
        "bounce under attack: {}{}\nconsole:\n{}",
        body(&out),
        String::from_utf8_lossy(&out.stderr),
        host.console(VM)
    );
    host.wait_body(VM, "victim.test", "/", INDEX);
    let lines = attack(
        &host,
        "echo processes $(ls /proc | grep -c '^[0-9][0-9]*$')",
    );
    let count: usize = lines
        .iter()
        .find_map(|l| l.strip_prefix("processes "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    // PID 1, web, exhaust's sleep, this probe's shell and its commands.
    assert!(
        count <= 8,
        "the bounced container is not clean: {count} processes"
    );
    assert!(
        host.service_lines(VM, "exhaust")
            .iter()
            .any(|l| l == "clean")
    );
}

#[test]
fn a_full_user_disk_stops_only_the_user() {
    let mut host = Host::new(21);
    host.create_with(VM, &["--disk-size", "1"]);
    let lines = attack(
        &host,
        "dd if=/dev/zero of=/fill bs=1M 2>&1 | grep -v records; \
         echo free $(df -k / | tail -1 | awk '{print $4}'); \
         dd if=/dev/zero of=/dev/shm/fill bs=1M 2>&1 | tail -1; \
         echo shm $(du -k /dev/shm/fill | cut -f1)",
    );
    assert!(
        lines.iter().any(|l| l.contains("No space left on device")),
        "the user disk did not fill: {lines:#?}"
    );
    assert!(said(&lines, "free 0"), "{lines:#?}");
    let shm: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("shm "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(shm <= 64 * 1024, "/dev/shm took {shm} KiB");
    // The platform still works: its own disk takes a new service and its
    // logs; the API says the user's disk is full.
    let status: serde_json::Value =
        serde_json::from_str(&body(&host.api(VM, "GET", "/v1/status", None))).unwrap();
    let disk = &status["user_disk"];
    assert!(
        disk["available_bytes"].as_u64().unwrap() < 1 << 20,
        "{status}"
    );
    assert!(
        disk["total_bytes"].as_u64().unwrap() > 900 << 20,
        "{status}"
    );
    let lines = attack(&host, "echo still logging");
    assert!(said(&lines, "still logging"), "{lines:#?}");
    let out = host.api(VM, "GET", "/v1/services", None);
    assert!(out.status.success(), "{}", body(&out));
}

/// The file API (`/v1/fs/…`) from outside: every path it takes is the
/// container's. The target is a file of the VM's root namespace,
/// `/etc/nestbox/image-version` (the container has no `/etc/nestbox`).
#[test]
fn the_file_api_reaches_only_the_containers_files_as_its_root() {
    let host = victim(45);
    let status: serde_json::Value =
        serde_json::from_str(&body(&host.api(VM, "GET", "/v1/status", None))).unwrap();
    let version = status["image"]
        .as_str()
        .expect("an image version")
        .to_owned();
    let target = "/etc/nestbox/image-version";
    attack(
        &host,
        &format!("ln -s {target} /abs; ln -s ../../../../../..{target} /rel; echo linked"),
    );
    for path in [
        target.to_owned(),
        format!("../../../../../..{target}"),
        "/abs".to_owned(),
        "/rel".to_owned(),
        format!("/proc/1/root{target}"),
        format!("/proc/self/root{target}"),
    ] {
        let out = host.api(VM, "GET", &format!("/v1/fs/read?path={path}"), None);
        let got = body(&out);
        assert!(
            !got.contains(&version),
            "{path} read the VM's own file: {got}"
        );
        assert!(
            got.contains("\"not_found\"") || got.contains("\"invalid\""),
            "{path}: {got}"
        );
    }
    // A write is the container root's: the platform's directory mounted in
    // the container refuses it; one through an escaping symlink lands inside.
    let put = |path: &str| {
        let api = format!("api.{VM}.test");
        let out = host
            .curl(VM, &api)
            .args(["-X", "PUT", "--data-binary", "planted"])
            .args(["-H", &format!("Authorization: Bearer {}", host.token(VM))])
            .arg(format!(
                "https://{api}/v1/fs/write?path={path}&mkdirParents=true"
            ))
            .output()
            .unwrap();
        body(&out)
    };
    let refused = put("/.nestbox/planted");
    assert!(refused.contains("\"forbidden\""), "{refused}");
    let inside = put("/abs");
    assert!(inside.contains("\"sha256\""), "{inside}");
    // Inside: a write replaces the symlink itself (the file goes where the
    // name is, in the container); nothing was planted beside the API socket.
    let lines = attack(&host, "cat /abs; echo; ls /.nestbox");
    assert!(said(&lines, "planted"), "{lines:#?}");
    assert!(said(&lines, "api.sock"), "{lines:#?}");
    assert_eq!(
        lines.iter().filter(|l| l.contains("planted")).count(),
        1,
        "{lines:#?}"
    );
}
