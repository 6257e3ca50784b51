//! `nestbox`: the user's command line. Parses the arguments, runs the
//! command, maps errors to exit codes: a command's own exit code for
//! `exec` and `console`; otherwise 0 done, 1 failed, 2 refused (bad
//! arguments, no such VM), 3 not reachable.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = nestbox_cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("nestbox: cannot start: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(nestbox_cli::run(cli));
    // A read of stdin may still be blocked in the runtime's pool: do not
    // wait for it.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("nestbox: {err:#}");
            ExitCode::from(nestbox_cli::exit_code(&err))
        }
    }
}
