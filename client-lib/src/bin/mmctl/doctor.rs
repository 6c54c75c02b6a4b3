//! `mmctl doctor`: what this machine needs for mm-upcall, one check per
//! line.

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use mm_upcall_client::{AdminClient, Client, Error};
use serde::Serialize;

use crate::prom;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

impl Check {
    pub fn line(&self) -> String {
        let tag = match self.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        format!("{tag} {}: {}", self.name, self.detail)
    }
}

fn check(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
    }
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

use mm_upcall_client::parse_list as list;

/// The memory tier (its sysfs name) holding `node`.
fn tier_of(node: u16) -> Option<String> {
    let dir = std::fs::read_dir("/sys/devices/virtual/memory_tiering").ok()?;
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("memory_tier"))
        .find(|e| list(&read(&e.path().join("nodelist").to_string_lossy())).contains(&node))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

fn tier_rank(name: &str) -> u32 {
    name.trim_start_matches("memory_tier").parse().unwrap_or(0)
}

/// What a memory-only node is to the kernel.
enum NodeUse {
    /// Managed by mm_upcall: only its server may place pages there.
    Isolated,
    /// Ordinary memory: anyone may.
    Ordinary,
    Unknown(String),
}

/// Ask the kernel by trying: `move_pages(2)` of one of our own pages to
/// `node` is refused (`EACCES`) on a managed node and works on ordinary
/// memory (the page is moved back).
fn probe_node(node: u16) -> NodeUse {
    let page = vec![1u8; 2 * 4096];
    let addr = (page.as_ptr() as u64).next_multiple_of(4096);
    let mut status = [0i32];
    match mm_upcall_kernel::move_pages(0, &[addr], Some(i32::from(node)), &mut status) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => NodeUse::Isolated,
        Err(e) => NodeUse::Unknown(e.to_string()),
        Ok(_) if status[0] == i32::from(node) => {
            let _ = mm_upcall_kernel::move_pages(0, &[addr], Some(0), &mut status);
            NodeUse::Ordinary
        }
        Ok(_) if status[0] == -libc::EACCES => NodeUse::Isolated,
        Ok(_) => NodeUse::Unknown(format!(
            "move_pages left the page at {}",
            std::io::Error::from_raw_os_error(-status[0])
        )),
    }
}

/// Run every check.
pub fn run(admin: &Path, client: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    match std::fs::metadata("/dev/mm_upcall") {
        Ok(m) if m.file_type().is_char_device() => {
            out.push(check(
                "kernel",
                Status::Ok,
                "mm_upcall present (/dev/mm_upcall)",
            ));
        }
        _ => out.push(check(
            "kernel",
            Status::Fail,
            "no /dev/mm_upcall: this kernel lacks CONFIG_MM_UPCALL; boot a kernel with the \
             mm_upcall series",
        )),
    }
    let memory = list(&read("/sys/devices/system/node/has_memory"));
    let cpus = list(&read("/sys/devices/system/node/has_cpu"));
    let fast: Vec<u16> = memory
        .iter()
        .copied()
        .filter(|n| cpus.contains(n))
        .collect();
    let slow: Vec<u16> = memory
        .iter()
        .copied()
        .filter(|n| !cpus.contains(n))
        .collect();
    if slow.is_empty() {
        out.push(check(
            "nodes",
            Status::Fail,
            "no memory-only NUMA node: the compressed device must be a node of its own, with \
             memory and no CPUs",
        ));
    } else {
        out.push(check(
            "nodes",
            Status::Ok,
            format!("memory-only node(s) {slow:?}, fast node(s) {fast:?}"),
        ));
    }
    let demotion = read("/sys/kernel/mm/numa/demotion_enabled");
    out.push(if demotion.trim() == "true" {
        check("demotion", Status::Ok, "enabled")
    } else {
        check(
            "demotion",
            Status::Fail,
            "disabled: reclaim never demotes to the compressed node; \
             echo true > /sys/kernel/mm/numa/demotion_enabled",
        )
    });
    // Which nodes a running server manages (root can ask).
    let managed: Option<Vec<u16>> = AdminClient::connect(admin)
        .and_then(|mut a| a.metrics())
        .ok()
        .map(|t| {
            prom::parse(&t)
                .label_values("mm_server_physical_capacity_bytes", "nid")
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect()
        });
    let fast_tier = fast.first().and_then(|&n| tier_of(n));
    for &n in &slow {
        let name = format!("node {n}");
        out.push(match (tier_of(n), &fast_tier) {
            (Some(t), Some(f)) if tier_rank(&t) > tier_rank(f) => check(
                &name,
                Status::Ok,
                format!("in {t}, below the fast nodes' {f}"),
            ),
            (Some(t), Some(_)) => check(
                &name,
                Status::Fail,
                format!(
                    "in {t}, the fast nodes' tier: the kernel treats it as fast memory and never \
                     demotes to it; its driver must give it a larger abstract distance"
                ),
            ),
            _ => check(&name, Status::Warn, "no memory tier found in sysfs"),
        });
        out.push(match &managed {
            Some(m) if m.contains(&n) => check(&name, Status::Ok, "managed by the running server"),
            Some(m) if !m.is_empty() => check(
                &name,
                Status::Fail,
                format!(
                    "not managed by the running server (it manages {m:?}): it is ordinary \
                     memory the page allocator hands out; add [[node]] nid = {n} to mm-server's \
                     configuration"
                ),
            ),
            _ => match probe_node(n) {
                NodeUse::Isolated => check(
                    &name,
                    Status::Fail,
                    "managed by the kernel (isolated and fenced) but no server serves it: start \
                     mm-server to adopt it",
                ),
                NodeUse::Ordinary => check(
                    &name,
                    Status::Fail,
                    format!(
                        "ordinary memory: the page allocator hands it out (mmctl's own page \
                         could be placed there); start mm-server with [[node]] nid = {n}"
                    ),
                ),
                NodeUse::Unknown(e) => check(
                    &name,
                    Status::Fail,
                    format!("no running server manages it, and probing it failed: {e}"),
                ),
            },
        });
    }
    let balancing = read("/proc/sys/kernel/numa_balancing");
    out.push(match balancing.trim() {
        "2" | "3" => check(
            "numa_balancing",
            Status::Ok,
            format!("mode {}", balancing.trim()),
        ),
        v => check(
            "numa_balancing",
            Status::Warn,
            format!(
                "mode {v}: pages on the compressed node are promoted only when written or \
                 evicted; sysctl kernel.numa_balancing=2 promotes them on access too"
            ),
        ),
    });
    match std::fs::metadata(client) {
        Err(_) => out.push(check(
            "server",
            Status::Fail,
            format!(
                "not running: no client socket at {}; start mm-server (mm-server -c \
                 /etc/mm-server.toml)",
                client.display()
            ),
        )),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            match Client::connect_to(client) {
                Ok(c) => out.push(check(
                    "server",
                    Status::Ok,
                    format!(
                        "serving on {}, protocol version {}",
                        client.display(),
                        c.version()
                    ),
                )),
                Err(Error::Connect { source, .. })
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    out.push(check(
                        "socket",
                        Status::Fail,
                        format!(
                            "{} (mode {mode:o}, gid {}): this user may not connect; add it to \
                             the group in server.client_group",
                            client.display(),
                            m.gid()
                        ),
                    ));
                }
                Err(e) => out.push(check("server", Status::Fail, format!("not answering: {e}"))),
            }
            out.push(if mode == 0o660 {
                check("socket", Status::Ok, format!("mode 0660, gid {}", m.gid()))
            } else {
                check(
                    "socket",
                    Status::Warn,
                    format!("mode {mode:o}, expected 0660 (group server.client_group)"),
                )
            });
        }
    }
    out
}
