//! A stand-in VMM: any command (e.g. `sleep 1000`) started exactly like a
//! real VMM, so that a benchmark times the launcher's own work — tap,
//! netlink, nft, files, spawn — without a VM. It is up as soon as it runs;
//! stopping it is SIGTERM.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;

use super::accel::{Accel, AccelChoice};
use super::{VmSpec, Vmm, VmmError};
use crate::state::process::VmmProcess;

/// A command in place of a VMM.
#[derive(Clone, Debug)]
pub struct Stub {
    program: PathBuf,
    args: Vec<OsString>,
    accel: AccelChoice,
}

impl Stub {
    /// `program` with `args`.
    pub fn new<I, S>(program: impl Into<PathBuf>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self {
            program: program.into(),
            args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            accel: AccelChoice {
                accel: Accel::None,
                why: "a stub command, not a VM".into(),
            },
        }
    }
}

impl Vmm for Stub {
    fn name(&self) -> &'static str {
        "stub"
    }

    fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    fn command(&self, _spec: &VmSpec) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        cmd
    }

    fn takes_devices(&self) -> bool {
        false
    }

    fn request_stop(&self, _control_socket: &Path, process: &VmmProcess) -> Result<(), VmmError> {
        process
            .signal(Signal::SIGTERM)
            .map_err(|source| VmmError::Signal {
                pid: process.pid,
                source,
            })
    }
}
