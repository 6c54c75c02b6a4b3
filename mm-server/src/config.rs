//! The TOML configuration of `mm-server`, and its validation.
//!
//! ```toml
//! [server]
//! device = "/dev/mm_upcall"   # default
//! queue_depth = 64            # slots, 1..=1024
//! timeout_ms = 1000           # longest wait on us, 1..=60000
//! admin_socket = "/run/mm-server.sock"
//! client_socket = "/run/mm-upcall/client.sock"   # applications' advice, mode 0660
//! client_group = "mm-upcall"  # group that may use it (default: root's only)
//! client_requests_per_s = 1000       # per uid
//! client_advise_mib_per_s = 4096     # bytes advised per second, per uid
//! drain_timeout_ms = 30000    # eviction time on SIGTERM before detaching
//! detach_on_stop = true       # false: leave the node managed for the next server
//!
//! [policy]
//! writable_budget = 0         # pages per node written in place
//! hot_threshold = 2
//! promote_rate_limit_mbps = 65536
//! fast_nodes = [0]
//! hot_window_ms = 1000        # heat halves after each window
//! credit_chunk_pages = 4096   # least credit per DEMOTE_CREDIT request
//! standing_verdicts = true    # let the kernel promote without asking when the answer is fixed
//!
//! [[node]]
//! nid = 1
//! capacity_mib = 512          # physical capacity of the device
//! granule = 64                # device allocation granule, bytes
//! watermarks = { low = 60, high = 80, critical = 95 }   # percent
//!
//! [[tenant]]                  # a cgroup whose share of the device is capped
//! cgroup = "/sys/fs/cgroup/batch"   # the tenant: this cgroup and its descendants
//! max_mib = 64                # device space its pages may cost, all nodes together
//! ```
//!
//! Unknown keys are errors (`deny_unknown_fields`), so a typo never
//! silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::capacity::{ConfigError as GeometryError, Geometry};
use crate::policy::PolicyConfig;

/// Why a configuration cannot be used.  Every message says what to fix.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("[[node]] #{index} (nid {nid})")]
    Geometry {
        index: usize,
        nid: u16,
        #[source]
        source: GeometryError,
    },
    #[error("no [[node]] configured: add at least one managed node")]
    NoNodes,
    #[error("node {nid} is configured twice")]
    DuplicateNode { nid: u16 },
    #[error(
        "node {nid} does not exist ({path} is missing); check `nid` against /sys/devices/system/node"
    )]
    MissingNode { nid: u16, path: PathBuf },
    #[error("node {nid} has CPUs ({cpus}); a managed node must be memory-only")]
    NodeHasCpus { nid: u16, cpus: String },
    #[error("node {nid} is both managed and listed in policy.fast_nodes")]
    FastNodeManaged { nid: u16 },
    #[error("server.queue_depth must be 1..=1024, got {0}")]
    QueueDepth(u16),
    #[error("server.timeout_ms must be 1..=60000, got {0}")]
    Timeout(u32),
    #[error("server.drain_timeout_ms must be at most 600000, got {0}")]
    DrainTimeout(u32),
    #[error("server.client_requests_per_s and server.client_advise_mib_per_s must be at least 1")]
    ClientLimits,
    #[error(
        "server.client_group {0:?} is not a group of /etc/group; create it (groupadd) or give a gid"
    )]
    ClientGroup(String),
    #[error("policy.hot_window_ms must be 10..=3600000, got {0}")]
    HotWindow(u32),
    #[error("policy.fast_nodes is empty: name the node(s) pages are promoted to, nearest first")]
    NoFastNodes,
    #[error(
        "server.admin_socket {path}: directory {dir} does not exist; create it or choose another path"
    )]
    AdminDir { path: PathBuf, dir: PathBuf },
    #[error(
        "device {path} is missing: boot a kernel with CONFIG_MM_UPCALL=y (see kernel-upcall/linux) or set server.device"
    )]
    MissingDevice { path: PathBuf },
    #[error("{path} is not a character device; set server.device to /dev/mm_upcall")]
    NotADevice { path: PathBuf },
    #[error(
        "[[tenant]] #{index}: cgroup {path} must be an absolute path below the cgroup2 mount \
         (/sys/fs/cgroup/...)"
    )]
    TenantPath { index: usize, path: PathBuf },
    #[error("[[tenant]] #{index}: max_mib must be at least 1")]
    TenantLimit { index: usize },
    #[error("[[tenant]] {path} is configured twice")]
    DuplicateTenant { path: PathBuf },
    #[error(
        "[[tenant]] {path} is not a cgroup directory; create it (mkdir) before the server starts"
    )]
    MissingTenant { path: PathBuf },
    #[error(
        "[[tenant]] {path} has no memory controller (no memory.current), so its pages are \
         charged to an ancestor; enable it: echo +memory > {parent}/cgroup.subtree_control"
    )]
    TenantNoMemcg { path: PathBuf, parent: PathBuf },
}

fn default_device() -> PathBuf {
    PathBuf::from(mm_upcall_kernel::DEVICE_PATH)
}
fn default_depth() -> u16 {
    64
}
fn default_timeout() -> u32 {
    1000
}
fn default_admin() -> PathBuf {
    PathBuf::from("/run/mm-server.sock")
}
fn default_client() -> PathBuf {
    PathBuf::from("/run/mm-upcall/client.sock")
}
fn default_client_rps() -> u32 {
    1000
}
fn default_client_mibps() -> u64 {
    4096
}
fn default_true() -> bool {
    true
}
fn default_drain() -> u32 {
    30_000
}
fn default_window() -> u32 {
    1000
}
fn default_chunk() -> u64 {
    4096
}
fn default_granule() -> u32 {
    64
}
fn default_hot() -> u8 {
    2
}
fn default_rate() -> u64 {
    65536
}
fn default_fast() -> Vec<u16> {
    vec![0]
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default = "default_device")]
    pub device: PathBuf,
    #[serde(default = "default_depth")]
    pub queue_depth: u16,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u32,
    /// The admin socket (Prometheus metrics, stats), mode 0600.
    #[serde(default = "default_admin")]
    pub admin_socket: PathBuf,
    /// On SIGINT/SIGTERM, how long to spend evicting the node's pages
    /// before detaching it (a node that still holds pages is left managed,
    /// isolated and fenced, for the next server to adopt).
    #[serde(default = "default_drain")]
    pub drain_timeout_ms: u32,
    /// On SIGINT/SIGTERM, evict the nodes' pages and detach them (the
    /// default).  `false` leaves them managed, isolated and fenced, with
    /// their pages, for the next server to adopt: what a restart wants,
    /// and the only way a compressed device never becomes ordinary memory.
    #[serde(default = "default_true")]
    pub detach_on_stop: bool,
    /// The client socket (applications' advice), mode 0660; its directory
    /// is created if missing.
    #[serde(default = "default_client")]
    pub client_socket: PathBuf,
    /// The group (name or number) that may use the client socket; unset:
    /// root's group.
    #[serde(default)]
    pub client_group: Option<String>,
    /// Client socket requests per second, per uid.
    #[serde(default = "default_client_rps")]
    pub client_requests_per_s: u32,
    /// Bytes advised through the client socket per second, per uid, in MiB.
    #[serde(default = "default_client_mibps")]
    pub client_advise_mib_per_s: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            device: default_device(),
            queue_depth: default_depth(),
            timeout_ms: default_timeout(),
            admin_socket: default_admin(),
            drain_timeout_ms: default_drain(),
            detach_on_stop: true,
            client_socket: default_client(),
            client_group: None,
            client_requests_per_s: default_client_rps(),
            client_advise_mib_per_s: default_client_mibps(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    #[serde(default)]
    pub writable_budget: u64,
    #[serde(default = "default_hot")]
    pub hot_threshold: u8,
    #[serde(default = "default_rate")]
    pub promote_rate_limit_mbps: u64,
    #[serde(default = "default_fast")]
    pub fast_nodes: Vec<u16>,
    /// Length of a hotness window: page heat halves at its end.
    #[serde(default = "default_window")]
    pub hot_window_ms: u32,
    /// Least credit granted per DEMOTE_CREDIT request, pages.
    #[serde(default = "default_chunk")]
    pub credit_chunk_pages: u64,
    /// Let the kernel promote written pages without asking while the
    /// answer would not depend on the fault (no writable budget, no fast
    /// node short of memory).
    #[serde(default = "default_true")]
    pub standing_verdicts: bool,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            writable_budget: 0,
            hot_threshold: default_hot(),
            promote_rate_limit_mbps: default_rate(),
            fast_nodes: default_fast(),
            hot_window_ms: default_window(),
            credit_chunk_pages: default_chunk(),
            standing_verdicts: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Watermarks {
    pub low: u8,
    pub high: u8,
    pub critical: u8,
}

impl Default for Watermarks {
    fn default() -> Self {
        Self {
            low: 60,
            high: 80,
            critical: 95,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub nid: u16,
    pub capacity_mib: u64,
    #[serde(default = "default_granule")]
    pub granule: u32,
    #[serde(default)]
    pub watermarks: Watermarks,
}

impl NodeSection {
    pub fn geometry(&self) -> Geometry {
        Geometry {
            capacity: self.capacity_mib.saturating_mul(1 << 20),
            granule: self.granule,
            low: self.watermarks.low,
            high: self.watermarks.high,
            critical: self.watermarks.critical,
        }
    }
}

/// A tenant: a cgroup (and its descendants) whose pages may cost at most
/// `max_mib` of device space on the managed nodes together.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantSection {
    pub cgroup: PathBuf,
    pub max_mib: u64,
}

impl TenantSection {
    /// Its name in metrics and logs: the cgroup's path below the cgroup2
    /// mount (`batch/job1`), however the path was written.
    pub fn name(&self) -> String {
        let rel = self
            .cgroup
            .strip_prefix(CGROUP_ROOT)
            .unwrap_or(&self.cgroup);
        let parts: Vec<String> = rel
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        parts.join("/")
    }
}

/// Where cgroup v2 is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub node: Vec<NodeSection>,
    #[serde(default)]
    pub tenant: Vec<TenantSection>,
}

impl Config {
    /// Read and parse a file (no checks against the system yet).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Read`], [`ConfigError::Parse`] (with the key and line).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Parse TOML text.
    ///
    /// # Errors
    ///
    /// The TOML error, naming the offending key.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks that need no system: ranges, watermarks, duplicates.
    ///
    /// # Errors
    ///
    /// The first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.server.queue_depth) {
            return Err(ConfigError::QueueDepth(self.server.queue_depth));
        }
        if !(1..=60_000).contains(&self.server.timeout_ms) {
            return Err(ConfigError::Timeout(self.server.timeout_ms));
        }
        if self.server.drain_timeout_ms > 600_000 {
            return Err(ConfigError::DrainTimeout(self.server.drain_timeout_ms));
        }
        if self.server.client_requests_per_s == 0 || self.server.client_advise_mib_per_s == 0 {
            return Err(ConfigError::ClientLimits);
        }
        if let Some(g) = &self.server.client_group {
            group_id(g, Path::new("/etc/group"))?;
        }
        if !(10..=3_600_000).contains(&self.policy.hot_window_ms) {
            return Err(ConfigError::HotWindow(self.policy.hot_window_ms));
        }
        if self.policy.fast_nodes.is_empty() {
            return Err(ConfigError::NoFastNodes);
        }
        if self.node.is_empty() {
            return Err(ConfigError::NoNodes);
        }
        for (index, n) in self.node.iter().enumerate() {
            n.geometry()
                .validate()
                .map_err(|source| ConfigError::Geometry {
                    index,
                    nid: n.nid,
                    source,
                })?;
            if self.node[..index].iter().any(|m| m.nid == n.nid) {
                return Err(ConfigError::DuplicateNode { nid: n.nid });
            }
            if self.policy.fast_nodes.contains(&n.nid) {
                return Err(ConfigError::FastNodeManaged { nid: n.nid });
            }
        }
        for (index, t) in self.tenant.iter().enumerate() {
            let p = &t.cgroup;
            // Below the mount: the root cgroup has no memory.max of its own.
            if !p.starts_with(CGROUP_ROOT)
                || t.name().is_empty()
                || p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(ConfigError::TenantPath {
                    index,
                    path: p.clone(),
                });
            }
            if t.max_mib == 0 {
                return Err(ConfigError::TenantLimit { index });
            }
            if self.tenant[..index].iter().any(|u| u.cgroup == *p) {
                return Err(ConfigError::DuplicateTenant { path: p.clone() });
            }
        }
        Ok(())
    }

    /// Checks against the running system: every managed node exists and is
    /// memory-only (under `sysfs`, normally `/sys`), and the device exists.
    ///
    /// # Errors
    ///
    /// The first problem found.
    pub fn check_system(&self, sysfs: &Path) -> Result<(), ConfigError> {
        for n in &self.node {
            let dir = sysfs.join(format!("devices/system/node/node{}", n.nid));
            if !dir.is_dir() {
                return Err(ConfigError::MissingNode {
                    nid: n.nid,
                    path: dir,
                });
            }
            let cpus = std::fs::read_to_string(dir.join("cpulist")).unwrap_or_default();
            if !cpus.trim().is_empty() {
                return Err(ConfigError::NodeHasCpus {
                    nid: n.nid,
                    cpus: cpus.trim().to_string(),
                });
            }
        }
        let sock = &self.server.admin_socket;
        let dir = sock
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(ConfigError::AdminDir {
                path: sock.clone(),
                dir: dir.to_path_buf(),
            });
        }
        for t in &self.tenant {
            if !t.cgroup.join("cgroup.procs").exists() {
                return Err(ConfigError::MissingTenant {
                    path: t.cgroup.clone(),
                });
            }
            // /proc/kpagecgroup names the memory cgroup a page is charged
            // to: without a controller of its own, that is an ancestor.
            if !t.cgroup.join("memory.current").exists() {
                return Err(ConfigError::TenantNoMemcg {
                    path: t.cgroup.clone(),
                    parent: t
                        .cgroup
                        .parent()
                        .unwrap_or(Path::new(CGROUP_ROOT))
                        .to_path_buf(),
                });
            }
        }
        let dev = &self.server.device;
        match std::fs::metadata(dev) {
            Err(_) => Err(ConfigError::MissingDevice { path: dev.clone() }),
            Ok(m) => {
                use std::os::unix::fs::FileTypeExt as _;
                if m.file_type().is_char_device() {
                    Ok(())
                } else {
                    Err(ConfigError::NotADevice { path: dev.clone() })
                }
            }
        }
    }

    /// The gid of `server.client_group`, if set.
    ///
    /// # Errors
    ///
    /// [`ConfigError::ClientGroup`]: no such group.
    pub fn client_gid(&self) -> Result<Option<u32>, ConfigError> {
        self.server
            .client_group
            .as_deref()
            .map(|g| group_id(g, Path::new("/etc/group")))
            .transpose()
    }

    /// The policy knobs.
    pub fn policy(&self) -> PolicyConfig {
        PolicyConfig {
            writable_budget: self.policy.writable_budget,
            hot_threshold: self.policy.hot_threshold,
            promote_rate_limit_mbps: self.policy.promote_rate_limit_mbps,
            fast_nodes: self.policy.fast_nodes.clone(),
            credit_chunk_pages: self.policy.credit_chunk_pages,
            standing_verdicts: self.policy.standing_verdicts,
        }
    }
}

/// The gid of group `name` (a number is taken as it is), from `group_file`
/// (`/etc/group`).
///
/// # Errors
///
/// [`ConfigError::ClientGroup`]: no such group.
pub fn group_id(name: &str, group_file: &Path) -> Result<u32, ConfigError> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    std::fs::read_to_string(group_file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
        })
        .ok_or_else(|| ConfigError::ClientGroup(name.to_string()))
}
