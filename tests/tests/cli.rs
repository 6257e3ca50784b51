//! The `nestbox` CLI against a real VM (root; QEMU): the user's journey —
//! create, exec (exit codes, pipes), cp, url (private, a login link, a
//! share link, public), a console under a terminal with a
//! detach and a reattach, tunnels (20 connections at once to a
//! loopback-only listener, and `-W` over stdio), destroy.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nestbox_tests::vms::{Host, body};

struct Cli {
    config: PathBuf,
    state: PathBuf,
}

impl Cli {
    fn new(host: &Host) -> Self {
        let config = host.dir.join("cli-config");
        Self {
            config,
            state: host.dir.clone(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(nestbox_tests::workspace_binary("nestbox"));
        cmd.arg("--config-dir")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "nestbox {args:?}: {}{}",
            body(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        body(&out)
    }
}

/// Waits until `nestbox status VM` answers with a running container.
fn wait_running(cli: &Cli, vm: &str) {
    let deadline = Instant::now() + Duration::from_mins(3);
    loop {
        let out = cli.run(&["status", vm, "--json"]);
        if out.status.success() && body(&out).contains("\"running\"") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{vm} did not come up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_users_journey_create_exec_console_tunnels_destroy() {
    let mut host = Host::new(44);
    let cli = Cli::new(&host);
    let ca = host.ca().display().to_string();
    // create: the launcher on this host, the API remembered.
    let out = cli.ok(&["create", "web", "--ca", &ca, "--no-wait"]);
    assert!(out.contains("https://web.test/"), "{out}");
    let ip = host.address("web");
    host.adopt("web", &ip);
    wait_running(&cli, "web");
    let listed: serde_json::Value = serde_json::from_str(&cli.ok(&["list", "--json"])).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "web")
    );

    exec(&cli);
    files(&host, &cli);
    urls(&host, &cli);
    console(&cli);
    checkpoints(&cli);
    tunnels(&mut host, &cli);
    // destroy: gone from the host and from the configuration.
    cli.ok(&["destroy", "web"]);
    host.created.retain(|n| n != "web");
    let out = cli.run(&["exec", "web", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no VM named \"web\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// checkpoint create|list|info|delete and restore: the file comes back.
fn checkpoints(cli: &Cli) {
    let note = |text: &str| {
        let script = format!("echo {text} > /tmp/journey-note");
        cli.ok(&["exec", "web", "--", "sh", "-c", &script]);
    };
    note("kept");
    let id = cli.ok(&["checkpoint", "create", "web", "-c", "journey"]);
    let id = id.trim();
    assert!(id.starts_with('v'), "{id}");
    note("lost");
    let listed: serde_json::Value =
        serde_json::from_str(&cli.ok(&["checkpoint", "list", "web", "--json"])).unwrap();
    assert_eq!(listed["head"], id, "{listed}");
    let info = cli.ok(&["checkpoint", "info", "web", id]);
    assert!(
        info.contains("journey") && info.contains(&format!("/.nestbox/checkpoints/{id}")),
        "{info}"
    );
    let out = cli.ok(&["restore", "web", id]);
    assert!(out.contains(&format!("restored {id}")), "{out}");
    assert_eq!(
        cli.ok(&["exec", "web", "--", "cat", "/tmp/journey-note"]),
        "kept\n"
    );
    // --durable returns once it is in the object store (the default one,
    // a directory on the user's disk).
    let durable = cli.ok(&["checkpoint", "create", "web", "--durable"]);
    let durable = durable.trim();
    let info = cli.ok(&["checkpoint", "info", "web", durable]);
    assert!(
        info.contains(&format!("upload:   durable (incremental to {id},")),
        "{info}"
    );
    let list = cli.ok(&["checkpoint", "list", "web"]);
    assert!(list.contains("durable"), "{list}");
    cli.ok(&["checkpoint", "delete", "web", durable]);
    cli.ok(&["checkpoint", "delete", "web", id]);
    let out = cli.run(&["checkpoint", "info", "web", id]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a deleted checkpoint is not found"
    );
    let out = cli.run(&["restore", "web", "v999"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("GET /v1/checkpoints"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// exec: output, exit codes, a pipe both ways.
fn exec(cli: &Cli) {
    let uname = cli.ok(&["exec", "web", "--", "uname", "-a"]);
    assert!(uname.starts_with("Linux web "), "{uname}");
    for code in [0, 1, 255] {
        let out = cli.run(&["exec", "web", "--", "sh", "-c", &format!("exit {code}")]);
        assert_eq!(out.status.code(), Some(code), "{out:?}");
    }
    let out = cli.run(&["exec", "web", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137));
    assert!(String::from_utf8_lossy(&out.stderr).contains("killed by SIGKILL"));
    // A memory hog meets the container's limit: the kernel's OOM killer,
    // and the exit says so.
    let out = cli.run(&[
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "x=0123456789; while :; do x=$x$x; done",
    ]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("OOM killer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = cli
        .command()
        .args(["exec", "web", "--", "sh", "-c", "tr a-z A-Z; echo done >&2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped through\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(body(&out), "PIPED THROUGH\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "done\n");
    assert!(out.status.success());
}

/// cp and ls: a file and a directory tree there and back, byte for byte.
fn files(host: &Host, cli: &Cli) {
    let local = host.dir.join("cp");
    std::fs::create_dir_all(local.join("site/css")).unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| i.to_le_bytes()[1] ^ 0x5a)
        .collect();
    std::fs::write(local.join("site/index.html"), "<h1>hi</h1>\n").unwrap();
    std::fs::write(local.join("site/css/big.bin"), &big).unwrap();
    std::os::unix::fs::symlink("index.html", local.join("site/home.html")).unwrap();
    let out = cli.ok(&[
        "cp",
        local.join("site/css/big.bin").to_str().unwrap(),
        "web:/data/",
    ]);
    assert!(out.contains("3000000 bytes"), "{out}");
    let listing = cli.ok(&["ls", "web:/data"]);
    assert!(
        listing
            .lines()
            .any(|l| l.ends_with(" big.bin") && l.contains("3000000")),
        "{listing}"
    );
    cli.ok(&[
        "cp",
        "web:/data/big.bin",
        local.join("back.bin").to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(local.join("back.bin")).unwrap() == big,
        "the file came back changed"
    );
    // A directory goes as a tar stream, and comes back the same way.
    cli.ok(&["cp", local.join("site").to_str().unwrap(), "web:/srv"]);
    let index = cli.ok(&["exec", "web", "--", "cat", "/srv/site/home.html"]);
    assert_eq!(index, "<h1>hi</h1>\n");
    cli.ok(&["cp", "web:/srv/site", local.join("again").to_str().unwrap()]);
    assert!(std::fs::read(local.join("again/site/css/big.bin")).unwrap() == big);
    assert_eq!(
        std::fs::read_link(local.join("again/site/home.html")).unwrap(),
        std::path::Path::new("index.html")
    );
    // A missing remote file: a clear error, exit 2.
    let out = cli.run(&["cp", "web:/no/such", local.join("x").to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `curl -i` of `https://web.test{target}` with `headers`: the whole answer.
fn fetch(host: &Host, target: &str, headers: &[&str]) -> String {
    let mut cmd = host.curl("web", "web.test");
    cmd.arg("-i");
    for h in headers {
        cmd.args(["-H", h]);
    }
    body(
        &cmd.arg(format!("https://web.test{target}"))
            .output()
            .unwrap(),
    )
}

/// The `__Host-nestbox=…` pair a link's answer sets.
fn cookie_of(answer: &str) -> String {
    let line = answer
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: __host-nestbox=")
        })
        .unwrap_or_else(|| panic!("no cookie set: {answer}"));
    line.split_once(": ")
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// A link's path and query.
fn target_of(link: &str) -> String {
    let link = link
        .trim()
        .strip_prefix("https://web.test")
        .unwrap_or_else(|| panic!("{link}"));
    link.to_owned()
}

/// url: private by default; a login link for the browser, a share link
/// revoked, then public.
fn urls(host: &Host, cli: &Cli) {
    cli.ok(&[
        "services",
        "create",
        "web",
        "site",
        "--http-port",
        "8080",
        "--",
        "busybox",
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/srv/site",
    ]);
    host.wait_body("web", "web.test", "/", "<h1>hi</h1>\n");
    let out = cli.run(&["url", "web"]);
    assert!(out.status.success());
    assert_eq!(body(&out), "https://web.test/\n");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(said.contains("private"), "{said}");
    let link = said
        .lines()
        .find(|l| l.contains("/__nestbox/auth?t="))
        .unwrap_or_else(|| panic!("no login link: {said}"));
    // A stranger is refused; the login link gives the browser its cookie.
    let answer = fetch(host, "/", &[]);
    assert!(
        answer.starts_with("HTTP/1.1 401") || answer.starts_with("HTTP/2 401"),
        "{answer}"
    );
    let opened = fetch(host, &target_of(link), &[]);
    assert!(opened.contains(" 303"), "{opened}");
    let cookie = format!("Cookie: {}", cookie_of(&opened));
    assert!(fetch(host, "/", &[&cookie]).ends_with("<h1>hi</h1>\n"));
    // A share link, listed, revoked.
    let share = cli.ok(&["url", "share", "web", "--ttl", "10m"]);
    let opened = fetch(host, &target_of(&share), &[]);
    let shared = format!("Cookie: {}", cookie_of(&opened));
    assert!(fetch(host, "/", &[&shared]).ends_with("<h1>hi</h1>\n"));
    let listed = cli.ok(&["url", "shares", "web"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let out = cli.ok(&["url", "revoke", "web", "--all"]);
    assert!(out.contains("1 share link(s) revoked"), "{out}");
    assert!(fetch(host, "/", &[&shared]).contains(" 401"));
    // Public: anyone, at once.
    let out = cli.run(&["url", "web", "--auth", "public"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("public"));
    assert!(fetch(host, "/", &[]).ends_with("<h1>hi</h1>\n"));
    let ports = cli.ok(&["ports", "web"]);
    assert!(
        ports
            .lines()
            .any(|l| l.starts_with("8080 ") && l.contains(" public ")),
        "{ports}"
    );
}

/// console: a shell under a terminal; `Ctrl-]` detaches, attach resumes
/// with the screen.
fn console(cli: &Cli) {
    let mut console = rexpect::session::spawn_command(
        {
            let mut c = cli.command();
            c.args(["console", "web"]);
            c
        },
        Some(30_000),
    )
    .unwrap();
    console.exp_string("Ctrl-] detaches").unwrap();
    console.send_line("echo answer-$((6*7))").unwrap();
    console.exp_string("answer-42").unwrap();
    console.send_control(']').unwrap();
    let (_, detached) = console.exp_regex(r"detached from session (\d+)").unwrap();
    let id = detached.rsplit(' ').next().unwrap().trim().to_owned();
    console.exp_eof().unwrap();
    let sessions = cli.ok(&["sessions", "list", "web"]);
    assert!(
        sessions
            .lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains("running")),
        "{sessions}"
    );
    let mut attached = rexpect::session::spawn_command(
        {
            let mut c = cli.command();
            c.args(["sessions", "attach", "web", &id]);
            c
        },
        Some(30_000),
    )
    .unwrap();
    // The screen first: the last answer is on it.
    attached.exp_string("answer-42").unwrap();
    attached.send_line("exit 5").unwrap();
    attached.exp_eof().unwrap();
    match attached.process().wait().unwrap() {
        rexpect::process::WaitStatus::Exited(_, code) => assert_eq!(code, 5),
        other => panic!("{other:?}"),
    }
}

/// Tunnels: 20 connections at once to an echo server on the container's
/// loopback only, `-W` over stdio, and a clear error when nothing listens.
fn tunnels(host: &mut Host, cli: &Cli) {
    host.install_helper("web");
    cli.ok(&[
        "services",
        "create",
        "web",
        "echo",
        "--",
        "/nb-escape",
        "echo",
        "3000",
    ]);
    let deadline = Instant::now() + Duration::from_mins(1);
    while !cli
        .ok(&["ports", "web"])
        .lines()
        .any(|l| l.starts_with("3000 "))
    {
        assert!(Instant::now() < deadline, "the echo server did not listen");
        std::thread::sleep(Duration::from_millis(300));
    }
    let local = 23044;
    let mut proxy = cli
        .command()
        .args(["proxy", "web", &format!("{local}:3000")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", local)).is_err() {
        assert!(Instant::now() < deadline, "nestbox proxy did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    let workers: Vec<_> = (0..20u8)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", local)).unwrap();
                s.set_read_timeout(Some(Duration::from_mins(1))).unwrap();
                let data: Vec<u8> = (0..200_000u32)
                    .map(|j| j.to_le_bytes()[0].wrapping_mul(31) ^ i)
                    .collect();
                let writer = {
                    let mut w = s.try_clone().unwrap();
                    let data = data.clone();
                    std::thread::spawn(move || w.write_all(&data).unwrap())
                };
                let mut back = vec![0; data.len()];
                s.read_exact(&mut back).unwrap();
                writer.join().unwrap();
                assert!(back == data, "connection {i}: the bytes came back changed");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    // -W: stdin and stdout, as ssh's ProxyCommand uses it.
    let mut stdio = cli
        .command()
        .args(["proxy", "web", "-W", "localhost:3000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = stdio.stdin.take().unwrap();
    input.write_all(b"through stdio\n").unwrap();
    let mut output = stdio.stdout.take().unwrap();
    let mut got = [0u8; 14];
    output.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"through stdio\n");
    drop(input);
    let _ = stdio.wait();
    // Nothing listens on 3001: a clear error.
    let out = cli.run(&["proxy", "web", "-W", "localhost:3001"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing listens on 127.0.0.1:3001"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
