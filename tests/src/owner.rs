//! Driving `nb-listen`, the scriptable socket owner (see its source).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};

/// A running `nb-listen` process.
#[derive(Debug)]
pub struct Owner {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// What a `listen` answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listened {
    /// Handle for `close`.
    pub id: u64,
    /// The bound port.
    pub port: u16,
    /// `CLOCK_MONOTONIC` (ns) just before `listen()`.
    pub t0_ns: u64,
}

impl Owner {
    /// Starts `cmd` (an `nb-listen`, e.g. from [`crate::Sandbox::command`]).
    ///
    /// # Errors
    /// If it cannot be started.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn ask(&mut self, line: &str) -> Result<Vec<String>> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let mut answer = String::new();
        if self.stdout.read_line(&mut answer)? == 0 {
            bail!("nb-listen exited before answering {line:?}");
        }
        let words: Vec<String> = answer.split_whitespace().map(str::to_owned).collect();
        match words.first().map(String::as_str) {
            Some("ok") => Ok(words[1..].to_vec()),
            _ => bail!("nb-listen answered {line:?} with {}", answer.trim()),
        }
    }

    fn listened(words: &[String]) -> Result<Listened> {
        Ok(Listened {
            id: words.first().context("id")?.parse()?,
            port: words.get(1).context("port")?.parse()?,
            t0_ns: words.get(2).context("t0")?.parse()?,
        })
    }

    /// `listen()` on `addr` (`flags`: `reuseport`, `v6only`).
    ///
    /// # Errors
    /// If the helper fails.
    pub fn listen(&mut self, addr: &str, flags: &str) -> Result<Listened> {
        let words = self.ask(&format!("listen {addr} {flags}"))?;
        Self::listened(&words)
    }

    /// `listen()` without `bind()`.
    ///
    /// # Errors
    /// If the helper fails.
    pub fn autobind(&mut self) -> Result<Listened> {
        let words = self.ask("autobind")?;
        Self::listened(&words)
    }

    /// Binds a UDP socket; returns the port.
    ///
    /// # Errors
    /// If the helper fails.
    pub fn udp(&mut self, addr: &str) -> Result<u16> {
        Ok(self.ask(&format!("udp {addr}"))?[1].parse()?)
    }

    /// Opens an outgoing TCP connection; returns the local port.
    ///
    /// # Errors
    /// If the helper fails.
    pub fn connect(&mut self, addr: &str) -> Result<u16> {
        Ok(self.ask(&format!("connect {addr}"))?[1].parse()?)
    }

    /// Closes socket `id`.
    ///
    /// # Errors
    /// If the helper fails.
    pub fn close(&mut self, id: u64) -> Result<()> {
        self.ask(&format!("close {id}")).map(drop)
    }

    /// SIGKILLs the process and reaps it.
    ///
    /// # Errors
    /// If it cannot be killed.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Already reaped after kill(); otherwise make sure it goes.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
