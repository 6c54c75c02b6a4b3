//! `selftests-control` and `selftests-managed`: the kernel's own mm
//! selftests in the guest, for `cargo xtask selftests`.
//!
//! Each test runs in its own memory cgroup while a background demoter asks
//! that cgroup to reclaim every 0.5 s: with no swap, reclaim can only
//! demote the test's anonymous pages to node 1.
//! - control: node 1 is ordinary memory (no server), so a test that fails
//!   here races with reclaim and says nothing about the series;
//! - managed: `mm-server` manages node 1, so the demoted pages are fenced
//!   and every write to them is a write-fault verdict.
//!
//! For every test one line `SELFTEST <name> <verdict> <secs> key=value...`
//! goes to the console, which `xtask` turns into the table: the verdict
//! (pass, fail, skip, timeout), the kselftest totals, the pages demoted,
//! the write-fault verdicts and promotions of the managed node, the kernel
//! anomaly counters that moved, and any kernel splat logged meanwhile.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::selftest_list::{SELFTESTS, Selftest};
use crate::server::MmServer;
use crate::sys::{self, ensure};

const NODE1_HUGEPAGES: &str =
    "/sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages";

const CGROUP: &str = "/sys/fs/cgroup/mm-selftest";

/// Where the tests run (some create files in their working directory).
const WORKDIR: &str = "/tmp/mm-selftest";

/// The demoter's period and request.
const DEMOTE_EVERY: Duration = Duration::from_millis(500);
const DEMOTE_BYTES: &str = "64M";

/// What counts as a kernel splat in a log record (as `xtask vm` judges
/// the console).
const SPLATS: &[&str] = &[
    "WARNING:",
    "BUG:",
    "Oops",
    "general protection fault",
    "soft lockup",
    "blocked for more than",
    "KASAN:",
    "UBSAN:",
    "possible circular locking",
    "possible recursive locking",
    "Bad page",
    "detected stall",
    "hard LOCKUP",
    "page dumped because",
];

/// gup_test's `-ct` dumps pages on purpose.
const REQUESTED: &str = "page dumped because: gup_test: dump_pages() test";

/// Counters read before and after each test: the tests' cgroup's
/// `memory.stat` and the transport's debugfs stats.
fn counters() -> Result<HashMap<String, i64>> {
    let mut m = HashMap::new();
    // The tests' own cgroup: what reclaim demoted of their pages.
    for l in sys::read(&format!("{CGROUP}/memory.stat"))?.lines() {
        if let Some((k, v)) = l.split_once(' ')
            && let Ok(v) = v.parse::<i64>()
        {
            m.insert(k.to_string(), v);
        }
    }
    if let Ok(stats) = crate::upcall::stats() {
        for (k, v) in stats {
            m.insert(format!("upcall.{k}"), v as i64);
        }
    }
    Ok(m)
}

fn delta(a: &HashMap<String, i64>, b: &HashMap<String, i64>, k: &str) -> i64 {
    b.get(k).copied().unwrap_or(0) - a.get(k).copied().unwrap_or(0)
}

/// New kernel log records since the last call, as `[level] text`.
struct Kmsg(std::fs::File);

impl Kmsg {
    fn open() -> Result<Self> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .context("cannot open /dev/kmsg")?;
        // Start at the end: only what happens from now on.
        use std::io::Seek as _;
        f.seek(std::io::SeekFrom::End(0))
            .context("seek /dev/kmsg")?;
        Ok(Self(f))
    }

    fn splats(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    if let Some((_, msg)) = rec.split_once(';') {
                        let msg = msg.lines().next().unwrap_or("");
                        if !msg.contains(REQUESTED)
                            && SPLATS.iter().any(|p| msg.contains(p))
                            && out.len() < 5
                        {
                            out.push(msg.to_string());
                        }
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }
}

/// The background demoter: `memory.reclaim` on the tests' cgroup.
struct Demoter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Demoter {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut rounds = 0;
            while !s.load(Ordering::Relaxed) {
                // EAGAIN (less reclaimed than asked) is the normal case.
                match std::fs::write(format!("{CGROUP}/memory.reclaim"), DEMOTE_BYTES) {
                    Ok(()) => rounds += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => rounds += 1,
                    Err(_) => {}
                }
                std::thread::sleep(DEMOTE_EVERY);
            }
            rounds
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

/// The kselftest `# Totals:` line, as `pass/fail/skip`.
fn totals(out: &str) -> String {
    out.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("# Totals: "))
        .map(|t| {
            let get = |k: &str| {
                t.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k))
                    .unwrap_or("?")
                    .to_string()
            };
            format!("{}/{}/{}", get("pass:"), get("fail:"), get("skip:"))
        })
        .unwrap_or_else(|| "-".into())
}

/// Run one test with its timeout; returns (verdict, seconds, output).
fn run_one(dir: &str, t: &Selftest) -> Result<(&'static str, f64, String)> {
    let bin = format!("{dir}/{}", t.bin);
    ensure(std::path::Path::new(&bin).exists(), || {
        format!("{bin} is missing (cargo xtask selftests builds it)")
    })?;
    let log = format!("{WORKDIR}/{}.log", t.name);
    let out = std::fs::File::create(&log)?;
    // The shell joins the cgroup, then becomes the test: the test never
    // runs outside it.
    let script = if t.nobody {
        format!(
            "echo $$ > {CGROUP}/cgroup.procs && exec setpriv --reuid=65534 --regid=65534 \
             --clear-groups \"$0\" \"$@\""
        )
    } else {
        format!("echo $$ > {CGROUP}/cgroup.procs && exec \"$0\" \"$@\"")
    };
    let start = Instant::now();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg(&bin)
        .args(t.args)
        .current_dir(WORKDIR)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {bin}"))?;
    let limit = Duration::from_secs(t.timeout_secs);
    let mut status = None;
    while start.elapsed() <= limit {
        if let Some(st) = child.try_wait()? {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Whatever is left in the cgroup (the test on a timeout, children it
    // forked, whatever process group they made) dies before the next test.
    if !empty_cgroup() {
        bail!(
            "{}: tasks of the test are still in {CGROUP} 30 s after cgroup.kill \
             (unkillable: stuck in the kernel)",
            t.name
        );
    }
    if status.is_none() {
        status = child.try_wait()?;
        // Killed by the timeout: not a verdict of the test's own.
        status = status.filter(|_| false);
    }
    let secs = start.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let verdict = match status {
        None => "timeout",
        Some(st) => match (st.code(), st.signal()) {
            // ksft_finished() exits 0 when every subtest skipped.
            (Some(0), _) if all_skipped(&text) => "skip",
            (Some(0), _) => "pass",
            (Some(4), _) => "skip",
            (_, Some(_)) => "crash",
            _ => "fail",
        },
    };
    Ok((verdict, secs, text))
}

/// kselftest totals with no pass and some skips.
fn all_skipped(out: &str) -> bool {
    let t = totals(out);
    let mut it = t.split('/');
    matches!((it.next(), it.next(), it.next()), (Some("0"), Some(_), Some(s)) if s != "0")
}

/// `cgroup.kill` the tests' cgroup and wait (at most 30 s) until it holds
/// no task; false if tasks remain.
fn empty_cgroup() -> bool {
    let populated = || {
        sys::read(&format!("{CGROUP}/cgroup.events"))
            .map(|e| e.lines().any(|l| l == "populated 1"))
            .unwrap_or(true)
    };
    if !populated() {
        return true;
    }
    let _ = sys::write(&format!("{CGROUP}/cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while populated() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The settings a test may change and restore only when it exits
/// normally (THP, khugepaged, KSM), to put back after each test.
const SETTINGS_DIRS: &[&str] = &[
    "/sys/kernel/mm/transparent_hugepage",
    "/sys/kernel/mm/transparent_hugepage/khugepaged",
    "/sys/kernel/mm/ksm",
];

fn settings() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for d in SETTINGS_DIRS {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let writable = e
                .metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o200 != 0)
                .unwrap_or(false);
            if writable && let Ok(v) = std::fs::read_to_string(&p) {
                out.push((p.display().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

/// `[always] madvise never` reads back with brackets; write the word.
fn restore(saved: &[(String, String)]) {
    let now: HashMap<String, String> = settings().into_iter().collect();
    for (path, v) in saved {
        if now.get(path) != Some(v) {
            let word = v
                .split_whitespace()
                .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
                .unwrap_or(v);
            let _ = std::fs::write(path, word);
        }
    }
}

/// The kernel's anomaly counters, reported per test (the table shows
/// them), not judged: the selftests pin pages, fork with pages in flight
/// and exit with thousands of pages on the node, which move some of them
/// by design (see `expected_anomalies()` in main.rs).
const ANOMALIES: &[&str] = &[
    "timeouts",
    "aborted",
    "late_commits",
    "events_lost",
    "promote_failed",
    "copied_after_failed_promotion",
    "interrupted",
    "stalled",
    "pinned_in_place",
];

pub fn run(managed: bool) -> Result<()> {
    let dir = std::env::var("MM_SELFTESTS_DIR").context("MM_SELFTESTS_DIR is not set")?;
    let names = std::env::var("MM_SELFTESTS").context("MM_SELFTESTS is not set")?;
    let mode = if managed { "managed" } else { "control" };
    std::fs::create_dir_all(WORKDIR)?;
    sys::write("/sys/kernel/mm/numa/demotion_enabled", "true")?;
    let _ = sys::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
    if let Err(e) = std::fs::create_dir(CGROUP)
        && e.kind() != std::io::ErrorKind::AlreadyExists
    {
        return Err(e).context("cannot create the selftests' cgroup");
    }
    ensure(
        std::path::Path::new(&format!("{CGROUP}/memory.reclaim")).exists(),
        || format!("{CGROUP} has no memory.reclaim: the memory controller is not enabled"),
    )?;
    // Each result line also goes to the second serial port, which the
    // kernel never writes: `xtask` reads it from there whole.
    let mut results = std::fs::OpenOptions::new()
        .append(true)
        .open("/dev/ttyS1")
        .context("open /dev/ttyS1")?;
    let saved = settings();
    let server = if managed {
        Some(MmServer::start("selftests", 768, "")?)
    } else {
        None
    };
    let mut kmsg = Kmsg::open()?;
    let demoter = Demoter::start();
    let (mut demoted_total, mut verdicts_total) = (0i64, 0i64);
    for name in names.split(',').filter(|n| !n.is_empty()) {
        let (base, _run) = name.split_once('#').unwrap_or((name, ""));
        let t = SELFTESTS
            .iter()
            .find(|t| t.name == base)
            .with_context(|| format!("unknown selftest `{base}`"))?;
        let mut isolation = None;
        if t.hugepages > 0 {
            sys::write("/proc/sys/vm/nr_hugepages", &t.hugepages.to_string())?;
        }
        let before = counters()?;
        println!("selftests: {mode}: {name}: {} {}", t.bin, t.args.join(" "));
        let (verdict, secs, out) = run_one(&dir, t)?;
        let after = counters()?;
        // The pool as the test left it (compaction_test grows it itself):
        // in managed mode none of it may sit on the managed node.
        let on1 = sys::read(NODE1_HUGEPAGES)?;
        if managed && on1 != "0" {
            isolation = Some(format!("{on1} hugetlb pages on the managed node"));
        }
        sys::write("/proc/sys/vm/nr_hugepages", "0")?;
        restore(&saved);
        let demoted = delta(&before, &after, "pgdemote_direct")
            + delta(&before, &after, "pgdemote_kswapd")
            + delta(&before, &after, "pgdemote_khugepaged");
        let faults = delta(&before, &after, "upcall.write_faults");
        let promoted = delta(&before, &after, "upcall.promoted");
        let in_place = delta(&before, &after, "upcall.allowed_in_place");
        demoted_total += demoted;
        verdicts_total += faults;
        let anomalies: Vec<String> = ANOMALIES
            .iter()
            .filter_map(|a| {
                let d = delta(&before, &after, &format!("upcall.{a}"));
                (d != 0).then(|| format!("{a}+{d}"))
            })
            .collect();
        let splats = kmsg.splats();
        // The failing checks: kselftest's `not ok` lines, khugepaged's and
        // uffd's own words.
        let failing: Vec<&str> = out
            .lines()
            .filter(|l| {
                l.starts_with("not ok")
                    || l.contains("\u{1b}[31mFail")
                    || l.contains("... failed")
                    || l.starts_with("Bail out!")
            })
            .collect();
        let verdict = if isolation.is_some() {
            "isolation"
        } else if splats.is_empty() || !matches!(verdict, "pass" | "skip") {
            verdict
        } else {
            "splat"
        };
        let line = format!(
            "SELFTEST {name} {verdict} {secs:.1} totals={} demoted={demoted} write_faults={faults} \
             promoted={promoted} in_place={in_place} anomalies={}",
            totals(&out),
            if anomalies.is_empty() {
                "-".to_string()
            } else {
                anomalies.join(",")
            }
        );
        println!("{line}");
        writeln!(results, "{line}").context("write /dev/ttyS1")?;
        if let Some(i) = &isolation {
            println!("selftests: {name}: {i}");
        }
        for s in &splats {
            println!("selftests: {name}: kernel: {s}");
        }
        if !matches!(verdict, "pass" | "skip") {
            // What failed: the failing checks, then the tail.
            let lines: Vec<&str> = out.lines().collect();
            for l in failing.iter().take(30) {
                println!("  ! {l}");
            }
            for l in &lines[lines.len().saturating_sub(25)..] {
                println!("  | {l}");
            }
        }
        let _ = std::io::stdout().flush();
    }
    let rounds = demoter.stop();
    ensure(rounds > 0, || {
        "the demoter's memory.reclaim never ran".into()
    })?;
    println!(
        "selftests: {mode}: the demoter's memory.reclaim ran {rounds} times; {demoted_total} \
         pages of the tests demoted, {verdicts_total} write-fault verdicts"
    );
    if let Some(srv) = server {
        // The server must have stayed healthy through all of it and drain.
        let log = srv.stop()?;
        if log.contains("panicked") {
            bail!("mm-server panicked during the selftests");
        }
    }
    Ok(())
}
