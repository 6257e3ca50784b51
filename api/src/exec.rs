//! Exec sessions over a WebSocket (`GET /v1/exec`, attach at
//! `GET /v1/exec/{id}`), wire-compatible with Sprites' exec:
//!
//! - the query of a new session ([`ExecParams`]): `cmd` (repeated, argv in
//!   order), `path`, `tty`, `rows`, `cols`, `stdin`, `dir`, `env` (repeated
//!   `K=V`; given, it replaces the default environment),
//!   `max_run_after_disconnect` (a duration: `10s`, `500ms`, `0` = forever);
//! - without a TTY, binary frames carry a stream id byte ([`StreamId`]) and
//!   the payload: 0 stdin, 1 stdout, 2 stderr, 3 exit (one byte: the code,
//!   or 128 + the signal), 4 stdin EOF; with a TTY, raw bytes both ways;
//! - JSON text frames ([`Control`]): `resize`, `signal` from the client;
//!   `session_info` first and `exit` last from the guest.
//!
//! Beyond Sprites (listed in the capabilities header): every session is
//! detachable and outlives a disconnect (`max_run_after_disconnect`); all
//! the output of a session (stdout and stderr, or the TTY's) is one
//! sequence of bytes numbered from 0, `session_info.offset` says where the
//! bytes that follow start, and an attach with `?offset=N` replays from N
//! (a [`Control::Gap`] says what the buffer no longer holds); a TTY attach
//! without an offset first gets the current screen (`session_info.screen`);
//! the `exit` frame carries the whole status ([`ExitStatus`]).

use serde::{Deserialize, Serialize};

/// The stream id that starts each binary frame of a session without a TTY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamId {
    /// Client → guest: input.
    Stdin = 0,
    /// Guest → client: standard output.
    Stdout = 1,
    /// Guest → client: standard error.
    Stderr = 2,
    /// Guest → client: the exit code, one byte (Sprites' exit frame).
    Exit = 3,
    /// Client → guest: no more input.
    StdinEof = 4,
}

impl StreamId {
    /// The id of a frame's first byte.
    #[must_use]
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Stdin,
            1 => Self::Stdout,
            2 => Self::Stderr,
            3 => Self::Exit,
            4 => Self::StdinEof,
            _ => return None,
        })
    }
}

/// How a session's process ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Its exit code, or 128 + the signal that killed it (as a shell
    /// reports it).
    pub exit_code: i32,
    /// The signal that killed it (`KILL`, `TERM`, …), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Whether the kernel's OOM killer killed it (the session's cgroup
    /// counted an OOM kill and it died of `SIGKILL`).
    #[serde(default)]
    pub oom_killed: bool,
    /// Whether it dumped core.
    #[serde(default)]
    pub core_dumped: bool,
}

impl ExitStatus {
    /// The one byte of Sprites' binary exit frame.
    #[must_use]
    pub fn code_byte(&self) -> u8 {
        u8::try_from(self.exit_code).unwrap_or(255)
    }
}

/// A JSON text frame, either way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Client → guest: the terminal's size (the session's owner's wins; a
    /// missing or 0 field keeps the current value).
    Resize {
        /// Columns.
        #[serde(default)]
        cols: u16,
        /// Rows.
        #[serde(default)]
        rows: u16,
    },
    /// Client → guest: a signal for the session's process group (`TERM`,
    /// `SIGINT`, `9`, …).
    Signal {
        /// Its name, with or without `SIG`, or its number.
        signal: String,
    },
    /// Guest → client: the first text frame of every connection.
    SessionInfo(SessionInfo),
    /// Guest → client: bytes from `from` to `to` (exclusive) are no longer
    /// held; what follows starts at `to`.
    Gap {
        /// The first byte asked for.
        from: u64,
        /// The first byte still held.
        to: u64,
    },
    /// Guest → client: the process ended (before the binary exit frame,
    /// which carries one byte of it).
    Exit(ExitStatus),
}

/// `session_info`: what the session is and where its bytes stand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Its id (decimal digits).
    pub session_id: String,
    /// Its command line.
    pub command: String,
    /// When it started (Unix seconds).
    pub created: u64,
    /// Its terminal's columns (0 without a TTY).
    pub cols: u16,
    /// Its terminal's rows (0 without a TTY).
    pub rows: u16,
    /// Whether this connection owns the session (its size wins).
    pub is_owner: bool,
    /// Whether it has a TTY.
    pub tty: bool,
    /// The offset of the next output byte this connection gets (after the
    /// screen, when one comes first).
    #[serde(default)]
    pub offset: u64,
    /// Whether the first binary frame is the current screen (a TTY attach
    /// without an offset), not counted in offsets.
    #[serde(default)]
    pub screen: bool,
}

/// The query of a new session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecParams {
    /// The argv (empty: the container's shell).
    pub cmd: Vec<String>,
    /// The program, when not `cmd[0]`.
    pub path: Option<String>,
    /// Whether it gets a TTY.
    pub tty: bool,
    /// The TTY's rows.
    pub rows: Option<u16>,
    /// The TTY's columns.
    pub cols: Option<u16>,
    /// Whether input is forwarded (default: with a TTY yes, without no, as
    /// in Sprites).
    pub stdin: Option<bool>,
    /// The working directory.
    pub dir: Option<String>,
    /// `K=V`; given, they replace the default environment.
    pub env: Vec<String>,
    /// How long it runs with nobody attached (`10s`, `0` = forever).
    pub max_run_after_disconnect: Option<String>,
}

/// A query that cannot be a session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{name}`: {why}")]
pub struct QueryError {
    /// The parameter.
    pub name: String,
    /// What is wrong.
    pub why: String,
}

fn query_error(name: &str, why: impl Into<String>) -> QueryError {
    QueryError {
        name: name.to_owned(),
        why: why.into(),
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool, QueryError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" | "" => Ok(false),
        _ => Err(query_error(name, format!("{v:?} is not true or false"))),
    }
}

fn parse_u16(name: &str, v: &str) -> Result<u16, QueryError> {
    v.parse()
        .map_err(|_| query_error(name, format!("{v:?} is not a number from 0 to 65535")))
}

impl ExecParams {
    /// The query string (without `?`).
    #[must_use]
    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for c in &self.cmd {
            q.append_pair("cmd", c);
        }
        if let Some(p) = &self.path {
            q.append_pair("path", p);
        }
        if self.tty {
            q.append_pair("tty", "true");
        }
        if let Some(r) = self.rows {
            q.append_pair("rows", &r.to_string());
        }
        if let Some(c) = self.cols {
            q.append_pair("cols", &c.to_string());
        }
        if let Some(s) = self.stdin {
            q.append_pair("stdin", if s { "true" } else { "false" });
        }
        if let Some(d) = &self.dir {
            q.append_pair("dir", d);
        }
        for e in &self.env {
            q.append_pair("env", e);
        }
        if let Some(m) = &self.max_run_after_disconnect {
            q.append_pair("max_run_after_disconnect", m);
        }
        q.finish()
    }

    /// Parses a query; parameters Sprites' clients send that change nothing
    /// here (`detachable`, `cc`, `id`) are accepted, unknown ones refused.
    ///
    /// # Errors
    /// [`QueryError`] naming the parameter.
    pub fn from_query(query: &str) -> Result<Self, QueryError> {
        let mut p = Self::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "cmd" | "cmd[]" => p.cmd.push(v.into_owned()),
                "path" => p.path = Some(v.into_owned()),
                "tty" => p.tty = parse_bool(&k, &v)?,
                "rows" => p.rows = Some(parse_u16(&k, &v)?),
                "cols" => p.cols = Some(parse_u16(&k, &v)?),
                "stdin" => p.stdin = Some(parse_bool(&k, &v)?),
                "dir" => p.dir = Some(v.into_owned()),
                "env" => {
                    if !v.contains('=') {
                        return Err(query_error("env", format!("{v:?} is not KEY=VALUE")));
                    }
                    p.env.push(v.into_owned());
                }
                "max_run_after_disconnect" => p.max_run_after_disconnect = Some(v.into_owned()),
                "detachable" | "cc" | "offset" | "id" => {}
                other => {
                    return Err(query_error(
                        other,
                        "unknown parameter (see GET /v1/exec in the API document)",
                    ));
                }
            }
        }
        Ok(p)
    }

    /// Whether input is forwarded.
    #[must_use]
    pub fn wants_stdin(&self) -> bool {
        self.stdin.unwrap_or(self.tty)
    }
}

/// The query of an attach: `offset` (replay from this byte); everything
/// else a Sprites client repeats on attach is ignored.
///
/// # Errors
/// [`QueryError`] when `offset` is not a number.
pub fn attach_offset(query: &str) -> Result<Option<u64>, QueryError> {
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "offset" {
            return v
                .parse()
                .map(Some)
                .map_err(|_| query_error("offset", format!("{v:?} is not a byte offset")));
        }
    }
    Ok(None)
}

/// One session in `GET /v1/exec` (Sprites' fields first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Its id.
    pub id: String,
    /// Its command line.
    pub command: String,
    /// Its working directory.
    pub workdir: String,
    /// When it started (RFC 3339).
    pub created: String,
    /// Whether it has a TTY.
    pub tty: bool,
    /// Whether a client is attached.
    pub is_active: bool,
    /// When it last produced output or took input (RFC 3339).
    pub last_activity: String,
    /// How many clients are attached.
    pub attached: u32,
    /// Its process id, as the VM sees it, while it runs.
    pub pid: Option<u32>,
    /// Output bytes so far (the next byte's offset).
    pub output_bytes: u64,
    /// How it ended, once it has.
    pub exit: Option<ExitStatus>,
}

/// `GET /v1/exec` (Sprites' shape: the list and its length).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    /// The sessions, oldest first.
    pub sessions: Vec<Session>,
    /// How many.
    pub count: usize,
}

/// `POST /v1/exec/{id}/kill`: the signal, then `SIGKILL` for everything
/// in the session's cgroup after `grace_ms`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    /// The first signal (default `TERM`).
    #[serde(default)]
    pub signal: Option<String>,
    /// How long to wait after it (default 10 s; 0: kill at once).
    #[serde(default)]
    pub grace_ms: Option<u64>,
}

/// One NDJSON line of the kill's answer (Sprites' shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KillEvent {
    /// The signal was sent.
    Signal {
        /// What happened.
        message: String,
        /// The signal.
        signal: String,
        /// The process.
        pid: u32,
    },
    /// The grace ran out.
    Timeout {
        /// What happened.
        message: String,
    },
    /// It ended after the signal.
    Exited {
        /// What happened.
        message: String,
    },
    /// Everything left in its cgroup was killed.
    Killed {
        /// What happened.
        message: String,
    },
    /// The last line.
    Complete {
        /// Its exit code (as [`ExitStatus::exit_code`]).
        exit_code: i32,
        /// The whole status.
        exit: ExitStatus,
    },
}

/// A signal by name (`TERM`, `SIGTERM`) or number, as the API takes it.
///
/// # Errors
/// The text, when it is neither.
pub fn signal_number(name: &str) -> Result<i32, String> {
    if let Ok(n) = name.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{name} is not a signal number (1–64)"))
        };
    }
    let bare = name.trim().to_ascii_uppercase();
    let bare = bare.strip_prefix("SIG").unwrap_or(&bare);
    SIGNALS
        .iter()
        .find(|(n, _)| *n == bare)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("{name} is not a signal (TERM, INT, HUP, KILL, QUIT, USR1, …)"))
}

/// The name of signal `n` (`TERM`), or its number.
#[must_use]
pub fn signal_name(n: i32) -> String {
    SIGNALS
        .iter()
        .find(|(_, v)| *v == n)
        .map_or_else(|| n.to_string(), |(name, _)| (*name).to_owned())
}

/// Linux x86-64's signals.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_round_trips_with_repeated_cmd_and_env() {
        let p = ExecParams {
            cmd: vec!["sh".into(), "-c".into(), "echo a&b=c".into()],
            tty: true,
            rows: Some(40),
            cols: Some(120),
            stdin: Some(true),
            dir: Some("/srv".into()),
            env: vec!["A=1".into(), "B=x y".into()],
            max_run_after_disconnect: Some("30s".into()),
            path: None,
        };
        assert_eq!(ExecParams::from_query(&p.to_query()), Ok(p));
        // Sprites' clients: `cmd[]`, `detachable`.
        let q = ExecParams::from_query("cmd[]=ls&cmd[]=-l&detachable=true").unwrap();
        assert_eq!(q.cmd, ["ls", "-l"]);
        assert!(!q.wants_stdin(), "no TTY: no stdin unless asked");
        assert!(ExecParams::from_query("tty=yes").is_err());
        assert!(ExecParams::from_query("env=NOVALUE").is_err());
        assert!(ExecParams::from_query("bogus=1").is_err());
        assert_eq!(attach_offset("offset=17&tty=true"), Ok(Some(17)));
        assert!(attach_offset("offset=x").is_err());
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(signal_number("TERM"), Ok(15));
        assert_eq!(signal_number("SIGKILL"), Ok(9));
        assert_eq!(signal_number("int"), Ok(2));
        assert_eq!(signal_number("9"), Ok(9));
        assert!(signal_number("FOO").is_err());
        assert!(signal_number("99").is_err());
        assert_eq!(signal_name(15), "TERM");
    }

    #[test]
    fn the_exit_byte_is_sprites() {
        let e = ExitStatus {
            exit_code: 137,
            signal: Some("KILL".into()),
            ..ExitStatus::default()
        };
        assert_eq!(e.code_byte(), 137);
        assert_eq!(
            ExitStatus {
                exit_code: -1,
                ..ExitStatus::default()
            }
            .code_byte(),
            255
        );
    }
}
