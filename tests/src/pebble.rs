//! Pebble (the ACME test CA) and pebble-challtestsrv (its DNS), run by a test
//! and stopped on drop: in the caller's network namespace ([`Pebble::start`],
//! for the netns-simulated guest), or for real VMs in a network namespace of
//! their own behind the host ([`Pebble::start_for_vms`]), the way an ACME
//! server elsewhere on the network is reached — a VM may reach nothing on
//! the host itself.
//!
//! Pebble listens on `acme_ip:14000` (its certificate is made here, signed by
//! a CA the test trusts: [`Pebble::listener_ca`]); its validation authority
//! connects to ports 80 and 443 of whatever the DNS answers, which is
//! `target_ip` for every name.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Sandbox;

/// A running Pebble + DNS.
#[derive(Debug)]
pub struct Pebble {
    dir: PathBuf,
    acme_ip: String,
    /// Where this process reaches Pebble's listener and management ports
    /// (its listen address, or loopback when it listens on every address of
    /// this namespace).
    probe_ip: String,
    dns_port: u16,
    server: Option<Child>,
    dns: Child,
    /// The namespace Pebble runs in, when it has one of its own (dropped
    /// last: it kills what runs in it).
    netns: Option<Sandbox>,
}

impl Pebble {
    /// Starts both, with state in `dir`; names resolve to `target_ip`.
    ///
    /// # Errors
    /// If either cannot start (install the `pebble` package).
    pub fn start(dir: &Path, acme_ip: &str, target_ip: &str, dns_port: u16) -> Result<Self> {
        Self::start_on(dir, acme_ip, acme_ip, target_ip, dns_port, None)
    }

    /// Starts both for real VMs, in a network namespace of their own linked
    /// to the host as `subnet.0/24` (`subnet` is three octets, e.g.
    /// `10.125.3`): the host side is `.1`, Pebble `.2`, and the namespace's
    /// default route goes back through the host (Pebble validates by
    /// connecting to the VMs). VMs reach it only because `launcher.toml`
    /// allow-lists [`Pebble::subnet`] (see [`Pebble::launcher_toml`]). The
    /// DNS knows no name until [`Pebble::add_a`].
    ///
    /// # Errors
    /// If the namespace cannot be made or either cannot start (install the
    /// `pebble` package).
    pub fn start_for_vms(dir: &Path, subnet: &str) -> Result<Self> {
        let netns = Sandbox::new("acme")?;
        netns.link_to_host(&format!("{subnet}.1/24"), &format!("{subnet}.2/24"))?;
        netns.default_route(&format!("{subnet}.1"))?;
        Self::start_on(
            dir,
            &format!("{subnet}.2"),
            "0.0.0.0",
            "",
            8053,
            Some(netns),
        )
    }

    fn start_on(
        dir: &Path,
        acme_ip: &str,
        listen_ip: &str,
        target_ip: &str,
        dns_port: u16,
        netns: Option<Sandbox>,
    ) -> Result<Self> {
        crate::require_tool("pebble", "pebble");
        crate::require_tool("pebble-challtestsrv", "pebble");
        crate::require_tool("curl", "curl");
        std::fs::create_dir_all(dir)?;
        // Pebble's management ports: loopback, unless it has a namespace of
        // its own, where this process reaches it at its address.
        let management = if netns.is_some() {
            acme_ip
        } else {
            "127.0.0.1"
        };
        // The listener certificate, for the proxy's ACME client to trust.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "nestbox test Pebble listener CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(ca, ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let leaf = rcgen::CertificateParams::new(vec![
            "localhost".to_owned(),
            acme_ip.to_owned(),
            "127.0.0.1".to_owned(),
        ])?
        .signed_by(&key, &issuer)?;
        std::fs::write(dir.join("listener-ca.pem"), issuer.as_ref().pem())?;
        std::fs::write(dir.join("listener.pem"), leaf.pem())?;
        std::fs::write(dir.join("listener.key"), key.serialize_pem())?;
        std::fs::write(
            dir.join("pebble.json"),
            format!(
                r#"{{"pebble": {{"listenAddress": "{listen_ip}:14000", "managementListenAddress": "{management}:15000",
                "certificate": "{0}/listener.pem", "privateKey": "{0}/listener.key",
                "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "", "externalAccountBindingRequired": false}}}}"#,
                dir.display()
            ),
        )?;
        let dns = command(netns.as_ref(), "pebble-challtestsrv")
            .args(["-defaultIPv4", target_ip, "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("{management}:8055")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dns.log"))?)
            .spawn()
            .context("start pebble-challtestsrv")?;
        let mut dns = dns;
        std::thread::sleep(Duration::from_millis(200));
        if let Some(status) = dns.try_wait()? {
            bail!(
                "pebble-challtestsrv exited ({status}): {}",
                std::fs::read_to_string(dir.join("dns.log")).unwrap_or_default()
            );
        }
        let mut me = Self {
            dir: dir.to_owned(),
            acme_ip: acme_ip.to_owned(),
            probe_ip: if netns.is_some() {
                acme_ip.to_owned()
            } else if listen_ip == "0.0.0.0" {
                "127.0.0.1".to_owned()
            } else {
                listen_ip.to_owned()
            },
            dns_port,
            server: None,
            dns,
            netns,
        };
        me.resume()?;
        Ok(me)
    }

    /// (Re)starts Pebble after [`Pebble::stop`]. Pebble keeps no state: a
    /// restarted one has a new root and no record of earlier orders.
    ///
    /// # Errors
    /// If it cannot start.
    pub fn resume(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pebble.log"))?;
        let child = command(self.netns.as_ref(), "pebble")
            .arg("-config")
            .arg(self.dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start pebble")?;
        self.server = Some(child);
        self.wait_ready()
    }

    /// Stops Pebble (the DNS stays).
    ///
    /// # Errors
    /// If it cannot be killed.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.server.take() {
            p.kill()?;
            p.wait()?;
        }
        Ok(())
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self
                .get(&format!("https://{}:14000/dir", self.probe_ip))
                .is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "pebble did not answer within 20 s; see {}/pebble.log",
            self.dir.display()
        )
    }

    fn get(&self, url: &str) -> Result<String> {
        let out = Command::new("curl")
            .args(["-sSf", "--max-time", "5", "--cacert"])
            .arg(self.listener_ca())
            .arg(url)
            .output()?;
        if !out.status.success() {
            bail!("GET {url}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// A `launcher.toml` whose VMs get their certificates from this Pebble:
    /// `image`, `domain`, the address `pool` and `tap_prefix`, Pebble's
    /// subnet allow-listed in the firewall, and a `[guest]` table with the
    /// ingress on 80/443 and this ACME directory (its listener's CA inline,
    /// for the config disk).
    ///
    /// # Errors
    /// If the listener CA cannot be read.
    pub fn launcher_toml(
        &self,
        image: &Path,
        domain: &str,
        pool: &str,
        tap_prefix: &str,
    ) -> Result<String> {
        let ca = std::fs::read_to_string(self.listener_ca())?;
        Ok(format!(
            "image = {image:?}\ndomain = {domain:?}\npool = {pool:?}\ntap_prefix = {tap_prefix:?}\n\
             [firewall]\nallow = [{subnet:?}]\n\
             [guest.ingress]\nhttps = \"0.0.0.0:443\"\nhttp = \"0.0.0.0:80\"\n\
             [guest.ingress.acme]\ndirectory = {directory:?}\nca_root_pem = {ca:?}\nstate_dir = \"/data/acme\"\n",
            image = image.display().to_string(),
            directory = self.directory(),
            subnet = self.subnet(),
        ))
    }

    /// Makes the DNS answer `host` with `ip` (A record).
    ///
    /// # Errors
    /// If pebble-challtestsrv refuses.
    pub fn add_a(&self, host: &str, ip: &str) -> Result<()> {
        let out = Command::new("curl")
            .args(["-sSf", "--max-time", "5", "--data-binary"])
            .arg(format!(r#"{{"host":"{host}","addresses":["{ip}"]}}"#))
            .arg(format!("http://{}:8055/add-a", self.management_ip()))
            .output()?;
        if !out.status.success() {
            bail!("add-a {host}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The CA of Pebble's own listener certificate (PEM file).
    #[must_use]
    pub fn listener_ca(&self) -> PathBuf {
        self.dir.join("listener-ca.pem")
    }

    /// The namespace Pebble runs in, when it has one of its own.
    #[must_use]
    pub fn netns(&self) -> Option<&Sandbox> {
        self.netns.as_ref()
    }

    /// Pebble's address.
    #[must_use]
    pub fn address(&self) -> &str {
        &self.acme_ip
    }

    /// Where this process reaches the management ports.
    fn management_ip(&self) -> &str {
        if self.netns.is_some() {
            &self.acme_ip
        } else {
            "127.0.0.1"
        }
    }

    /// The /24 Pebble's address is in (what a firewall allow-lists).
    #[must_use]
    pub fn subnet(&self) -> String {
        let (net, _) = self.acme_ip.rsplit_once('.').unwrap_or((&self.acme_ip, ""));
        format!("{net}.0/24")
    }

    /// The ACME directory URL.
    #[must_use]
    pub fn directory(&self) -> String {
        format!("https://{}:14000/dir", self.acme_ip)
    }

    /// Writes the root that issued this Pebble's certificates to a file and
    /// returns its path.
    ///
    /// # Errors
    /// If Pebble does not answer.
    pub fn issuing_root(&self) -> Result<PathBuf> {
        let pem = self.get(&format!("https://{}:15000/roots/0", self.management_ip()))?;
        let path = self.dir.join("issuing-root.pem");
        std::fs::write(&path, pem)?;
        Ok(path)
    }

    /// How many orders Pebble has received since it started (from its log).
    ///
    /// # Errors
    /// If the log cannot be read.
    pub fn orders(&self) -> Result<usize> {
        let log = std::fs::read_to_string(self.dir.join("pebble.log"))?;
        Ok(log.lines().filter(|l| l.contains("Added order")).count())
    }
}

/// `program`, in `netns` when given (staying in this process's cgroup).
fn command(netns: Option<&Sandbox>, program: &str) -> Command {
    match netns {
        Some(ns) => ns.command_in(program, None),
        None => Command::new(program),
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
        drop(self.netns.take());
    }
}
