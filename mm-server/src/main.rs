//! `mm-server`: the mm-upcall memory manager daemon.
//!
//! `mm-server -c /etc/mm-server.toml` attaches the configured compressed
//! nodes and serves their upcalls until SIGINT/SIGTERM, which drain and
//! detach them, or SIGUSR2, which leaves them managed for the next server
//! (SIGHUP is ignored);
//! `--check-config` validates the configuration against this system;
//! `mm-server metrics` prints the running server's metrics (Prometheus
//! text) from its admin socket; `mm-server man` prints its man page.  Logs
//! go to stderr, filtered by `MM_SERVER_LOG` (or `RUST_LOG`), `info` by
//! default.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mm_server::admin;
use mm_server::clients;
use mm_server::config::Config;
use mm_server::driver::{Driver, Published};
use mm_server::metrics::Snapshot;
use mm_server::sys;
use mm_upcall_client::AdminClient;

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
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print the running server's metrics (Prometheus text format).
    Metrics {
        /// The admin socket (default: `server.admin_socket` of the config).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Print the man page, mm-server(8), in roff on stdout.
    Man,
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MM_SERVER_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn serve(cfg: &Config) -> Result<()> {
    let stop = sys::stop_signals().context("cannot install the SIGINT/SIGTERM/SIGUSR2 handlers")?;
    let listener = admin::bind(&cfg.server.admin_socket).with_context(|| {
        format!(
            "cannot create the admin socket {}",
            cfg.server.admin_socket.display()
        )
    })?;
    // The socket goes away with the server, however it stops.
    let _socket = RemoveOnDrop(cfg.server.admin_socket.clone());
    let snapshot: Published = Arc::new(Mutex::new(Arc::new(Snapshot::default())));
    let mut driver = Driver::start(cfg, stop, Arc::clone(&snapshot))?;
    sys::mlockall().context(
        "mlockall: the memory manager must not be paged out; run as root (CAP_IPC_LOCK) \
         or raise RLIMIT_MEMLOCK",
    )?;
    let tenant_metrics = mm_server::tenants::Published::default();
    admin::spawn(
        listener,
        snapshot,
        driver.handle(),
        std::sync::Arc::clone(&tenant_metrics),
    )
    .context("cannot start the admin socket thread")?;
    mm_server::tenants::spawn(
        cfg.tenant.iter().map(Into::into).collect(),
        driver.handle(),
        tenant_metrics,
    )
    .context("cannot start the tenant limits thread")?;
    let sock = &cfg.server.client_socket;
    if let Some(dir) = sock.parent()
        && !dir.as_os_str().is_empty()
        && !dir.is_dir()
    {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the client socket's directory {}",
                dir.display()
            )
        })?;
    }
    let gid = cfg.client_gid()?;
    let client_listener = clients::bind(sock, gid)
        .with_context(|| format!("cannot create the client socket {}", sock.display()))?;
    let _client_socket = RemoveOnDrop(sock.clone());
    let limits = clients::Limits {
        requests_per_s: cfg.server.client_requests_per_s,
        advise_bytes_per_s: cfg.server.client_advise_mib_per_s.saturating_mul(1 << 20),
    };
    clients::spawn(client_listener, driver.handle(), limits)
        .context("cannot start the client socket thread")?;
    driver.run()?;
    tracing::info!("stopped");
    Ok(())
}

fn run(cli: &Cli) -> Result<()> {
    if let Some(Cmd::Man) = &cli.cmd {
        use clap::CommandFactory as _;
        clap_mangen::Man::new(Cli::command())
            .section("8")
            .render(&mut std::io::stdout())
            .context("cannot write the man page")?;
        return Ok(());
    }
    if let Some(Cmd::Metrics { socket }) = &cli.cmd {
        let path = match socket {
            Some(p) => p.clone(),
            None => Config::load(&cli.config)?.server.admin_socket,
        };
        print!("{}", AdminClient::connect(&path)?.metrics()?);
        return Ok(());
    }
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
    serve(&cfg).context("mm-server stopped")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, once: each error names its own layer only.
            eprintln!("mm-server: {e:#}");
            ExitCode::from(1)
        }
    }
}
