//! The local terminal: raw mode for an interactive session (restored on
//! drop, also after an error), its size, and progress bars.

use std::os::fd::AsFd;

use nix::sys::termios::{self, SetArg, Termios};

/// The terminal in raw mode until dropped.
pub struct Raw {
    saved: Termios,
}

impl Raw {
    /// Puts stdin's terminal in raw mode (no echo, no line editing, no
    /// signals from keys: `Ctrl-C` goes to the remote program).
    ///
    /// # Errors
    /// When stdin is not a terminal.
    pub fn enter() -> nix::Result<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Whether stdin is a terminal.
#[must_use]
pub fn stdin_is_tty() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdin())
}

/// Whether stdout is a terminal.
#[must_use]
pub fn stdout_is_tty() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdout())
}

/// The terminal's size (rows, columns), if stdout or stdin is one.
#[must_use]
pub fn size() -> Option<(u16, u16)> {
    terminal_size::terminal_size_of(std::io::stdout())
        .or_else(|| terminal_size::terminal_size_of(std::io::stdin()))
        .map(|(w, h)| (h.0, w.0))
}

/// A progress bar on standard error, when it is a terminal (nothing
/// otherwise: the commands print their result lines either way).
pub struct Bar {
    label: &'static str,
    on: bool,
    shown: bool,
}

impl Bar {
    /// A bar for `label` (drawn once there is something to show).
    #[must_use]
    pub fn new(label: &'static str) -> Self {
        Self {
            label,
            on: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            shown: false,
        }
    }

    /// Draws `done` of `total` bytes (a total of 0: not known yet).
    #[allow(clippy::cast_precision_loss, reason = "a fraction for display")]
    pub fn show(&mut self, done: u64, total: u64) {
        if !self.on {
            return;
        }
        let width = 30usize;
        let line = if total == 0 {
            format!("{} {}", self.label, bytes(done))
        } else {
            let part = (done.min(total) as f64 / total as f64).clamp(0.0, 1.0);
            // Truncation intended: whole cells of the bar.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let full = (part * width as f64) as usize;
            format!(
                "{} [{}{}] {:>3.0}% {} / {}",
                self.label,
                "#".repeat(full),
                "-".repeat(width - full),
                part * 100.0,
                bytes(done),
                bytes(total)
            )
        };
        eprint!("\r\x1b[2K{line}");
        self.shown = true;
    }

    /// Ends the bar's line.
    pub fn end(&mut self) {
        if self.shown {
            eprintln!();
            self.shown = false;
        }
    }
}

/// `n` bytes for people (`12.3 MiB`).
#[must_use]
pub fn bytes(n: u64) -> String {
    #[allow(clippy::cast_precision_loss, reason = "for display")]
    let f = n as f64;
    if n < 1 << 10 {
        format!("{n} B")
    } else if n < 1 << 20 {
        format!("{:.1} KiB", f / 1024.0)
    } else if n < 1 << 30 {
        format!("{:.1} MiB", f / (1024.0 * 1024.0))
    } else {
        format!("{:.2} GiB", f / (1024.0 * 1024.0 * 1024.0))
    }
}
