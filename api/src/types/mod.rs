//! The JSON bodies of the API's plain (non-WebSocket) operations, one
//! module per resource.

mod checkpoints;
mod logs;
mod ports;
mod services;
mod status;
mod urls;

pub use checkpoints::{
    Checkpoint, CheckpointRequest, Checkpoints, Progress, ProgressKind, Upload, UploadState,
};
pub use logs::{LogLine, LogStats, Stream};
pub use ports::{PortChange, PortChangeKind, PortInfo};
pub use services::{Restart, ServiceSpec, ServiceState, ServiceStatus};
pub use status::{
    Applied, Bounced, ContainerState, DiskReport, DiskState, DiskUsage, Rebuild, RebuildState,
    Renewing, Status, Usage,
};
pub use urls::{
    Link, LoginRequest, PortAuth, Revoked, ScopedToken, SetPortAuth, Share, ShareRequest,
    TokenRequest, UrlAuth,
};
