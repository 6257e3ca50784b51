//! A minimal QMP client (QEMU's JSON control protocol on a Unix socket):
//! read the greeting, enter command mode with `qmp_capabilities`, run
//! commands. Asynchronous events that arrive in between are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// A QMP session in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and negotiates
    /// capabilities. Every read and write waits at most `timeout`.
    ///
    /// # Errors
    /// The I/O error, or `InvalidData` when QEMU does not speak QMP.
    pub fn connect(socket: &Path, timeout: Duration) -> std::io::Result<Self> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(invalid(format!("no QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs `command` (no arguments) and returns its `return` value.
    ///
    /// # Errors
    /// The I/O error, or `Other` with QEMU's error description.
    pub fn execute(&mut self, command: &str) -> std::io::Result<Value> {
        let request = serde_json::json!({ "execute": command });
        self.writer.write_all(format!("{request}\n").as_bytes())?;
        loop {
            let mut reply = self.read()?;
            if let Some(value) = reply.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = reply.get("error") {
                let desc = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description");
                return Err(std::io::Error::other(format!("{command}: {desc}")));
            }
            // An event ({"event": …}); the reply is still to come.
        }
    }

    fn read(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&line).map_err(|e| invalid(format!("{e}: {line}")))
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A QMP server that plays `script`: for each expected command, the
    /// lines to answer with.
    fn server(
        socket: &Path,
        script: Vec<(&'static str, Vec<&'static str>)>,
    ) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writer
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            for (expect, replies) in script {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let request: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(request["execute"], expect);
                for reply in replies {
                    writer.write_all(format!("{reply}\n").as_bytes()).unwrap();
                }
            }
        })
    }

    fn socket(tag: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("nb-qmp-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn negotiates_then_runs_commands_skipping_events() {
        let path = socket("ok");
        let done = server(
            &path,
            vec![
                ("qmp_capabilities", vec!["{\"return\": {}}"]),
                (
                    "system_powerdown",
                    vec![
                        "{\"event\": \"POWERDOWN\", \"timestamp\": {}}",
                        "{\"return\": {}}",
                    ],
                ),
            ],
        );
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(
            qmp.execute("system_powerdown").unwrap(),
            serde_json::json!({})
        );
        done.join().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn errors_carry_qemus_description() {
        let path = socket("err");
        let done = server(
            &path,
            vec![
                ("qmp_capabilities", vec!["{\"return\": {}}"]),
                (
                    "nope",
                    vec![
                        "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}",
                    ],
                ),
            ],
        );
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let err = qmp.execute("nope").unwrap_err().to_string();
        assert!(err.contains("has not been found"), "{err}");
        done.join().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn nothing_listening_is_an_error() {
        assert!(Qmp::connect(&socket("none"), Duration::from_secs(1)).is_err());
    }
}
