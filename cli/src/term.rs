//! The local terminal: raw mode for an interactive session (restored on
//! drop, also after an error), and its size.

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
