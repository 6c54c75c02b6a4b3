//! Per-tenant limits: each `[[tenant]]` cgroup, with its descendants, may
//! cost at most `max_mib` of device space on the managed nodes together.
//!
//! A thread walks the pages the books hold (pfn, device cost, age), a
//! [`CHUNK`] at a time so that the loop never pauses long, at most
//! [`CHUNKS_PER_PERIOD`] chunks per [`PERIOD`]; finds the memory cgroup
//! each page is charged to in `/proc/kpagecgroup`; and sums the cost per
//! tenant (a page counts for every tenant whose subtree holds its cgroup,
//! as `memory.max` does).  At the end of each pass over the managed nodes,
//! a tenant above its limit has its oldest pages evicted (PROMOTE_PFN, to
//! fast memory, through the core's eviction queue) until it is back under
//! [`LOW_PERCENT`] of its limit, at most [`MAX_CANDIDATES`] pages per
//! pass.
//!
//! This is a limit enforced after the fact: within a pass (a second for up
//! to a million pages on the nodes, longer beyond), reclaim can demote a
//! tenant's pages past its limit, and a tenant under memory pressure is
//! demoted and evicted again.  Keeping its pages off the node at demotion
//! time needs the kernel to ask per cgroup (see docs/DESIGN.md,
//! "Tenants").

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::capacity::Costed;
use crate::config::TenantSection;
use crate::driver::CoreHandle;

/// The thread's period.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Pages asked of the loop at a time.
pub const CHUNK: usize = 65_536;
/// Chunks per period: about a million pages (4 GiB) looked at per second.
pub const CHUNKS_PER_PERIOD: usize = 16;
/// The oldest pages kept per tenant in a pass: the most it loses in one.
pub const MAX_CANDIDATES: usize = 65_536;
/// An over-limit tenant is evicted down to this percentage of its limit.
pub const LOW_PERCENT: u64 = 90;

/// One tenant as configured.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub cgroup: PathBuf,
    pub limit_bytes: u64,
}

impl From<&TenantSection> for Tenant {
    fn from(t: &TenantSection) -> Self {
        Self {
            name: t.name(),
            cgroup: t.cgroup.clone(),
            limit_bytes: t.max_mib.saturating_mul(1 << 20),
        }
    }
}

/// What one look found for one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Device bytes its pages cost (measured, or the worst case before).
    pub bytes: u64,
    pub pages: u64,
}

/// A candidate for eviction, ordered by age first: (age, pfn reversed,
/// nid, bytes).
type Candidate = (u32, Reverse<u64>, u16, u32);

/// One pass over the managed nodes, as it goes.
#[derive(Debug)]
pub struct Pass {
    pub usage: Vec<Usage>,
    /// Per tenant, bytes of its pages already queued for eviction.
    queued_bytes: Vec<u64>,
    /// Per tenant, its oldest pages not queued, (age, pfn, nid, bytes),
    /// the youngest on top, at most [`MAX_CANDIDATES`].
    oldest: Vec<BinaryHeap<Reverse<Candidate>>>,
}

impl Pass {
    pub fn new(tenants: usize) -> Self {
        Self {
            usage: vec![Usage::default(); tenants],
            queued_bytes: vec![0; tenants],
            oldest: (0..tenants).map(|_| BinaryHeap::new()).collect(),
        }
    }

    /// Count a page of node `nid` for `tenants` (one whose eviction is
    /// pending counts as gone, and is not chosen again).
    pub fn add(&mut self, nid: u16, page: Costed, tenants: &[usize]) {
        let queued = page.pending;
        for &t in tenants {
            self.usage[t].bytes += u64::from(page.bytes);
            self.usage[t].pages += 1;
            if queued {
                self.queued_bytes[t] += u64::from(page.bytes);
                continue;
            }
            let heap = &mut self.oldest[t];
            heap.push(Reverse((page.age_s, Reverse(page.pfn), nid, page.bytes)));
            if heap.len() > MAX_CANDIDATES {
                heap.pop();
            }
        }
    }
}

/// What a pass decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Pages to evict, (nid, pfn): the oldest of each over-limit tenant.
    pub evict: Vec<(u16, u64)>,
    /// Per tenant, how many of `evict` it chose.
    pub chose: Vec<u64>,
}

/// The evictions that bring every tenant above its limit back under
/// [`LOW_PERCENT`] of it, oldest pages first; pages queued already count
/// as gone, and a page of nested tenants is chosen once.
pub fn plan(pass: &Pass, limits: &[u64]) -> Plan {
    let mut chosen: HashSet<(u16, u64)> = HashSet::new();
    let mut evict = Vec::new();
    let mut chose = vec![0; limits.len()];
    for (t, &limit) in limits.iter().enumerate() {
        let used = pass.usage[t].bytes;
        if used <= limit {
            continue;
        }
        let target = limit / 100 * LOW_PERCENT + limit % 100 * LOW_PERCENT / 100;
        let mut mine: Vec<(u32, u64, u16, u32)> = pass.oldest[t]
            .iter()
            .map(|&Reverse((age, Reverse(pfn), nid, bytes))| (age, pfn, nid, bytes))
            .collect();
        let mut left = used - pass.queued_bytes[t];
        // Chosen for a tenant before this one: gone too.
        for &(_, pfn, nid, bytes) in &mine {
            if chosen.contains(&(nid, pfn)) {
                left -= u64::from(bytes);
            }
        }
        mine.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, pfn, nid, bytes) in mine {
            if left <= target {
                break;
            }
            if !chosen.insert((nid, pfn)) {
                continue;
            }
            left -= u64::from(bytes);
            evict.push((nid, pfn));
            chose[t] += 1;
        }
    }
    Plan { evict, chose }
}

/// The inode of every cgroup in `dir`'s subtree (what `/proc/kpagecgroup`
/// reports for a page charged to it); empty if `dir` is gone.
pub fn subtree_inos(dir: &Path) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(m) = std::fs::metadata(&d) else {
            continue;
        };
        out.push(m.ino());
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(e.path());
                }
            }
        }
    }
    out
}

/// The memory cgroup inode of each of `pfns` (sorted), from
/// `/proc/kpagecgroup`, read a window of pfns at a time; 0 where it cannot
/// be read.
///
/// # Errors
///
/// `/proc/kpagecgroup` cannot be opened (a kernel without
/// `CONFIG_MEMCG`, or not root).
pub fn page_cgroups(pfns: &[u64]) -> std::io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt as _;
    const WINDOW: u64 = 4096;
    let f = std::fs::File::open("/proc/kpagecgroup")?;
    let mut buf = vec![0u8; WINDOW as usize * 8];
    let mut base = u64::MAX;
    let mut got = 0usize;
    let mut out = Vec::with_capacity(pfns.len());
    for &pfn in pfns {
        if base == u64::MAX || pfn < base || pfn >= base + WINDOW {
            base = pfn;
            got = f.read_at(&mut buf, pfn * 8).unwrap_or(0);
        }
        let off = ((pfn - base) * 8) as usize;
        out.push(if off + 8 <= got {
            u64::from_ne_bytes(buf[off..off + 8].try_into().expect("8 bytes"))
        } else {
            0
        });
    }
    Ok(out)
}

/// Per-tenant metrics, shared with the admin socket.
pub type Published = Arc<Mutex<String>>;

/// What the thread keeps between periods.
struct State {
    tenants: Vec<Tenant>,
    /// The tenants each cgroup inode counts for (found again each pass).
    owner: HashMap<u64, Vec<usize>>,
    /// Where the walk is: an index into the managed nodes, and a pfn.
    at: (usize, u64),
    pass: Pass,
    evicted: Vec<u64>,
    episodes: Vec<u64>,
    over: Vec<bool>,
}

fn owners(tenants: &[Tenant]) -> HashMap<u64, Vec<usize>> {
    let mut owner: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, t) in tenants.iter().enumerate() {
        for ino in subtree_inos(&t.cgroup) {
            owner.entry(ino).or_default().push(i);
        }
    }
    owner
}

/// One period: walk up to [`CHUNKS_PER_PERIOD`] chunks; at the end of a
/// pass, evict, and return the metrics.
fn period(core: &CoreHandle, st: &mut State) -> std::io::Result<Option<String>> {
    for _ in 0..CHUNKS_PER_PERIOD {
        let Some(&nid) = core.managed.get(st.at.0) else {
            return end_pass(core, st).map(Some);
        };
        let (pages, next) = core.costed(nid, st.at.1, CHUNK)?;
        let pfns: Vec<u64> = pages.iter().map(|p| p.pfn).collect();
        let cgroups = page_cgroups(&pfns)?;
        for (page, ino) in pages.into_iter().zip(cgroups) {
            if let Some(ts) = st.owner.get(&ino) {
                st.pass.add(nid, page, ts);
            }
        }
        st.at = match next {
            Some(pfn) => (st.at.0, pfn),
            None => (st.at.0 + 1, 0),
        };
    }
    Ok(None)
}

/// The end of a pass: plan, queue the evictions, start the next pass.
fn end_pass(core: &CoreHandle, st: &mut State) -> std::io::Result<String> {
    let pass = std::mem::replace(&mut st.pass, Pass::new(st.tenants.len()));
    st.at = (0, 0);
    st.owner = owners(&st.tenants);
    let limits: Vec<u64> = st.tenants.iter().map(|t| t.limit_bytes).collect();
    let plan = plan(&pass, &limits);
    for (i, t) in st.tenants.iter().enumerate() {
        let over = pass.usage[i].bytes > t.limit_bytes;
        if over && !st.over[i] {
            st.episodes[i] += 1;
        }
        st.over[i] = over;
        if plan.chose[i] > 0 {
            st.evicted[i] += plan.chose[i];
            tracing::info!(
                tenant = t.name,
                used_bytes = pass.usage[i].bytes,
                limit_bytes = t.limit_bytes,
                pages = plan.chose[i],
                "tenant over its limit: evicting its oldest pages"
            );
        }
    }
    let mut by_node: HashMap<u16, Vec<u64>> = HashMap::new();
    for &(nid, pfn) in &plan.evict {
        by_node.entry(nid).or_default().push(pfn);
    }
    // Each node's request on its own: one refused or unanswered leaves
    // the others queued, and its pages are chosen again next pass.
    for (nid, pfns) in by_node {
        match core.evict(nid, pfns) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(nid, "tenant eviction refused: {e:?}"),
            Err(e) => tracing::warn!(nid, "tenant eviction not queued: {e}"),
        }
    }
    Ok(render(st, &pass.usage))
}

/// The tenants' Prometheus text.
fn render(st: &State, usage: &[Usage]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    // Name, type, help, value per tenant.
    type Family<'a> = (&'a str, &'a str, &'a str, &'a dyn Fn(usize) -> u64);
    let families: [Family<'_>; 5] = [
        (
            "tenant_used_bytes",
            "gauge",
            "Device bytes the tenant's pages cost (measured, or the worst case before).",
            &|i| usage[i].bytes,
        ),
        (
            "tenant_pages",
            "gauge",
            "The tenant's pages on the managed nodes.",
            &|i| usage[i].pages,
        ),
        (
            "tenant_limit_bytes",
            "gauge",
            "The tenant's limit (max_mib).",
            &|i| st.tenants[i].limit_bytes,
        ),
        (
            "tenant_evictions_queued_total",
            "counter",
            "Pages queued for eviction because the tenant was over its limit.",
            &|i| st.evicted[i],
        ),
        (
            "tenant_over_limit_total",
            "counter",
            "Times the tenant went over its limit.",
            &|i| st.episodes[i],
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(
            s,
            "# HELP mm_server_{name} {help}\n# TYPE mm_server_{name} {kind}"
        );
        for (i, t) in st.tenants.iter().enumerate() {
            let _ = writeln!(
                s,
                "mm_server_{name}{{tenant=\"{}\"}} {}",
                t.name
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n"),
                value(i)
            );
        }
    }
    s
}

/// Start the thread (nothing to do with no tenant), for the life of the
/// process.
///
/// # Errors
///
/// The thread could not be started.
pub fn spawn(tenants: Vec<Tenant>, core: CoreHandle, out: Published) -> std::io::Result<()> {
    if tenants.is_empty() {
        return Ok(());
    }
    let n = tenants.len();
    let mut st = State {
        owner: owners(&tenants),
        tenants,
        at: (0, 0),
        pass: Pass::new(n),
        evicted: vec![0; n],
        episodes: vec![0; n],
        over: vec![false; n],
    };
    // The families are there from the start, at zero until a pass ends.
    *out.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) =
        render(&st, &vec![Usage::default(); n]);
    std::thread::Builder::new()
        .name("tenants".into())
        .spawn(move || {
            // Failures are said once per run of them (a stopping loop
            // fails every period until the process exits).
            let mut failing = false;
            loop {
                match period(&core, &mut st) {
                    Ok(text) => {
                        if let Some(text) = text {
                            *out.lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner) = text;
                        }
                        failing = false;
                    }
                    Err(e) if !failing => {
                        tracing::warn!("tenant limits: {e}; trying again every second");
                        failing = true;
                    }
                    Err(_) => {}
                }
                std::thread::sleep(PERIOD);
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Page<'a> = (u64, u32, u32, &'a [usize]);

    /// A pass over `pages`, (pfn, bytes, age, tenants); `queued` pfns are
    /// on their way out.
    fn pass(tenants: usize, pages: &[Page<'_>], queued: &[u64]) -> Pass {
        let mut p = Pass::new(tenants);
        for &(pfn, bytes, age_s, ts) in pages {
            let pending = queued.contains(&pfn);
            p.add(
                1,
                Costed {
                    pfn,
                    bytes,
                    age_s,
                    pending,
                },
                ts,
            );
        }
        p
    }

    fn ten_pages() -> Vec<Page<'static>> {
        (0..10u32)
            .map(|i| (100 + u64::from(i), 1000, i, &[0][..]))
            .collect()
    }

    #[test]
    fn a_tenant_within_its_limit_is_left_alone() {
        let p = pass(1, &[(10, 4096, 5, &[0]), (11, 64, 5, &[0])], &[]);
        assert_eq!(
            p.usage[0],
            Usage {
                bytes: 4160,
                pages: 2
            }
        );
        assert!(plan(&p, &[8192]).evict.is_empty());
    }

    #[test]
    fn an_over_limit_tenant_loses_its_oldest_pages_down_to_the_low_mark() {
        // 10 pages of 1000 bytes, limit 5000: down to 4500, oldest first.
        let p = plan(&pass(1, &ten_pages(), &[]), &[5000]);
        assert_eq!(
            p.evict,
            vec![(1, 109), (1, 108), (1, 107), (1, 106), (1, 105), (1, 104)]
        );
        assert_eq!(p.chose, vec![6]);
    }

    #[test]
    fn queued_evictions_count_as_gone_and_are_not_chosen_again() {
        let p = plan(&pass(1, &ten_pages(), &[109, 108, 107]), &[5000]);
        assert_eq!(p.evict, vec![(1, 106), (1, 105), (1, 104)]);
    }

    #[test]
    fn other_tenants_pages_are_never_chosen() {
        // Tenant 0: 8192 bytes over 5000, down to 4500: its oldest page.
        let p = pass(
            2,
            &[(1, 4096, 9, &[1]), (2, 4096, 1, &[0]), (3, 4096, 0, &[0])],
            &[],
        );
        assert_eq!(p.usage[1].pages, 1);
        assert_eq!(plan(&p, &[5000, 1 << 30]).evict, vec![(1, 2)]);
    }

    #[test]
    fn a_page_of_nested_tenants_counts_for_both_and_is_chosen_once() {
        let p = pass(2, &[(1, 4096, 9, &[0, 1]), (2, 4096, 1, &[0, 1])], &[]);
        assert_eq!(p.usage[0].bytes, 8192);
        assert_eq!(p.usage[1].bytes, 8192);
        // Tenant 0 evicts both (down to 3686); tenant 1 then needs none.
        let plan = plan(&p, &[4096, 4096]);
        assert_eq!(plan.evict, vec![(1, 1), (1, 2)]);
        assert_eq!(plan.chose, vec![2, 0]);
    }

    #[test]
    fn a_pass_keeps_only_the_oldest_candidates() {
        let mut p = Pass::new(1);
        for i in 0..(MAX_CANDIDATES as u64 + 10) {
            let page = Costed {
                pfn: i,
                bytes: 64,
                age_s: (i % 1000) as u32,
                pending: false,
            };
            p.add(1, page, &[0]);
        }
        assert_eq!(p.oldest[0].len(), MAX_CANDIDATES);
        assert_eq!(p.usage[0].pages, MAX_CANDIDATES as u64 + 10);
        // A limit of 1 byte: everything kept is chosen, the oldest first.
        let plan = plan(&p, &[1]);
        assert_eq!(plan.evict.len(), MAX_CANDIDATES);
        assert_eq!(plan.evict[0], (1, 999));
    }
}
