//! `cargo xtask vm <scenario>...`: boot the patched kernel in QEMU (TCG) on a
//! two-tier NUMA topology and run one scenario per boot.
//!
//! Node 0 has the CPUs and fast memory; node 1 is memory-only with HMAT
//! latency/bandwidth that put it in a lower memory tier (the demotion target
//! of node 0).  The guest runs a busybox initramfs whose `/init` mounts the
//! host root read-only over 9p and `chroot`s into it to run the host-built
//! `mm-guest <scenario>`.  The exit status of `mm-guest` is written to a
//! second serial port that QEMU records in a file, so the verdict does not
//! depend on grepping the console log; the console goes to a log file that
//! is shown when a scenario fails.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{target_dir, workspace_root};

/// A scenario's outcome.
#[derive(Debug)]
pub enum Outcome {
    Pass,
    Fail(String),
}

/// Guest memory per node, MiB.
pub const NODE_MIB: u64 = 1024;

/// Node 0's memory for `scenario`, MiB.  `server-e2e` runs a workload of
/// 1.5x node 0; a 512 MiB node 0 keeps that within TCG's means (every page
/// rewritten on node 1 is one upcall round trip).
pub fn node0_mib(scenario: &str) -> u64 {
    match scenario {
        "server-e2e" => 512,
        _ => NODE_MIB,
    }
}

/// How to boot.
pub struct Vm<'a> {
    pub bzimage: &'a Path,
    pub guest_bin: PathBuf,
    pub timeout: Duration,
    /// More kernel command line.
    pub append: &'static str,
}

/// The debug kernel's command line: 4-level paging.  Under TCG `-cpu max`
/// offers LA57, and with 5-level paging generic KASAN reports a
/// wild-memory-access in an interrupt taken during early boot
/// (`identify_cpu()`), before any of this project's code runs.
pub const DEBUG_APPEND: &str = "no5lvl";

fn busybox() -> Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("busybox not found; install busybox-static (cargo xtask kernel does)")
}

const INIT: &str = r#"#!/bin/busybox sh
# mm-upcall test bed /init: mount the host root, run one scenario, power off.
B=/bin/busybox
$B mkdir -p /proc /sys /dev /host
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
result() { echo "MMUPCALL-RESULT $1" > /dev/ttyS1; $B sync; $B poweroff -f; $B reboot -f; }
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host || result 200
for d in proc sys dev; do $B mount --bind /$d /host/$d || result 201; done
# A writable /tmp for the guest, keeping the host's /tmp reachable where
# the workspace lives (a clone under /tmp must still find its binaries).
$B mkdir -p /hosttmp
$B mount --bind /host/tmp /hosttmp || result 202
$B mount -t tmpfs -o mode=1777 tmpfs /host/tmp || result 202
for p in @WORKSPACE@ @TARGET@; do
    case "$p" in
    /tmp/*)
        rel=${p#/tmp/}
        top=${rel%%/*}
        $B mkdir -p "/host/tmp/$top"
        $B mount --bind "/hosttmp/$top" "/host/tmp/$top" || result 202
        ;;
    esac
done
$B mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
$B mount -t cgroup2 cgroup2 /host/sys/fs/cgroup || result 203
echo "mm-guest: starting @SCENARIO@"
$B chroot /host /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp \
    RUST_BACKTRACE=1 MM_WORKSPACE=@WORKSPACE@ MM_TARGET=@TARGET@ @ENV@ \
    @GUEST@ @SCENARIO@
result $?
"#;

fn write_initramfs(dir: &Path, scenario: &str, guest: &Path, env: &str) -> Result<PathBuf> {
    let root = dir.join("initramfs");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("bin"))?;
    fs::copy(busybox()?, root.join("bin/busybox"))?;
    let init = INIT
        .replace("@SCENARIO@", scenario)
        .replace("@GUEST@", &guest.display().to_string())
        .replace("@WORKSPACE@", &workspace_root().display().to_string())
        .replace("@TARGET@", &target_dir().display().to_string())
        .replace("@ENV@", env);
    fs::write(root.join("init"), init)?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;
    let image = dir.join("initramfs.cpio.gz");
    let sh = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        root.display(),
        image.display()
    );
    crate::util::run(Command::new("sh").args(["-c", &sh]))?;
    Ok(image)
}

impl Vm<'_> {
    /// The QEMU command line for the two-tier topology.
    fn qemu(
        &self,
        node0: u64,
        initrd: &Path,
        console: &Path,
        result: &Path,
        append_extra: &str,
    ) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        let mib = NODE_MIB;
        c.args([
            "-accel",
            "tcg",
            "-machine",
            "pc,hmat=on",
            "-cpu",
            "max",
            "-smp",
            "2",
        ])
        .args(["-m", &format!("{}M", node0 + mib)])
        .args([
            "-object",
            &format!("memory-backend-ram,id=m0,size={node0}M"),
        ])
        .args(["-object", &format!("memory-backend-ram,id=m1,size={mib}M")])
        .args(["-numa", "node,nodeid=0,cpus=0-1,memdev=m0,initiator=0"])
        .args(["-numa", "node,nodeid=1,memdev=m1,initiator=0"]);
        for (target, kind, value) in [
            (0, "access-latency,latency=10", ""),
            (0, "access-bandwidth,bandwidth=10G", ""),
            (1, "access-latency,latency=40", ""),
            (1, "access-bandwidth,bandwidth=2G", ""),
        ] {
            c.args([
                "-numa",
                &format!(
                    "hmat-lb,initiator=0,target={target},hierarchy=memory,data-type={kind}{value}"
                ),
            ]);
        }
        c.arg("-kernel")
            .arg(self.bzimage)
            .arg("-initrd")
            .arg(initrd)
            .args([
                "-append",
                &format!(
                    "console=ttyS0 panic=-1 oops=panic loglevel=5 \
                     transparent_hugepage=madvise {append_extra}"
                ),
            ])
            .args([
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=none,readonly=on",
            ])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", result.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// Boot once and run `scenario` in the guest.
    pub fn run(&self, scenario: &str, env: &str) -> Result<Outcome> {
        let dir = target_dir().join("vm").join(scenario);
        fs::create_dir_all(&dir)?;
        let initrd = write_initramfs(&dir, scenario, &self.guest_bin, env)?;
        let console = dir.join("console.log");
        let result = dir.join("result");
        let _ = fs::remove_file(&console);
        let _ = fs::remove_file(&result);
        let mut child = self
            .qemu(node0_mib(scenario), &initrd, &console, &result, self.append)
            .spawn()
            .context("cannot start qemu-system-x86_64")?;
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut qemu_err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read as _;
            let _ = e.read_to_string(&mut qemu_err);
        }
        let res = fs::read_to_string(&result).unwrap_or_default();
        let code = res
            .lines()
            .find_map(|l| l.trim().strip_prefix("MMUPCALL-RESULT "))
            .and_then(|v| v.trim().parse::<i32>().ok());
        let outcome = match (status, code) {
            (_, Some(0)) => Outcome::Pass,
            (_, Some(200..=203)) => Outcome::Fail(format!(
                "guest setup failed (code {}); see {}",
                code.unwrap_or(0),
                console.display()
            )),
            (_, Some(c)) => Outcome::Fail(format!("exit code {c}: {}", last_error(&console))),
            (None, None) => Outcome::Fail(format!(
                "timed out after {}s; console: {}",
                self.timeout.as_secs(),
                console.display()
            )),
            (Some(st), None) => Outcome::Fail(format!(
                "no result from the guest (qemu {st}{}); console: {}",
                if qemu_err.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", qemu_err.trim())
                },
                console.display()
            )),
        };
        // A scenario that passed still fails on a kernel splat.
        let outcome = match (outcome, splats(&console)) {
            (o, s) if s.is_empty() => o,
            (Outcome::Pass, s) => Outcome::Fail(format!(
                "the kernel log shows {} splat line(s):\n{}",
                s.len(),
                s.join("\n")
            )),
            (Outcome::Fail(why), s) => Outcome::Fail(format!(
                "{why}; and the kernel log shows {} splat line(s):\n{}",
                s.len(),
                s.join("\n")
            )),
        };
        if let Outcome::Fail(_) = outcome {
            show_tail(&console);
        }
        Ok(outcome)
    }
}

/// What in a kernel log line means the kernel found itself wrong.
const SPLATS: &[&str] = &[
    "WARNING:",
    "BUG:",
    "Oops",
    "general protection fault",
    "Kernel panic",
    "soft lockup",
    "hard LOCKUP",
    "rcu_sched self-detected stall",
    "rcu_preempt self-detected stall",
    "rcu: INFO:",
    "detected stall",
    "blocked for more than",
    "KASAN:",
    "UBSAN:",
    "possible circular locking",
    "possible recursive locking",
    "inconsistent lock state",
    "suspicious RCU usage",
    "lockdep",
    "list_add corruption",
    "list_del corruption",
    "sleeping function called from invalid context",
    "scheduling while atomic",
    "Bad page",
    "page dumped because",
];

/// The kernel's splat lines in a console log, each with the next few
/// lines of its report: only kernel lines (`[ seconds] ...`) count, so
/// that a scenario printing these words does not trip it.
pub fn splats(console: &Path) -> Vec<String> {
    let text = fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let kernel = |l: &str| {
        l.strip_prefix('[')
            .and_then(|r| r.split_once("] "))
            .is_some_and(|(t, _)| t.trim().parse::<f64>().is_ok())
    };
    let mut out = Vec::new();
    let mut until = 0;
    // gup_test's `-ct` dumps pages on purpose.
    let requested = |l: &str| l.contains("page dumped because: gup_test: dump_pages() test");
    for (i, l) in lines.iter().enumerate() {
        if kernel(l) && requested(l) {
            // Not a splat (its dump lines match no pattern).
            continue;
        }
        if kernel(l) && SPLATS.iter().any(|p| l.contains(p)) {
            until = i + 6;
        }
        if i < until && out.len() < 60 {
            out.push((*l).to_string());
        }
    }
    out
}

/// The last line the guest program printed as `FAIL: ...` or an error.
fn last_error(console: &Path) -> String {
    let text = fs::read_to_string(console).unwrap_or_default();
    text.lines()
        .rev()
        .find_map(|l| {
            l.split_once("mm-guest: FAIL: ")
                .map(|(_, r)| r.trim().to_string())
        })
        .unwrap_or_else(|| format!("see {}", console.display()))
}

fn show_tail(console: &Path) {
    let text = fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(30);
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "---- last lines of {} ----", console.display());
    for l in &lines[from..] {
        let _ = writeln!(err, "{l}");
    }
    let _ = writeln!(err, "----");
}
