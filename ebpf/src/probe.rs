//! Loading `portwatch.bpf.o` and attaching it to a cgroup v2 directory.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSock, ProgramError, SockOps};
use aya::{Ebpf, EbpfLoader};

use crate::{PORTWATCH_OBJECT, RawListener};

const SOCKOPS: &str = "nb_sockops";
const SOCK_RELEASE: &str = "nb_sock_release";
const EVENTS: &str = "events";
const DROPPED: &str = "dropped";
const RECONCILED: &str = "reconciled";
const TASK_HELPERS: &str = "nb_task_helpers";

/// Why the port probe could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The cgroup directory does not exist.
    #[error("cgroup {path} does not exist: create it under the cgroup2 mount first")]
    CgroupMissing {
        /// The directory.
        path: PathBuf,
    },
    /// The cgroup directory could not be opened.
    #[error("cannot open cgroup {path}: {source}")]
    CgroupOpen {
        /// The directory.
        path: PathBuf,
        /// The error from open(2).
        source: io::Error,
    },
    /// The kernel refused BPF to this process.
    #[error(
        "the kernel does not permit this process to use BPF ({what}: {source}): \
         run as root (CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON are needed)"
    )]
    NotPermitted {
        /// What was being done.
        what: String,
        /// The kernel's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The kernel rejected the program or the attach.
    #[error(
        "the kernel rejected BPF program {program}: {source}. nestbox needs Linux >= 5.10 with \
         CONFIG_CGROUP_BPF and BTF; if the kernel is new enough, the object and loader are out of \
         step: rebuild with `cargo xtask build-ebpf`"
    )]
    Program {
        /// The program.
        program: &'static str,
        /// The kernel's or aya's error.
        source: ProgramError,
    },
    /// The object could not be loaded (maps, BTF, relocations).
    #[error(
        "cannot load portwatch.bpf.o: {0}. nestbox needs Linux >= 5.10 with BPF ring buffers \
         and socket storage"
    )]
    Object(#[source] aya::EbpfError),
    /// The object lacks a program or map this loader expects.
    #[error(
        "portwatch.bpf.o has no {kind} named {name}: object and loader are out of step, rebuild nestbox"
    )]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// A map had an unexpected type or size.
    #[error("portwatch.bpf.o map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// aya's error.
        source: aya::maps::MapError,
    },
}

impl ProbeError {
    fn from_program(program: &'static str, source: ProgramError) -> Self {
        let errno = match &source {
            ProgramError::LoadError { io_error, .. } => io_error.raw_os_error(),
            ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
            _ => None,
        };
        if errno == Some(libc::EPERM) || errno == Some(libc::EACCES) && !is_verifier(&source) {
            Self::NotPermitted {
                what: format!("program {program}"),
                source: Box::new(source),
            }
        } else {
            Self::Program { program, source }
        }
    }
}

impl From<aya::EbpfError> for ProbeError {
    fn from(err: aya::EbpfError) -> Self {
        if errno_in(&err) == Some(libc::EPERM) {
            Self::NotPermitted {
                what: "loading portwatch.bpf.o".into(),
                source: Box::new(err),
            }
        } else {
            Self::Object(err)
        }
    }
}

/// The first OS error in an error's chain.
fn errno_in(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(code) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(code);
        }
        next = e.source();
    }
    None
}

/// EACCES also means "the verifier said no"; only a load with an empty log is
/// a permission problem.
/// The verifier refused a helper call this program type lacks.
fn lacks_helper(source: &ProgramError) -> bool {
    matches!(source, ProgramError::LoadError { verifier_log, .. } if verifier_log.to_string().contains("unknown func"))
}

fn is_verifier(source: &ProgramError) -> bool {
    matches!(source, ProgramError::LoadError { verifier_log, .. } if !verifier_log.to_string().is_empty())
}

/// The portwatch programs, loaded and attached to one cgroup (and so to every
/// cgroup below it). Dropping it detaches and unloads everything.
pub struct PortProbe {
    /// Owns the programs and their links.
    ebpf: Ebpf,
    /// `dropped[0]`: records the ring buffer had no room for.
    dropped: Array<MapData, u64>,
    /// Sockets found listening by userspace, by cookie (see `track`).
    reconciled: HashMap<MapData, u64, RawListener>,
    /// Whether events carry the listening task (pid, comm, cgroup).
    task_helpers: bool,
}

impl PortProbe {
    /// Loads the programs and attaches them to the cgroup v2 directory
    /// `cgroup`. Returns the probe and the ring buffer of [`crate::RawEvent`]s.
    ///
    /// # Errors
    /// [`ProbeError`], each variant saying what to do.
    pub fn attach(cgroup: &Path) -> Result<(Self, RingBuf<MapData>), ProbeError> {
        Self::attach_with(cgroup, None)
    }

    /// [`PortProbe::attach`] with a ring buffer of `ring_bytes` (a power of
    /// two, at least one page) instead of the object's 1 MiB.
    ///
    /// # Errors
    /// [`ProbeError`], each variant saying what to do.
    pub fn attach_with(
        cgroup: &Path,
        ring_bytes: Option<u32>,
    ) -> Result<(Self, RingBuf<MapData>), ProbeError> {
        let dir = File::open(cgroup).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                ProbeError::CgroupMissing {
                    path: cgroup.to_owned(),
                }
            } else {
                ProbeError::CgroupOpen {
                    path: cgroup.to_owned(),
                    source,
                }
            }
        })?;
        let load = |task_helpers: bool| -> Result<Ebpf, ProbeError> {
            let mut loader = EbpfLoader::new();
            if let Some(bytes) = ring_bytes {
                loader.map_max_entries(EVENTS, bytes);
            }
            let flag = u8::from(task_helpers);
            loader.override_global(TASK_HELPERS, &flag, true);
            let mut ebpf = loader.load(PORTWATCH_OBJECT)?;
            let sockops: &mut SockOps = program(&mut ebpf, SOCKOPS)?;
            sockops
                .load()
                .map_err(|e| ProbeError::from_program(SOCKOPS, e))?;
            Ok(ebpf)
        };
        let (mut ebpf, task_helpers) = match load(true) {
            Ok(ebpf) => (ebpf, true),
            Err(ProbeError::Program { source, .. }) if lacks_helper(&source) => {
                (load(false)?, false)
            }
            Err(err) => return Err(err),
        };

        let sockops: &mut SockOps = program(&mut ebpf, SOCKOPS)?;
        sockops
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| ProbeError::from_program(SOCKOPS, e))?;

        let release: &mut CgroupSock = program(&mut ebpf, SOCK_RELEASE)?;
        release
            .load()
            .map_err(|e| ProbeError::from_program(SOCK_RELEASE, e))?;
        release
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| ProbeError::from_program(SOCK_RELEASE, e))?;

        let events = take_map(&mut ebpf, EVENTS)?;
        let events = RingBuf::try_from(events).map_err(|source| ProbeError::Map {
            name: EVENTS,
            source,
        })?;
        let dropped = take_map(&mut ebpf, DROPPED)?;
        let dropped = Array::try_from(dropped).map_err(|source| ProbeError::Map {
            name: DROPPED,
            source,
        })?;
        let reconciled = take_map(&mut ebpf, RECONCILED)?;
        let reconciled = HashMap::try_from(reconciled).map_err(|source| ProbeError::Map {
            name: RECONCILED,
            source,
        })?;
        Ok((
            Self {
                ebpf,
                dropped,
                reconciled,
                task_helpers,
            },
            events,
        ))
    }

    /// Whether events name the task that listened. Kernels whose sockops
    /// programs lack the task helpers (Linux 6.1) report pid 0: the owner
    /// must be found from the socket.
    #[must_use]
    pub fn reports_tasks(&self) -> bool {
        self.task_helpers
    }

    /// How many records the kernel could not queue since the probe was
    /// attached. When this grows, userspace has missed events and must
    /// reconcile with the kernel's socket table.
    ///
    /// # Errors
    /// [`ProbeError::Map`] if the map cannot be read.
    pub fn dropped(&self) -> Result<u64, ProbeError> {
        self.dropped.get(&0, 0).map_err(|source| ProbeError::Map {
            name: DROPPED,
            source,
        })
    }

    /// Asks the kernel to report the close of a socket that was listening
    /// before the probe was attached (it has no listen-time state).
    ///
    /// # Errors
    /// [`ProbeError::Map`] if the map is full or cannot be written.
    pub fn track(&mut self, cookie: u64, listener: RawListener) -> Result<(), ProbeError> {
        self.reconciled
            .insert(cookie, listener, 0)
            .map_err(|source| ProbeError::Map {
                name: RECONCILED,
                source,
            })
    }

    /// Forgets a socket entered with [`PortProbe::track`] (it is gone).
    /// Unknown cookies are fine: the kernel removes entries it reports.
    ///
    /// # Errors
    /// [`ProbeError::Map`] if the map cannot be written.
    pub fn untrack(&mut self, cookie: u64) -> Result<(), ProbeError> {
        match self.reconciled.remove(&cookie) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(source) => Err(ProbeError::Map {
                name: RECONCILED,
                source,
            }),
        }
    }
}

impl std::fmt::Debug for PortProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortProbe")
            .field("ebpf", &self.ebpf)
            .finish_non_exhaustive()
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(ProbeError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into().map_err(|source| ProbeError::Program {
        program: name,
        source,
    })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, ProbeError> {
    ebpf.take_map(name)
        .ok_or(ProbeError::Missing { kind: "map", name })
}
