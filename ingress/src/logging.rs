//! The logging setup of the platform's binaries (`nestbox-guest`,
//! `nestbox-ingress`): `tracing` to stderr, filtered by `RUST_LOG` or the
//! binary's default level. The filter is `Targets`, not `EnvFilter`: the
//! same `target=level` syntax without regular expressions, which would cost
//! the guest's resident memory a few hundred KiB for nothing.

/// Installs the subscriber; `RUST_LOG` (`info`, `warn,nestbox_guest=debug`,
/// …) wins over `default`.
///
/// # Panics
/// If `default` is not a valid filter (a constant of the binary).
pub fn init(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| spec.parse().ok())
        .unwrap_or_else(|| default.parse().expect("the default filter parses"));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}
