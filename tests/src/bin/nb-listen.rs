//! `nb-listen`: a scriptable socket owner for nestbox's tests and benches.
//!
//! It reads commands on stdin, one per line, and answers each on stdout:
//! - `listen ADDR [reuseport] [v6only]` → `ok ID PORT T0` (T0: `CLOCK_MONOTONIC`
//!   in ns, read just before `listen()`);
//! - `autobind` → `ok ID PORT T0` (`listen()` with no `bind()`);
//! - `udp ADDR` → `ok ID PORT`;
//! - `connect ADDR` → `ok ID PORT` (an outgoing TCP connection);
//! - `close ID` → `ok`;
//! - `exit` (or end of input) → exits, closing everything.
//!
//! Errors answer `err MESSAGE`. Holding sockets in one long-lived process lets
//! a test decide exactly when each listen and close happens.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

fn local_port(s: &Socket) -> std::io::Result<u16> {
    s.local_addr()?
        .as_socket()
        .map(|a| a.port())
        .ok_or_else(|| std::io::Error::other("not an inet socket"))
}

fn run(
    line: &str,
    sockets: &mut HashMap<u64, Socket>,
    next_id: &mut u64,
) -> std::io::Result<String> {
    let mut words = line.split_whitespace();
    let verb = words.next().unwrap_or_default();
    let parse_addr = |w: Option<&str>| -> std::io::Result<SocketAddr> {
        w.ok_or_else(|| std::io::Error::other("missing address"))?
            .parse()
            .map_err(std::io::Error::other)
    };
    let mut keep = |s: Socket| {
        *next_id += 1;
        sockets.insert(*next_id, s);
        *next_id
    };
    match verb {
        "listen" | "autobind" => {
            let (socket, addr) = if verb == "listen" {
                let addr = parse_addr(words.next())?;
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                let flags: Vec<&str> = words.collect();
                if flags.contains(&"reuseport") {
                    s.set_reuse_port(true)?;
                }
                if addr.is_ipv6() {
                    s.set_only_v6(flags.contains(&"v6only"))?;
                }
                (s, Some(addr))
            } else {
                (
                    Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?,
                    None,
                )
            };
            if let Some(addr) = addr {
                socket.bind(&SockAddr::from(addr))?;
            }
            let t0 = nestbox_tests::monotonic_ns();
            socket.listen(128)?;
            let port = local_port(&socket)?;
            let id = keep(socket);
            Ok(format!("ok {id} {port} {t0}"))
        }
        "udp" => {
            let addr = parse_addr(words.next())?;
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SockAddr::from(addr))?;
            let port = local_port(&s)?;
            let id = keep(s);
            Ok(format!("ok {id} {port}"))
        }
        "connect" => {
            let addr = parse_addr(words.next())?;
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.connect(&SockAddr::from(addr))?;
            let port = local_port(&s)?;
            let id = keep(s);
            Ok(format!("ok {id} {port}"))
        }
        "close" => {
            let id: u64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| std::io::Error::other("close needs an id"))?;
            sockets
                .remove(&id)
                .map(|_| "ok".to_owned())
                .ok_or_else(|| std::io::Error::other(format!("no socket {id}")))
        }
        other => Err(std::io::Error::other(format!("unknown command {other:?}"))),
    }
}

fn main() {
    let mut sockets = HashMap::new();
    let mut next_id = 0;
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "exit" {
            break;
        }
        let answer = run(&line, &mut sockets, &mut next_id).unwrap_or_else(|e| format!("err {e}"));
        if writeln!(stdout, "{answer}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break;
        }
    }
}
