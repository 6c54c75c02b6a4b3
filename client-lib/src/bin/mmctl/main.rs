//! `mmctl`: the operator's tool for mm-upcall.
//!
//! Every read command takes `--json`.  Exit codes are stable:
//! 0 success; 1 the command failed; 2 bad usage; 3 `doctor` found a
//! problem; 4 no server answers.

use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use mm_upcall_client::{
    AdminClient, Advice, Client, DEFAULT_ADMIN_SOCKET, Error, Page, client_socket, probe,
};
use serde::Serialize;

mod doctor;
mod prom;

/// Exit codes (stable: scripts rely on them).
const EXIT_FAILED: u8 = 1;
const EXIT_PROBLEMS: u8 = 3;
const EXIT_NO_SERVER: u8 = 4;

#[derive(Debug, Parser)]
#[command(
    name = "mmctl",
    version,
    about = "Inspect and steer mm-upcall, the user-space memory manager for compressed memory nodes",
    after_help = "Exit codes: 0 success, 1 the command failed, 2 bad usage, 3 doctor found a problem, \
                  4 no server answers."
)]
struct Cli {
    /// mm-server's admin socket (root only).
    #[arg(long, global = true, default_value = DEFAULT_ADMIN_SOCKET, env = "MM_UPCALL_ADMIN_SOCKET")]
    admin_socket: PathBuf,
    /// mm-server's client socket (default: $MM_UPCALL_SOCKET or /run/mm-upcall/client.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Is the kernel feature there, does a server answer, which version.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The managed nodes: capacity, use, resident pages, pressure.
    Nodes {
        #[arg(long)]
        json: bool,
    },
    /// The server's counters.
    Stats {
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// The whole metrics text, in the Prometheus text format.
        #[arg(long)]
        prometheus: bool,
    },
    /// Advise a range of a process's memory (as madvise(2)).
    Advise {
        /// The process (needs CAP_SYS_NICE, and its uid or CAP_SYS_PTRACE).
        #[arg(long)]
        pid: u32,
        /// Start address (hex with 0x, page-aligned).
        #[arg(value_parser = parse_num)]
        addr: u64,
        /// Length in bytes (hex with 0x, or a number with K, M, G).
        #[arg(value_parser = parse_num)]
        len: u64,
        advice: AdviceArg,
        #[arg(long)]
        json: bool,
    },
    /// Where each page of a range of a process lives.
    Residency {
        #[arg(long)]
        pid: u32,
        #[arg(value_parser = parse_num)]
        addr: u64,
        #[arg(value_parser = parse_num)]
        len: u64,
        /// Per page rather than a summary.
        #[arg(long)]
        pages: bool,
        #[arg(long)]
        json: bool,
    },
    /// Read or set the run-time policy (root).
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Drain a compressed node: evict every page, then detach it (root).
    Drain {
        /// The node.
        nid: u16,
        /// Longest wait for the drain to finish, seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Start the drain and return.
        #[arg(long)]
        no_wait: bool,
    },
    /// Evict a memory cgroup's pages that have been on a compressed node
    /// for a while, the oldest first (root).
    Evict {
        /// The cgroup's directory (e.g. /sys/fs/cgroup/batch.slice).
        #[arg(long)]
        cgroup: PathBuf,
        /// At most this much memory (hex with 0x, or a number with K, M, G).
        #[arg(long, value_parser = parse_num)]
        max_bytes: u64,
        /// Only pages on the node at least this long (at most 2048).
        #[arg(long, default_value_t = 0)]
        min_age: u32,
        /// The compressed node.
        #[arg(long, default_value_t = 1)]
        node: u16,
        #[arg(long)]
        json: bool,
    },
    /// Check this machine for what mm-upcall needs; one line per check.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Print the man page (roff) on stdout.
    Man,
    /// Print shell completions on stdout.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Print the policy and a node's watermarks.
    Get {
        #[arg(long, default_value_t = 1)]
        node: u16,
        #[arg(long)]
        json: bool,
    },
    /// Change some knobs (the others keep their values); checked as the
    /// configuration file is.
    Set {
        #[arg(long, default_value_t = 1)]
        node: u16,
        /// Watermarks, percent of the node's capacity.
        #[arg(long)]
        low: Option<u8>,
        #[arg(long)]
        high: Option<u8>,
        #[arg(long)]
        critical: Option<u8>,
        /// Pages per node that may be written in place.
        #[arg(long)]
        writable_budget: Option<u64>,
        /// Promotion budget, MB/s.
        #[arg(long)]
        promote_rate_limit_mbps: Option<u64>,
        #[arg(long)]
        hot_threshold: Option<u8>,
        #[arg(long)]
        hot_window_ms: Option<u32>,
        #[arg(long)]
        credit_chunk_pages: Option<u64>,
    },
}

#[derive(Serialize)]
struct PolicyView {
    node: u16,
    low: u8,
    high: u8,
    critical: u8,
    writable_budget: u64,
    promote_rate_limit_mbps: u64,
    hot_threshold: u8,
    hot_window_ms: u32,
    credit_chunk_pages: u64,
}

impl From<&mm_upcall_client::socket::PolicyRec> for PolicyView {
    fn from(p: &mm_upcall_client::socket::PolicyRec) -> Self {
        Self {
            node: p.nid,
            low: p.low,
            high: p.high,
            critical: p.critical,
            writable_budget: p.writable_budget,
            promote_rate_limit_mbps: p.promote_rate_limit_mbps,
            hot_threshold: p.hot_threshold,
            hot_window_ms: p.hot_window_ms,
            credit_chunk_pages: p.credit_chunk_pages,
        }
    }
}

/// The state of node `nid` from the metrics: (state, resident pages).
fn node_state(a: &mut AdminClient, nid: u16) -> Result<(u64, u64), Failed> {
    let m = prom::parse(&a.metrics()?);
    let n = nid.to_string();
    Ok((
        m.get("mm_server_node_state", "nid", &n) as u64,
        m.get("mm_server_resident_pages", "nid", &n) as u64,
    ))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AdviceArg {
    Normal,
    Hot,
    Cold,
    /// Not possible on another process (only it can lock its memory).
    KeepFast,
}

impl From<AdviceArg> for Advice {
    fn from(a: AdviceArg) -> Self {
        match a {
            AdviceArg::Normal => Advice::Normal,
            AdviceArg::Hot => Advice::Hot,
            AdviceArg::Cold => Advice::Cold,
            AdviceArg::KeepFast => Advice::KeepFast,
        }
    }
}

/// `0x...`, or decimal with an optional K/M/G suffix (powers of 1024).
fn parse_num(s: &str) -> Result<u64, String> {
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).map_err(|e| format!("{s}: {e}"));
    }
    let (n, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    n.parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s}: not a number (0x.. hex, or decimal with K, M or G)"))
}

/// A failure with its exit code.
struct Failed(u8, String);

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        let code = if matches!(e, Error::Connect { .. }) {
            EXIT_NO_SERVER
        } else {
            EXIT_FAILED
        };
        Failed(code, e.to_string())
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<(), Failed> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Failed(EXIT_FAILED, e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn client(cli: &Cli) -> Result<Client, Failed> {
    Ok(Client::connect_to(
        &cli.socket.clone().unwrap_or_else(client_socket),
    )?)
}

fn pidfd(pid: u32) -> Result<std::os::fd::OwnedFd, Failed> {
    let p = rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| Failed(EXIT_FAILED, format!("pid {pid}: not a process id")))?;
    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
        .map_err(|e| Failed(EXIT_FAILED, format!("pid {pid}: {e}")))
}

#[derive(Serialize)]
struct NodeRow {
    nid: u16,
    capacity_bytes: u64,
    used_bytes: u64,
    reserved_bytes: u64,
    resident_pages: u64,
    credit_pages: u64,
    compression_ratio: f64,
    pressure_level: u64,
}

fn run(cli: &Cli) -> Result<(), Failed> {
    match &cli.cmd {
        Cmd::Status { json } => {
            let mut p = probe();
            if let Some(s) = &cli.socket {
                let c = Client::connect_to(s);
                p.server = c.is_ok();
                p.version = c.as_ref().ok().map(Client::version);
                p.error = c.err().map(|e| e.to_string());
            }
            if *json {
                print_json(&p)?;
            } else {
                println!(
                    "kernel: {}",
                    if p.kernel {
                        "mm_upcall present (/dev/mm_upcall)"
                    } else {
                        "no /dev/mm_upcall (kernel without CONFIG_MM_UPCALL)"
                    }
                );
                match (&p.version, &p.error) {
                    (Some(v), _) => println!("server: serving, protocol version {v}"),
                    (None, Some(e)) => println!("server: not reachable: {e}"),
                    (None, None) => println!("server: not reachable"),
                }
            }
            if p.server {
                Ok(())
            } else {
                Err(Failed(EXIT_NO_SERVER, "no server answers".into()))
            }
        }
        Cmd::Nodes { json } => {
            let text = AdminClient::connect(&cli.admin_socket)?.metrics()?;
            let m = prom::parse(&text);
            let rows: Vec<NodeRow> = m
                .label_values("mm_server_physical_capacity_bytes", "nid")
                .into_iter()
                .filter_map(|nid| {
                    let g = |name: &str| m.get(&format!("mm_server_{name}"), "nid", &nid);
                    Some(NodeRow {
                        nid: nid.parse().ok()?,
                        capacity_bytes: g("physical_capacity_bytes") as u64,
                        used_bytes: g("physical_used_bytes") as u64,
                        reserved_bytes: g("physical_reserved_bytes") as u64,
                        resident_pages: g("resident_pages") as u64,
                        credit_pages: g("credit_pages") as u64,
                        compression_ratio: g("compression_ratio"),
                        pressure_level: g("pressure_level") as u64,
                    })
                })
                .collect();
            if *json {
                return print_json(&rows);
            }
            println!(
                "{:>4} {:>12} {:>12} {:>12} {:>10} {:>6} {:>8}",
                "NODE", "CAPACITY", "USED", "RESERVED", "PAGES", "RATIO", "PRESSURE"
            );
            for r in rows {
                println!(
                    "{:>4} {:>12} {:>12} {:>12} {:>10} {:>6.2} {:>8}",
                    r.nid,
                    mib(r.capacity_bytes),
                    mib(r.used_bytes),
                    mib(r.reserved_bytes),
                    r.resident_pages,
                    r.compression_ratio,
                    ["normal", "high", "critical"]
                        .get(r.pressure_level as usize)
                        .unwrap_or(&"?")
                );
            }
            Ok(())
        }
        Cmd::Stats { json, prometheus } => {
            let mut a = AdminClient::connect(&cli.admin_socket)?;
            if *prometheus {
                print!("{}", a.metrics()?);
                return Ok(());
            }
            let s = a.stats()?;
            let rows = [
                ("upcalls", s.upcalls),
                ("write_faults", s.write_faults),
                ("hint_faults", s.hint_faults),
                ("credit_requests", s.credit_requests),
                ("promotions", s.promotions),
                ("placements", s.placements),
                ("denials", s.denials),
                ("evictions", s.evictions),
                ("physical_used_bytes", s.physical_used_bytes),
                ("physical_capacity_bytes", s.physical_capacity_bytes),
                ("resident_pages", s.resident_pages),
                ("zero_pages", s.zero_pages),
            ];
            if *json {
                let map: serde_json::Map<String, serde_json::Value> = rows
                    .iter()
                    .map(|&(k, v)| (k.to_string(), v.into()))
                    .collect();
                return print_json(&map);
            }
            for (k, v) in rows {
                println!("{k:<24} {v}");
            }
            Ok(())
        }
        Cmd::Advise {
            pid,
            addr,
            len,
            advice,
            json,
        } => {
            let fd = pidfd(*pid)?;
            let r = client(cli)?.advise_process(
                fd.as_fd(),
                *addr as usize,
                *len as usize,
                (*advice).into(),
            )?;
            if *json {
                return print_json(&r);
            }
            println!(
                "{} pages: {} moved, {} already there, {} skipped",
                r.pages, r.moved, r.already, r.skipped
            );
            Ok(())
        }
        Cmd::Residency {
            pid,
            addr,
            len,
            pages,
            json,
        } => {
            let fd = pidfd(*pid)?;
            let v = client(cli)?.residency_process(fd.as_fd(), *addr as usize, *len as usize)?;
            if *pages {
                if *json {
                    return print_json(&v);
                }
                let mut out = std::io::stdout().lock();
                for (i, p) in v.iter().enumerate() {
                    let _ = writeln!(out, "{:#x} {p}", *addr + i as u64 * 4096);
                }
                return Ok(());
            }
            let s = summarize(&v);
            if *json {
                return print_json(&s);
            }
            for (node, n) in &s.nodes {
                println!("node {node}: {n} pages");
            }
            println!(
                "not present: {}, not mapped: {}, compressed: {} pages measured, {} bytes",
                s.not_present, s.not_mapped, s.measured_pages, s.compressed_bytes
            );
            Ok(())
        }
        Cmd::Policy { cmd } => {
            let mut a = AdminClient::connect(&cli.admin_socket)?;
            match cmd {
                PolicyCmd::Get { node, json } => {
                    let v = PolicyView::from(&a.policy(*node)?);
                    if *json {
                        return print_json(&v);
                    }
                    let j =
                        serde_json::to_value(&v).map_err(|e| Failed(EXIT_FAILED, e.to_string()))?;
                    if let Some(o) = j.as_object() {
                        for (k, v) in o {
                            println!("{k:<24} {v}");
                        }
                    }
                    Ok(())
                }
                PolicyCmd::Set {
                    node,
                    low,
                    high,
                    critical,
                    writable_budget,
                    promote_rate_limit_mbps,
                    hot_threshold,
                    hot_window_ms,
                    credit_chunk_pages,
                } => {
                    let mut p = a.policy(*node)?;
                    p.low = low.unwrap_or(p.low);
                    p.high = high.unwrap_or(p.high);
                    p.critical = critical.unwrap_or(p.critical);
                    p.writable_budget = writable_budget.unwrap_or(p.writable_budget);
                    p.promote_rate_limit_mbps =
                        promote_rate_limit_mbps.unwrap_or(p.promote_rate_limit_mbps);
                    p.hot_threshold = hot_threshold.unwrap_or(p.hot_threshold);
                    p.hot_window_ms = hot_window_ms.unwrap_or(p.hot_window_ms);
                    p.credit_chunk_pages = credit_chunk_pages.unwrap_or(p.credit_chunk_pages);
                    a.set_policy(p)?;
                    println!("policy set");
                    Ok(())
                }
            }
        }
        Cmd::Drain {
            nid,
            timeout,
            no_wait,
        } => {
            let mut a = AdminClient::connect(&cli.admin_socket)?;
            a.drain(*nid)?;
            println!("node {nid}: draining");
            if *no_wait {
                return Ok(());
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(*timeout);
            let mut last = u64::MAX;
            let mut started = false;
            loop {
                let (state, resident) = node_state(&mut a, *nid)?;
                if state == 3 {
                    println!("node {nid}: empty and detached (ordinary memory now)");
                    return Ok(());
                }
                started |= state != 0;
                if started && state == 0 {
                    return Err(Failed(
                        EXIT_FAILED,
                        format!(
                            "node {nid}: DETACH_NODE failed; mm-server serves the node again \
                             (its log says why)"
                        ),
                    ));
                }
                if resident != last {
                    println!("node {nid}: {resident} pages left");
                    last = resident;
                }
                if std::time::Instant::now() >= deadline {
                    return Err(Failed(
                        EXIT_FAILED,
                        format!(
                            "node {nid} not drained after {timeout} s: {resident} pages left \
                             (pinned or busy pages are retried; the drain goes on)"
                        ),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
        }
        Cmd::Evict {
            cgroup,
            max_bytes,
            min_age,
            node,
            json,
        } => {
            use std::os::unix::fs::MetadataExt as _;
            let ino = std::fs::metadata(cgroup)
                .map_err(|e| Failed(EXIT_FAILED, format!("{}: {e}", cgroup.display())))?
                .ino();
            let r =
                AdminClient::connect(&cli.admin_socket)?.evict(*node, ino, *max_bytes, *min_age)?;
            if *json {
                #[derive(Serialize)]
                struct V {
                    pages: u64,
                    aged: u64,
                }
                return print_json(&V {
                    pages: r.pages,
                    aged: r.aged,
                });
            }
            println!(
                "{} pages of {} queued for eviction ({} pages of node {node} at least {min_age} s old)",
                r.pages,
                cgroup.display(),
                r.aged
            );
            Ok(())
        }
        Cmd::Doctor { json } => {
            let checks = doctor::run(
                &cli.admin_socket,
                &cli.socket.clone().unwrap_or_else(client_socket),
            );
            if *json {
                print_json(&checks)?;
            } else {
                for c in &checks {
                    println!("{}", c.line());
                }
            }
            if checks.iter().any(|c| c.status == doctor::Status::Fail) {
                Err(Failed(EXIT_PROBLEMS, String::new()))
            } else {
                Ok(())
            }
        }
        Cmd::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(|e| Failed(EXIT_FAILED, e.to_string())),
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "mmctl", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

#[derive(Serialize, Default)]
struct Summary {
    nodes: std::collections::BTreeMap<u16, u64>,
    not_present: u64,
    not_mapped: u64,
    measured_pages: u64,
    compressed_bytes: u64,
}

fn summarize(v: &[Page]) -> Summary {
    let mut s = Summary::default();
    for p in v {
        match *p {
            Page::Resident { node, compressed } => {
                *s.nodes.entry(node).or_default() += 1;
                if let Some(b) = compressed {
                    s.measured_pages += 1;
                    s.compressed_bytes += u64::from(b);
                }
            }
            Page::NotPresent => s.not_present += 1,
            Page::NotMapped | Page::Error { .. } => s.not_mapped += 1,
        }
    }
    s
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed(code, msg)) => {
            if !msg.is_empty() {
                eprintln!("mmctl: {msg}");
            }
            ExitCode::from(code)
        }
    }
}
