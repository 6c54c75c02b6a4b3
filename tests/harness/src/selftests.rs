//! `cargo xtask selftests [--mode control|managed] [--repeat N] [test...]`:
//! the kernel's own mm selftests, built from the patched tree and run in
//! the guest with a background demoter, with node 1 either ordinary
//! memory (control) or managed by `mm-server` (managed).
//!
//! The list, the arguments and what is left out (with the reason) are in
//! `selftest_list.rs`; the guest side is `guest/selftests.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

// Shared with mm-guest, which uses the fields xtask does not.
#[allow(dead_code)]
#[path = "selftest_list.rs"]
mod list;
pub use list::{LEFT_OUT, SELFTESTS};

use crate::kernel;
use crate::util::{self, target_dir};
use crate::vm::{Outcome, Vm};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Mode {
    Control,
    Managed,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Control => "control",
            Mode::Managed => "managed",
        }
    }
}

/// One test's result, from its `SELFTEST` line.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub verdict: String,
    pub secs: f64,
    /// `key=value` fields: totals, demoted, write_faults, promoted, ...
    pub fields: BTreeMap<String, String>,
}

impl Row {
    fn field(&self, k: &str) -> &str {
        self.fields.get(k).map_or("-", String::as_str)
    }
    fn num(&self, k: &str) -> i64 {
        self.field(k).parse().unwrap_or(0)
    }
}

/// Build the selftest binaries the chosen tests need, from the patched
/// tree, into `target/selftests/mm` (the kernel's UAPI headers go to the
/// tree's own `usr/include`, which is under `target/` too).
pub fn build(tree: &Path, tests: &[&list::Selftest]) -> Result<PathBuf> {
    util::ensure_packages(&["make", "gcc", "liburing-dev", "libnuma-dev", "libcap-dev"])?;
    let out = target_dir().join("selftests/mm");
    std::fs::create_dir_all(&out)?;
    let log = target_dir().join("selftests/build.log");
    let logf = std::fs::File::create(&log)?;
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let st = cmd
            .stdout(logf.try_clone()?)
            .stderr(logf.try_clone()?)
            .status()
            .with_context(|| format!("cannot run make for {what}"))?;
        if !st.success() {
            bail!("{what} failed; see {}", log.display());
        }
        Ok(())
    };
    run(
        Command::new("make")
            .current_dir(tree)
            .args(["-s", "headers"]),
        "make headers",
    )?;
    let mut bins: Vec<&str> = tests.iter().map(|t| t.bin).collect();
    bins.sort_unstable();
    bins.dedup();
    let mut cmd = Command::new("make");
    cmd.current_dir(tree.join("tools/testing/selftests/mm"))
        .args(["-s", "-j2"])
        .arg(format!("OUTPUT={}", out.display()))
        // Debian's 6.12 tree backported a `return KSFT_SKIP` into
        // khugepaged.c without its #include "../kselftest.h"; the same
        // token sequence as kselftest.h's definition, so no redefinition
        // warning where that header is included.
        .arg("EXTRA_CFLAGS=-DKSFT_SKIP=4");
    for b in &bins {
        cmd.arg(out.join(b));
    }
    run(&mut cmd, "building the mm selftests")?;
    Ok(out)
}

/// The tests named, in list order when none are named; `name#k` for the
/// k-th of `repeat` runs.
fn select(names: &[String]) -> Result<Vec<&'static list::Selftest>> {
    if names.is_empty() {
        return Ok(SELFTESTS.iter().collect());
    }
    names
        .iter()
        .map(|n| {
            SELFTESTS.iter().find(|t| t.name == n).with_context(|| {
                format!(
                    "unknown selftest `{n}` (known: {})",
                    SELFTESTS
                        .iter()
                        .map(|t| t.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .collect()
}

/// Boot once in `mode` and run `tests` (each `repeat` times).
pub fn run(mode: Mode, tests: &[&list::Selftest], repeat: usize) -> Result<(Vec<Row>, Outcome)> {
    let k = kernel::ensure()?;
    let dir = build(&k.tree, tests)?;
    let mut runs = Vec::new();
    for t in tests {
        for r in 1..=repeat {
            runs.push(if repeat > 1 {
                format!("{}#{r}", t.name)
            } else {
                t.name.to_string()
            });
        }
    }
    let budget: u64 = tests.iter().map(|t| t.timeout_secs).sum::<u64>() * repeat as u64;
    let vm = Vm {
        bzimage: &k.bzimage,
        guest_bin: crate::build_guest()?,
        timeout: Duration::from_secs(budget + 600),
        append: "",
    };
    let scenario = format!("selftests-{}", mode.name());
    let env = format!(
        "MM_SELFTESTS_DIR={} MM_SELFTESTS={}",
        dir.display(),
        runs.join(",")
    );
    let outcome = vm.run(&scenario, &env)?;
    // The guest writes its result lines to the second serial port, where
    // no kernel message can land in the middle of one.
    let result = target_dir().join("vm").join(&scenario).join("result");
    let text = std::fs::read_to_string(&result).unwrap_or_default();
    let mut rows: Vec<Row> = text
        .lines()
        .filter_map(|l| l.strip_prefix("SELFTEST "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?.to_string();
            let verdict = it.next()?.to_string();
            let secs = it.next()?.parse().ok()?;
            let fields = it
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Some(Row {
                name,
                verdict,
                secs,
                fields,
            })
        })
        .collect();
    // A run with no line (the guest stopped before it, or the line was
    // lost) is a failure of its own, never a silent gap in the table.
    for r in &runs {
        if !rows.iter().any(|row| &row.name == r) {
            rows.push(Row {
                name: r.clone(),
                verdict: "no-result".into(),
                secs: 0.0,
                fields: BTreeMap::new(),
            });
        }
    }
    Ok((rows, outcome))
}

/// The table, one line per test with a column per mode.
fn table(results: &BTreeMap<Mode, Vec<Row>>) -> String {
    let modes: Vec<Mode> = results.keys().copied().collect();
    let mut s = String::from("| test |");
    for m in &modes {
        s.push_str(&format!(" {} | {} pass/fail/skip |", m.name(), m.name()));
    }
    if results.contains_key(&Mode::Managed) {
        s.push_str(" managed: pages demoted | write-fault verdicts | promoted | anomalies |");
    }
    s.push('\n');
    s.push_str(
        &"|---".repeat(1 + 2 * modes.len() + 4 * usize::from(results.contains_key(&Mode::Managed))),
    );
    s.push_str("|\n");
    let mut names: Vec<String> = Vec::new();
    for rows in results.values() {
        for r in rows {
            if !names.contains(&r.name) {
                names.push(r.name.clone());
            }
        }
    }
    for n in &names {
        s.push_str(&format!("| {n} |"));
        for m in &modes {
            match results[m].iter().find(|r| &r.name == n) {
                Some(r) => s.push_str(&format!(
                    " {} ({:.0} s) | {} |",
                    r.verdict,
                    r.secs,
                    r.field("totals")
                )),
                None => s.push_str(" not run | - |"),
            }
        }
        if let Some(rows) = results.get(&Mode::Managed) {
            match rows.iter().find(|r| &r.name == n) {
                Some(r) => s.push_str(&format!(
                    " {} | {} | {} | {} |",
                    r.num("demoted"),
                    r.num("write_faults"),
                    r.num("promoted"),
                    r.field("anomalies")
                )),
                None => s.push_str(" - | - | - | - |"),
            }
        }
        s.push('\n');
    }
    s
}

/// `cargo xtask selftests [--mode control|managed] [--repeat N] [test...]`
pub fn cmd(args: &[String]) -> Result<()> {
    let mut modes = vec![Mode::Control, Mode::Managed];
    let mut repeat = 1;
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mode" => {
                modes = match it.next().map(String::as_str) {
                    Some("control") => vec![Mode::Control],
                    Some("managed") => vec![Mode::Managed],
                    Some("both") => vec![Mode::Control, Mode::Managed],
                    other => bail!("--mode takes control, managed or both, not {other:?}"),
                }
            }
            "--repeat" => {
                repeat = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .context("--repeat takes a number of runs, at least 1")?;
            }
            "--list" => {
                for t in SELFTESTS {
                    println!(
                        "{}{}: {} {}",
                        t.name,
                        if t.suite { " (suite)" } else { "" },
                        t.bin,
                        t.args.join(" ")
                    );
                }
                println!("left out:");
                for (what, why) in LEFT_OUT {
                    println!("  {what}: {why}");
                }
                return Ok(());
            }
            n if n.starts_with('-') => bail!(
                "unknown option `{n}`; usage: cargo xtask selftests [--mode control|managed|both] \
                 [--repeat N] [--list] [test...]"
            ),
            n => names.push(n.to_string()),
        }
    }
    let tests = select(&names)?;
    let mut results = BTreeMap::new();
    let mut failed = Vec::new();
    let mut failed_tests = 0;
    for m in modes {
        println!(
            "==> mm selftests, {} mode ({} tests)",
            m.name(),
            tests.len()
        );
        let (rows, outcome) = run(m, &tests, repeat)?;
        for r in &rows {
            let ok = matches!(r.verdict.as_str(), "pass" | "skip");
            failed_tests += usize::from(!ok);
            println!(
                "{} {} {}: {} ({:.1} s) {}",
                if ok { "PASS" } else { "FAIL" },
                m.name(),
                r.name,
                r.verdict,
                r.secs,
                r.field("totals")
            );
        }
        if let Outcome::Fail(why) = outcome {
            failed.push(format!("{} mode: {why}", m.name()));
        }
        results.insert(m, rows);
    }
    println!("\n{}", table(&results));
    if failed_tests > 0 {
        failed.push(format!(
            "{failed_tests} test run(s) did not pass (docs/SELFTESTS.md says which differ by design)"
        ));
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

/// For `cargo xtask test`: the suite's tests in managed mode, one boot.
/// A test counts as passed only when it ran and passed: a whole-test skip
/// is a failure here (the suite's tests are chosen to run on this
/// kernel), and the run must have demoted pages and answered write faults
/// (otherwise it proved nothing about the managed node).
pub fn suite() -> (usize, usize) {
    let tests: Vec<&list::Selftest> = SELFTESTS.iter().filter(|t| t.suite).collect();
    let (rows, outcome) = match run(Mode::Managed, &tests, 1) {
        Ok(r) => r,
        Err(e) => {
            println!("FAIL selftests-managed: {e:#}");
            return (0, 1);
        }
    };
    let (mut pass, mut fail) = (0, 0);
    for t in &tests {
        match rows.iter().find(|r| r.name == t.name) {
            Some(r) if r.verdict == "pass" => {
                pass += 1;
                println!(
                    "PASS selftest-managed {} ({:.1}s, {}; {} pages demoted, {} write-fault verdicts)",
                    t.name,
                    r.secs,
                    r.field("totals"),
                    r.num("demoted"),
                    r.num("write_faults")
                );
            }
            Some(r) => {
                fail += 1;
                println!(
                    "FAIL selftest-managed {}: {} ({:.1}s)",
                    t.name, r.verdict, r.secs
                );
            }
            None => {
                fail += 1;
                println!("FAIL selftest-managed {}: no result", t.name);
            }
        }
    }
    let demoted: i64 = rows.iter().map(|r| r.num("demoted")).sum();
    let faults: i64 = rows.iter().map(|r| r.num("write_faults")).sum();
    if demoted > 0 && faults > 0 {
        pass += 1;
        println!(
            "PASS selftests-managed exercised the node: {demoted} pages demoted, {faults} write-fault verdicts"
        );
    } else {
        fail += 1;
        println!(
            "FAIL selftests-managed exercised nothing: {demoted} pages demoted, {faults} write-fault verdicts"
        );
    }
    if let Outcome::Fail(why) = outcome {
        fail += 1;
        println!("FAIL selftests-managed boot: {why}");
    }
    (pass, fail)
}
