//! The ingress against a real ACME server (Pebble) and a real backend, in
//! network namespaces (root; run serially).
//!
//! Layout per test: Pebble and its DNS in the test's namespace, listening on
//! `10.201.K.1`; the proxy (`nestbox-ingress serve`) in the "edge" namespace
//! at `10.201.K.2` (ports 80 and 443, where Pebble validates); the backend
//! (`nb-backend`) in the "inner" namespace on `127.0.0.1:8080` only, which
//! the proxy reaches by dialing inside that namespace. The client (curl, or
//! rustls below) verifies against Pebble's issuing root.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestbox_tests::Sandbox;
use nestbox_tests::pebble::Pebble;

const NB_BACKEND: &str = env!("CARGO_BIN_EXE_nb-backend");

struct Env {
    k: u8,
    dir: PathBuf,
    pebble: Pebble,
    edge: Sandbox,
    inner: Sandbox,
    backend: Option<Child>,
    ingress: Option<Child>,
    challenge: &'static str,
    header_timeout: u64,
    /// More keys for the `[acme]` table.
    acme_extra: String,
}

impl Env {
    fn new(k: u8, challenge: &'static str) -> Self {
        let dir = std::env::temp_dir().join(format!("nestbox-ingress-{}-{k}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let edge = Sandbox::new("edge").unwrap();
        edge.link_to_host(&format!("10.201.{k}.1/24"), &format!("10.201.{k}.2/24"))
            .unwrap();
        let inner = Sandbox::new("inner").unwrap();
        let pebble = Pebble::start(
            &dir.join("pebble"),
            &format!("10.201.{k}.1"),
            &format!("10.201.{k}.2"),
            8053,
        )
        .unwrap();
        let mut env = Self {
            k,
            dir,
            pebble,
            edge,
            inner,
            backend: None,
            ingress: None,
            challenge,
            header_timeout: 5,
            acme_extra: String::new(),
        };
        env.start_backend();
        env
    }

    fn proxy_ip(&self) -> String {
        format!("10.201.{}.2", self.k)
    }

    fn start_backend(&mut self) {
        let mut cmd = self.inner.command(NB_BACKEND);
        let mut child = cmd
            .arg("127.0.0.1:8080")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // It prints once it listens.
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("listening"), "{line}");
        self.backend = Some(child);
    }

    fn stop_backend(&mut self) {
        if let Some(mut b) = self.backend.take() {
            b.kill().unwrap();
            b.wait().unwrap();
        }
    }

    fn write_config(&self, hosts: &[&str]) -> PathBuf {
        let path = self.dir.join("ingress.toml");
        let mut text = format!(
            "https = \"0.0.0.0:443\"\nhttp = \"0.0.0.0:80\"\n[acme]\ndirectory = \"{}\"\nca_root = \"{}\"\nstate_dir = \"{}\"\nchallenge = \"{}\"\n{}[limits]\nheader_read_timeout_secs = {}\n",
            self.pebble.directory(),
            self.pebble.listener_ca().display(),
            self.dir.join("acme").display(),
            self.challenge,
            self.acme_extra,
            self.header_timeout,
        );
        for host in hosts {
            let _ = write!(
                text,
                "[[route]]\nhost = \"{host}\"\nbackend = \"127.0.0.1:8080\"\nnetns = \"{}\"\n",
                self.inner.netns().display()
            );
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start_ingress(&mut self, hosts: &[&str]) {
        let config = self.write_config(hosts);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("ingress.log"))
            .unwrap();
        let child = self
            .edge
            .command_in(nestbox_tests::workspace_binary("nestbox-ingress"), None)
            .args(["serve", "--config"])
            .arg(config)
            .stderr(log)
            .spawn()
            .unwrap();
        self.ingress = Some(child);
    }

    fn signal_ingress(&self, sig: &str) {
        let pid = self.ingress.as_ref().unwrap().id();
        // nsenter execs sh which execs the ingress: the pid is the ingress.
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn stop_ingress(&mut self) {
        if let Some(mut c) = self.ingress.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            c.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ingress.log")).unwrap_or_default()
    }

    /// curl against the proxy for `url`, trusting `root`.
    fn curl(&self, root: &Path, host: &str, args: &[&str], path: &str) -> Output {
        Command::new("curl")
            .args(["-sS", "--max-time", "60", "--cacert"])
            .arg(root)
            .args(["--resolve", &format!("{host}:443:{}", self.proxy_ip())])
            .args(args)
            .arg(format!("https://{host}{path}"))
            .output()
            .unwrap()
    }

    /// Waits until `host` serves `/hello` with a certificate from Pebble's
    /// current root; returns that root.
    fn wait_served(&self, host: &str) -> PathBuf {
        let root = self.pebble.issuing_root().unwrap();
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let out = self.curl(&root, host, &["-f"], "/hello");
            if out.status.success() {
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    "hello from nb-backend\n"
                );
                return root;
            }
            assert!(
                Instant::now() < deadline,
                "{host} not served within 60 s: {}\ningress log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_ingress();
        self.stop_backend();
        // Kept after a failure, for its logs.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn body(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn http01_certificate_serves_a_loopback_backend() {
    let mut env = Env::new(11, "http-01");
    env.start_ingress(&["vm.test", "8080.vm.test"]);
    let root = env.wait_served("vm.test");
    env.wait_served("8080.vm.test");
    // X-Forwarded-* reach the app; hop-by-hop headers do not.
    // HTTP/1.1: HTTP/2 has no Connection header.
    let out = env.curl(
        &root,
        "vm.test",
        &[
            "--http1.1",
            "-H",
            "Connection: x-private",
            "-H",
            "X-Private: 1",
        ],
        "/headers",
    );
    let headers = body(&out);
    assert!(headers.contains("x-forwarded-proto: https"), "{headers}");
    assert!(headers.contains("x-forwarded-host: vm.test"), "{headers}");
    assert!(
        headers.contains("x-forwarded-for: 10.201.11.1"),
        "{headers}"
    );
    assert!(!headers.contains("x-private"), "{headers}");
    // Port 80 redirects everything but ACME.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
        ])
        .args(["-H", "Host: vm.test", "http://10.201.11.2/x?y=1"])
        .output()
        .unwrap();
    assert_eq!(body(&out), "308 https://vm.test/x?y=1");
}

#[test]
fn tls_alpn01_certificate() {
    let mut env = Env::new(12, "tls-alpn-01");
    env.start_ingress(&["vm.test"]);
    env.wait_served("vm.test");
    assert!(env.log().contains("certificate issued"));
}

fn pattern_file(path: &Path, len: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut i = 0u64;
    while i < len {
        let n = (len - i).min(1 << 16);
        let chunk: Vec<u8> = (i..i + n)
            .map(|j| u8::try_from((j * 31 + 7) % 251).unwrap())
            .collect();
        f.write_all(&chunk).unwrap();
        i += n;
    }
    f.flush().unwrap();
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    body(&out).split_whitespace().next().unwrap().to_owned()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

async fn tls_connect(
    env: &Env,
    root: &Path,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &std::fs::read(root).unwrap()[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect((env.proxy_ip().as_str(), 443))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("vm.test".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[test]
fn http2_websocket_and_streaming_bodies() {
    let mut env = Env::new(13, "http-01");
    env.start_ingress(&["vm.test"]);
    let root = env.wait_served("vm.test");

    let out = env.curl(
        &root,
        "vm.test",
        &["--http2", "-o", "/dev/null", "-w", "%{http_version}"],
        "/hello",
    );
    assert_eq!(body(&out), "2");

    websocket_echo(&env, &root);
    streamed_bodies(&env, &root);
}

/// WebSocket: the upgrade passes and bytes flow both ways after 101.
fn websocket_echo(env: &Env, root: &Path) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tls = tls_connect(env, root, &[b"http/1.1"]).await;
        tls.write_all(
            b"GET /ws HTTP/1.1\r\nHost: vm.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        for msg in [&b"ping one"[..], b"and two"] {
            tls.write_all(msg).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            tls.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }
    });
}

/// 256 MiB down and up, checked by digest; the proxy must not buffer.
fn streamed_bodies(env: &Env, root: &Path) {
    let len = 256u64 << 20;
    let file = env.dir.join("blob");
    pattern_file(&file, len);
    let want = sha256(&file);
    let down = env.dir.join("down");
    let out = env.curl(
        root,
        "vm.test",
        &["-f", "-o", down.to_str().unwrap()],
        &format!("/bytes?n={len}"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&down), want);
    let up = env.dir.join("up");
    let data = format!("@{}", file.display());
    // Uploads stream over both protocols ("Expect:" skips curl's 1 s wait
    // for 100-continue on HTTP/1.1).
    for protocol in ["--http1.1", "--http2"] {
        let out = env.curl(
            root,
            "vm.test",
            &[
                "-f",
                protocol,
                "-H",
                "Expect:",
                "--data-binary",
                &data,
                "-o",
                up.to_str().unwrap(),
            ],
            "/echo",
        );
        assert!(
            out.status.success(),
            "{protocol}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(sha256(&up), want, "{protocol}");
    }
    let peak = vm_hwm_kib(env.ingress.as_ref().unwrap().id());
    assert!(
        peak < 100 * 1024,
        "proxy peak RSS {peak} KiB: bodies were buffered"
    );
    for f in [file, down, up] {
        std::fs::remove_file(f).unwrap();
    }
}

#[test]
fn missing_route_backend_down_and_restart_reuses_the_certificate() {
    let mut env = Env::new(14, "http-01");
    env.start_ingress(&["vm.test", "gone.test"]);
    let root = env.wait_served("vm.test");
    env.wait_served("gone.test");
    let orders = env.pebble.orders().unwrap();
    assert_eq!(orders, 2, "one order per name");

    // Route removed (SIGHUP re-reads the file) → 404 that says so.
    env.write_config(&["vm.test"]);
    env.signal_ingress("-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = env.curl(
            &root,
            "gone.test",
            &["-k", "-w", "\n%{http_code}"],
            "/hello",
        );
        let text = body(&out);
        if text.ends_with("404") {
            assert!(
                text.contains("No service is published on <b>gone.test</b>"),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "route not removed: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Backend down → 502 naming the port.
    env.stop_backend();
    let out = env.curl(&root, "vm.test", &["-w", "\n%{http_code}"], "/hello");
    let text = body(&out);
    assert!(text.ends_with("502"), "{text}");
    assert!(text.contains("not listening on port 8080"), "{text}");
    env.start_backend();

    // Restart: the stored certificate is served, no new order.
    env.stop_ingress();
    env.start_ingress(&["vm.test"]);
    env.wait_served("vm.test");
    assert_eq!(
        env.pebble.orders().unwrap(),
        orders,
        "restart must not order again"
    );
}

#[test]
fn pebble_down_keeps_serving_and_renewal_retries() {
    let mut env = Env::new(15, "http-01");
    env.start_ingress(&["vm.test"]);
    let old_root = env.wait_served("vm.test");
    env.pebble.stop().unwrap();
    // Forced renewal while the CA is down: it fails, the old certificate
    // stays in service.
    env.signal_ingress("-USR1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.log().contains("could not obtain a certificate") {
        assert!(
            Instant::now() < deadline,
            "no failed renewal logged:\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = env.curl(&old_root, "vm.test", &["-f"], "/hello");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CA comes back (a new Pebble: a new root). The retry succeeds and
    // the new certificate is swapped in.
    env.pebble.resume().unwrap();
    env.wait_served("vm.test");
}

#[test]
fn slowloris_does_not_delay_a_normal_client() {
    use tokio::io::AsyncWriteExt;
    let mut env = Env::new(16, "http-01");
    env.header_timeout = 5;
    env.start_ingress(&["vm.test"]);
    let root = env.wait_served("vm.test");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..500 {
            let mut tls = tls_connect(&env, &root, &[b"http/1.1"]).await;
            tls.write_all(b"GET /hello HTTP/1.1\r\nHost: vm.test\r\nX-Slow: ")
                .await
                .unwrap();
            tls.flush().await.unwrap();
            held.push(tls);
        }
        let started = Instant::now();
        let out = tokio::task::spawn_blocking({
            let root = root.clone();
            let ip = env.proxy_ip();
            move || {
                Command::new("curl")
                    .args(["-sSf", "--max-time", "30", "--cacert"])
                    .arg(&root)
                    .args([
                        "--resolve",
                        &format!("vm.test:443:{ip}"),
                        "https://vm.test/hello",
                    ])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            took < Duration::from_secs(env.header_timeout),
            "a normal request took {took:?} with 500 slow clients connected"
        );
        drop(held);
    });
}

#[test]
fn shutdown_drains_in_flight_requests() {
    let mut env = Env::new(17, "http-01");
    env.start_ingress(&["vm.test"]);
    let root = env.wait_served("vm.test");
    let ip = env.proxy_ip();
    let slow = std::thread::spawn(move || {
        Command::new("curl")
            .args(["-sS", "--max-time", "30", "-w", " %{http_code}", "--cacert"])
            .arg(&root)
            .args([
                "--resolve",
                &format!("vm.test:443:{ip}"),
                "https://vm.test/slow?ms=3000",
            ])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(800));
    env.signal_ingress("-TERM");
    let out = slow.join().unwrap();
    assert_eq!(
        body(&out),
        "slow\n 200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = env.ingress.take().unwrap().wait().unwrap();
    assert!(status.success(), "ingress exit: {status}");
}

#[test]
fn ambiguous_framing_cannot_smuggle_a_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = Env::new(18, "http-01");
    env.start_ingress(&["vm.test"]);
    let root = env.wait_served("vm.test");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Both framings, in both orders, with a request hidden after the
        // chunked end. hyper lets Transfer-Encoding win (RFC 9112 §6.3),
        // drops Content-Length and closes the connection after the answer:
        // the hidden request must never run.
        for head in [
            "Content-Length: 60\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 60",
        ] {
            let mut tls = tls_connect(&env, &root, &[b"http/1.1"]).await;
            let request = format!(
                "POST /echo HTTP/1.1\r\nHost: vm.test\r\n{head}\r\n\r\n0\r\n\r\n\
                 GET /headers HTTP/1.1\r\nHost: vm.test\r\n\r\n"
            );
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = tls.read_to_end(&mut answer).await;
            let answer = String::from_utf8_lossy(&answer).to_lowercase();
            assert_eq!(
                answer.matches("http/1.1 ").count(),
                1,
                "one response only: {answer}"
            );
            assert!(answer.contains("connection: close"), "{answer}");
            assert!(
                !answer.contains("x-forwarded-proto"),
                "the hidden request ran: {answer}"
            );
        }
    });
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .count()
}

#[test]
fn a_vanished_namespace_loses_its_dialer_thread() {
    nestbox_tests::require_root();
    let dialers = nestbox_ingress::dial::Dialers::default();
    let mut old = Command::new("sleep").arg("60").spawn().unwrap();
    let mut new = Command::new("sleep").arg("60").spawn().unwrap();
    let old_path = PathBuf::from(format!("/proc/{}/ns/net", old.id()));
    let new_path = PathBuf::from(format!("/proc/{}/ns/net", new.id()));
    let before = threads_named("ingress-netns");
    drop(dialers.get(&old_path).unwrap());
    assert!(dialers.cached(&old_path).is_some());
    assert_eq!(threads_named("ingress-netns"), before + 1);
    // The old container's process goes: its path names nothing any more.
    old.kill().unwrap();
    old.wait().unwrap();
    assert!(dialers.cached(&old_path).is_none());
    drop(dialers.get(&new_path).unwrap());
    assert_eq!(dialers.len(), 1, "the dead namespace's dialer is dropped");
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads_named("ingress-netns") != before + 1 {
        assert!(
            Instant::now() < deadline,
            "the old socket thread did not end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    new.kill().unwrap();
    new.wait().unwrap();
}

/// A CA front that accepts every connection and, for every third, never
/// answers (the others are passed to Pebble): what a stuck CA, or a stuck
/// path to it, looks like to a client. Returns its address and how many
/// connections it held.
fn tarpit(listen: &str, pebble: &str) -> Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind(listen).unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let count = held.clone();
    let pebble = pebble.to_owned();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(client) = conn else { continue };
            if n % 3 == 0 {
                count.fetch_add(1, Ordering::SeqCst);
                kept.push(client);
                continue;
            }
            let Ok(server) = std::net::TcpStream::connect(&pebble) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    held
}

#[test]
fn a_ca_that_never_answers_stops_only_its_own_requests() {
    nestbox_tests::require_tool("nft", "nftables");
    let mut env = Env::new(19, "http-01");
    // Every connection from the proxy's namespace to Pebble goes through
    // the tarpit.
    let pebble = format!("10.201.{}.1:14000", env.k);
    let held = tarpit("10.201.19.1:14100", &pebble);
    let rules = env.dir.join("tarpit.nft");
    std::fs::write(
        &rules,
        "table ip tarpit {\n  chain out {\n    type nat hook output priority -100;\n    \
         ip daddr 10.201.19.1 tcp dport 14000 dnat to 10.201.19.1:14100\n  }\n}\n",
    )
    .unwrap();
    let out = env
        .edge
        .command("nft")
        .arg("-f")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(out.status.success(), "nft: {out:?}");
    env.acme_extra = "request_timeout_ms = 1500\norder_timeout_ms = 8000\n".into();
    let hosts = ["a.test", "b.test", "c.test", "d.test", "e.test"];
    env.start_ingress(&hosts);
    for host in hosts {
        env.wait_served(host);
    }
    assert!(
        held.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the tarpit held no connection"
    );
    let log = env.log();
    assert!(
        log.contains("did not answer"),
        "no request timed out:\n{log}"
    );
}

#[test]
fn the_order_budget_caps_orders_and_the_waiting_names_say_so() {
    let mut env = Env::new(20, "http-01");
    env.acme_extra = "orders_per_hour = 2\n".into();
    let hosts = ["a.test", "b.test", "c.test", "d.test"];
    env.start_ingress(&hosts);
    let root = env.pebble.issuing_root().unwrap();
    let served = |env: &Env| -> Vec<&str> {
        hosts
            .iter()
            .copied()
            .filter(|h| {
                env.curl(&root, h, &["-f", "--max-time", "5"], "/hello")
                    .status
                    .success()
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_mins(1);
    while served(&env).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "two certificates within the budget:\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // No third order within the hour.
    std::thread::sleep(Duration::from_secs(3));
    let have = served(&env);
    assert_eq!(have.len(), 2, "{have:?}\n{}", env.log());
    for host in hosts.iter().filter(|h| !have.contains(h)) {
        let out = Command::new("curl")
            .args(["-sS", "-i", "-H", &format!("Host: {host}")])
            .arg(format!("http://{}/", env.proxy_ip()))
            .output()
            .unwrap();
        let page = body(&out);
        assert!(page.starts_with("HTTP/1.1 503"), "{host}: {page}");
        assert!(
            page.contains("ACME budget") && page.to_ascii_lowercase().contains("retry-after"),
            "{host}: {page}"
        );
    }
    assert!(env.log().contains("budget spent"), "{}", env.log());
}
