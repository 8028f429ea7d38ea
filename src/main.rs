//! Entry point: parse the command line, set up logging, run, map the error to its
//! documented exit code.

use clap::Parser;
use vault_bootstrap::{cli, error, logging};

fn main() {
    let args = cli::Cli::parse();
    logging::init();
    // One thread is plenty for a boot agent that waits on the network; it keeps the
    // footprint small on the instance Vault runs on.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            std::process::exit(error::exit::OSERR);
        }
    };
    let code = match rt.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(exit_code = e.exit_code(), "{e}");
            e.exit_code()
        }
    };
    drop(rt);
    std::process::exit(code);
}
