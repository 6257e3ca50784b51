//! `nestbox-ingress`: the HTTPS reverse proxy of a nestbox VM, standalone.
#![allow(
    clippy::disallowed_methods,
    reason = "blocking calls are denied only in the modules that run on the runtime thread (see clippy.toml)"
)]

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
    /// and stops; SIGHUP re-reads the routes from the file; SIGUSR1 renews
    /// every ACME certificate now.
    Serve {
        /// The TOML configuration (see the `config` module's docs).
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    nestbox_ingress::logging::init("info");
    let Command::Serve { config: path } = Cli::parse().command;
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("nestbox-ingress: {err}");
            return ExitCode::from(2);
        }
    };
    // One CPU to run on (a small VM, or pinned): everything on this
    // thread, with no cross-thread wake-ups; else a worker per CPU.
    let one_cpu = std::thread::available_parallelism().map_or(true, |n| n.get() == 1);
    let mut builder = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("nestbox-ingress: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (handles_tx, handles_rx) = tokio::sync::oneshot::channel();
        let signals = async move {
            let (Ok(mut term), Ok(mut usr1), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::user_defined1()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            let Ok(handles) = handles_rx.await else { return };
            let handles: nestbox_ingress::serve::Handles = handles;
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                    _ = usr1.recv() => {
                        tracing::info!("SIGUSR1: renewing every certificate");
                        handles.renew.notify_one();
                    }
                    _ = hup.recv() => match Config::load(&path) {
                        Ok(new) => {
                            handles.set_routes(&new.routes);
                            tracing::info!(routes = ?handles.routes.hosts(), "SIGHUP: routes reloaded");
                        }
                        Err(err) => tracing::error!(%err, "SIGHUP: configuration not reloaded"),
                    },
                }
            }
            tracing::info!("shutting down: draining connections");
            let _ = stop_tx.send(true);
        };
        let serve = nestbox_ingress::serve::serve(config, stop_rx, move |h| {
            let _ = handles_tx.send(h);
        });
        let signals = tokio::spawn(signals);
        // On a worker, not on this (the blocking) thread: the accept loop
        // then spawns connections where they run.
        let result = match tokio::spawn(serve).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the server task failed: {e}")),
        };
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
