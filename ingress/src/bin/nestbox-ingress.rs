//! `nestbox-ingress`: the HTTPS reverse proxy of a nestbox VM, standalone.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nestbox_ingress::config::Config;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "nestbox-ingress",
    version,
    about = "HTTPS reverse proxy with ACME certificates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the routes of a configuration file. SIGTERM or Ctrl-C drains
    /// and stops; SIGUSR1 renews every ACME certificate now.
    Serve {
        /// The TOML configuration (see the `config` module's docs).
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Command::Serve { config } = Cli::parse().command;
    let config = match Config::load(&config) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("nestbox-ingress: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("nestbox-ingress: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (renew_tx, renew_rx) = tokio::sync::oneshot::channel();
        let signals = async move {
            let (Ok(mut term), Ok(mut usr1)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::user_defined1()),
            ) else {
                return;
            };
            let renew: Option<std::sync::Arc<tokio::sync::Notify>> = renew_rx.await.ok().flatten();
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                    _ = usr1.recv() => {
                        if let Some(r) = &renew {
                            tracing::info!("SIGUSR1: renewing every certificate");
                            r.notify_one();
                        }
                    }
                }
            }
            tracing::info!("shutting down: draining connections");
            let _ = stop_tx.send(true);
        };
        let serve = nestbox_ingress::serve::serve(config, stop_rx, move |h| {
            let _ = renew_tx.send(h.renew);
        });
        let signals = tokio::spawn(signals);
        let result = serve.await;
        signals.abort();
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nestbox-ingress: {err}");
            ExitCode::FAILURE
        }
    }
}
