//! The JSON fixtures of every wire type (`fixtures/v<N>/`): each parses as
//! its type and serializes back to the same JSON, so a field renamed,
//! dropped or retyped fails here; the fixtures of version N−1 stay and must
//! still parse once version N is written.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::exec;
use crate::types;

fn dir(version: u32) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("v{version}"))
}

/// Parses fixture `name` of `version` as `T` and checks that it serializes
/// back to the same JSON.
fn round_trip<T: Serialize + DeserializeOwned>(version: u32, name: &str) {
    let path = dir(version).join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let want: serde_json::Value = serde_json::from_str(&text).expect("a fixture is JSON");
    let parsed: T = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{} does not parse as {}: {e}",
            path.display(),
            std::any::type_name::<T>()
        )
    });
    let back = serde_json::to_value(&parsed).expect("serializes");
    assert_eq!(
        back,
        want,
        "{} does not survive a round trip",
        path.display()
    );
}

macro_rules! fixtures {
    ($version:expr, $($name:literal => $ty:ty),* $(,)?) => {{
        let names: &[&str] = &[$($name),*];
        $(round_trip::<$ty>($version, $name);)*
        names
    }};
}

#[test]
fn every_fixture_of_v1_round_trips() {
    let tested = fixtures!(1,
        "status" => types::Status,
        "container_failed" => types::ContainerState,
        "port_info" => types::PortInfo,
        "port_change" => types::PortChange,
        "service_spec" => types::ServiceSpec,
        "service_status" => types::ServiceStatus,
        "log_line" => types::LogLine,
        "error" => crate::ErrorBody,
        "bounced" => types::Bounced,
        "renewing" => types::Renewing,
        "exec_session_info" => exec::Control,
        "exec_exit" => exec::Control,
        "exec_exit_signal" => exec::Control,
        "exec_gap" => exec::Control,
        "exec_resize" => exec::Control,
        "exec_signal" => exec::Control,
        "exec_sessions" => exec::Sessions,
        "exec_kill" => exec::KillRequest,
        "exec_kill_complete" => exec::KillEvent,
        "proxy_init" => crate::proxy::ProxyInit,
        "proxy_connected" => crate::proxy::ProxyStatus,
        "proxy_error" => crate::proxy::ProxyStatus,
        "fs_listing" => crate::fs::Listing,
        "fs_written" => crate::fs::Written,
        "fs_deleted" => crate::fs::Deleted,
        "fs_move" => crate::fs::Move,
        "fs_copied" => crate::fs::Copied,
        "fs_chmod" => crate::fs::Chmod,
        "fs_chmodded" => crate::fs::Chmodded,
        "fs_extracted" => crate::fs::Extracted,
        "fs_watch_event" => crate::fs::WatchEvent,
        "fs_watch_overflow" => crate::fs::WatchEvent,
        "set_port_auth" => types::SetPortAuth,
        "port_auth" => types::PortAuth,
        "login_request" => types::LoginRequest,
        "link" => types::Link,
        "share_request" => types::ShareRequest,
        "share" => types::Share,
        "token_request" => types::TokenRequest,
        "scoped_token" => types::ScopedToken,
        "revoked" => types::Revoked,
        "checkpoint_request" => types::CheckpointRequest,
        "checkpoint" => types::Checkpoint,
        "checkpoints" => types::Checkpoints,
        "checkpoint_progress" => types::Progress,
        "checkpoint_progress_error" => types::Progress,
    );
    // A fixture nobody reads proves nothing: every file is in the list.
    let mut files: Vec<String> = std::fs::read_dir(dir(1))
        .expect("fixtures/v1")
        .map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".json")
                .expect("only .json fixtures")
                .to_owned()
        })
        .collect();
    files.sort();
    let mut tested: Vec<String> = tested.iter().map(|s| (*s).to_owned()).collect();
    tested.sort();
    assert_eq!(files, tested);
}
