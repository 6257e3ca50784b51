//! One module per group of commands.

pub mod checkpoint;
pub mod exec;
pub mod files;
pub mod info;
pub mod proxy;
pub mod services;
pub mod sessions;
pub mod url;
pub mod vm;
