//! Crash points for the fault-injection suite, compiled only with the
//! `faults` feature (the tests' builds; never a shipped one): the program
//! that links this crate installs one hook, and every step of
//! [`write_atomic_with`](crate::write_atomic_with) calls it by name —
//! `durable.written` (the temporary file is written, not yet synced),
//! `durable.synced` (synced, not yet renamed), `durable.renamed` (renamed,
//! the directory not yet synced) — with the file being replaced. The hook
//! decides whether to crash there.

use std::path::Path;
use std::sync::OnceLock;

/// What a program does at a crash point: given the point's name and the
/// file being written.
pub type Hook = fn(&'static str, &Path);

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Installs `hook` (the first one installed stays).
pub fn set_hook(hook: Hook) {
    let _ = HOOK.set(hook);
}

pub(crate) fn reached(name: &'static str, path: &Path) {
    if let Some(hook) = HOOK.get() {
        hook(name, path);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());

    fn record(name: &'static str, path: &std::path::Path) {
        SEEN.lock().unwrap().push(format!(
            "{name} {}",
            path.file_name().unwrap().to_string_lossy()
        ));
    }

    #[test]
    fn every_step_of_a_write_is_a_point() {
        super::set_hook(record);
        let dir = std::env::temp_dir().join(format!("durable-faults-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::write_atomic(&dir.join("probe"), b"x", 0o600).unwrap();
        // Other tests write files at the same time.
        let seen: Vec<String> = SEEN
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.ends_with(" probe"))
            .cloned()
            .collect();
        assert_eq!(
            seen,
            [
                "durable.written probe",
                "durable.synced probe",
                "durable.renamed probe"
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
