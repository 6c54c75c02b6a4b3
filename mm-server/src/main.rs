//! `mm-server`: the mm-upcall memory manager daemon.
//!
//! Today it validates its configuration (`--check-config`) against the
//! running system. The kernel mechanism it drives exists (patches 0007-0012),
//! but the daemon's event loop does not yet; without `--check-config` it says
//! so and exits non-zero rather than pretending to manage memory.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use mm_server::config::Config;

/// The mm-upcall user-mode memory manager.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(short, long, default_value = "/etc/mm-server.toml")]
    config: PathBuf,
    /// Check the configuration against this system and exit.
    #[arg(long)]
    check_config: bool,
    /// Root of sysfs (for tests).
    #[arg(long, default_value = "/sys", hide = true)]
    sysfs_root: PathBuf,
}

fn run(cli: &Cli) -> Result<()> {
    let cfg = Config::load(&cli.config)?;
    cfg.validate()?;
    cfg.check_system(&cli.sysfs_root)?;
    if cli.check_config {
        println!(
            "{}: ok ({} managed node{}, device {})",
            cli.config.display(),
            cfg.node.len(),
            if cfg.node.len() == 1 { "" } else { "s" },
            cfg.server.device.display()
        );
        return Ok(());
    }
    Err(anyhow::anyhow!(
        "serving is not implemented yet: the event loop that answers upcalls is still to be written"
    ))
    .context("mm-server cannot start")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, once: each error names its own layer only.
            eprintln!("mm-server: {e:#}");
            ExitCode::from(1)
        }
    }
}
