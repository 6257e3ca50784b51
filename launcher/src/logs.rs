//! Logs: the VM's serial console (`console.log`, appended across boots),
//! printed, and with `follow` printed as it grows until the VM is
//! destroyed (or the caller is interrupted).

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use crate::name::VmName;
use crate::{Launcher, LauncherError};

/// How often a followed log is checked for more.
const POLL: Duration = Duration::from_millis(200);

impl Launcher {
    /// Writes VM `name`'s console log to `out`; with `follow`, keeps
    /// writing what is appended.
    ///
    /// # Errors
    /// [`LauncherError::NotFound`], or the log cannot be read. A closed
    /// `out` (e.g. `| head`) ends quietly.
    pub fn logs(&self, name: &str, follow: bool, out: &mut dyn Write) -> Result<(), LauncherError> {
        let name = VmName::new(name)?;
        let (dir, _) = self.load(&name)?;
        let path = dir.console_log();
        let mut pos = 0u64;
        loop {
            match std::fs::File::open(&path) {
                Ok(mut file) => {
                    let len = file
                        .metadata()
                        .map_err(LauncherError::file("read", &path))?
                        .len();
                    if len < pos {
                        pos = 0; // replaced or truncated
                    }
                    file.seek(SeekFrom::Start(pos))
                        .map_err(LauncherError::file("read", &path))?;
                    let mut chunk = Vec::new();
                    file.read_to_end(&mut chunk)
                        .map_err(LauncherError::file("read", &path))?;
                    pos += chunk.len() as u64;
                    let written = out.write_all(&chunk).and_then(|()| out.flush());
                    match written {
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                        other => other.map_err(LauncherError::file("write", "output".as_ref()))?,
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LauncherError::file("read", &path)(e)),
            }
            if !follow || !dir.record().exists() {
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
    }
}
