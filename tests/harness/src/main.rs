//! `cargo xtask`: the mm-upcall harness.
//!
//! ```text
//! cargo xtask test               fmt, clippy, unit/property/ABI tests, fuzz smoke, checkpatch, series, every VM scenario,
//!                                the mm selftests (managed mode)
//! cargo xtask demo [--debug]     the main job, end to end in the VM
//! cargo xtask vm [--debug] <scenario>...|all   boot the patched kernel once per scenario
//! cargo xtask kernel [--debug]   build (or reuse) the patched kernel (--debug: with DEBUG_VM, lockdep, KASAN)
//! cargo xtask checkpatch         scripts/checkpatch.pl --strict on every patch
//! cargo xtask series             link vmlinux for every prefix of the series (each patch builds on its own)
//! cargo xtask series --objects   compile the series' objects for every prefix (what `xtask test` runs)
//! cargo xtask fuzz [seconds]     run every fuzz target for a while (smoke)
//! cargo xtask sim --seeds N [--from S] [--steps K] | --seed S [--trace]
//!                                the deterministic simulation of mm-server's core (optimized build)
//! cargo xtask selftests [--mode control|managed|both] [--repeat N] [--list] [test...]
//!                                the kernel's mm selftests in the guest, with a demoter
//! ```

#![deny(unsafe_code)]

mod kernel;
mod package;
mod report;
mod selftests;
mod util;
mod vm;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{target_dir, workspace_root};
use crate::vm::{Outcome, Vm};

/// Per-boot limit; TCG is slow, and a hung guest must not hang the suite.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(600);

const USAGE: &str = "usage: cargo xtask <test|demo [--debug]|vm [--debug] <scenario>...|kernel [--debug]|\
                     checkpatch|series [--objects]|package|fuzz [seconds]|bench <name>|\
                     sim --seeds N [--from S] [--steps K]|sim --seed S [--trace]|\
                     selftests [--mode control|managed|both] [--repeat N] [--list] [test...]>";

/// `--debug` selects the debug kernel.
fn flavor(arg: Option<&String>) -> kernel::Flavor {
    if arg.is_some_and(|a| a == "--debug") {
        kernel::Flavor::Debug
    } else {
        kernel::Flavor::Normal
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("kernel") => {
            kernel::ensure_flavor(flavor(args.get(1))).map(|k| println!("{}", k.bzimage.display()))
        }
        Some("vm") => cmd_vm(&args[1..]),
        Some("test") => cmd_test(),
        Some("demo") => cmd_demo(flavor(args.get(1))),
        Some("checkpatch") => cmd_checkpatch(),
        Some("series") => cmd_series(args.get(1).map(String::as_str) == Some("--objects")),
        Some("selftests") => selftests::cmd(&args[1..]),
        Some("fuzz") => cmd_fuzz(args.get(1).map(String::as_str)),
        Some("bench") => cmd_bench(&args[1..]),
        Some("sim") => cmd_sim(&args[1..]),
        Some("package") => package::cmd(),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(anyhow::anyhow!("{USAGE}")),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Build the guest-side binaries the scenarios run (debug, with overflow
/// checks and debug assertions).
fn build_guest() -> Result<PathBuf> {
    build_guest_profile(false)
}

/// Build `mm-guest`; benchmarks use the release build.
fn build_guest_profile(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "-p", "xtask", "--bin", "mm-guest"])
        // The guest runs the real daemon too, mmctl and the C library.
        .args(["-p", "mm-server", "--bin", "mm-server"])
        .args(["-p", "mm-upcall-client", "--bin", "mmctl"])
        .args(["-p", "mm-upcall-client-capi"]);
    if release {
        cmd.arg("--release");
    }
    util::run(&mut cmd).context("cannot build mm-guest")?;
    // `--bin` above selects binaries only: the C library is a lib target.
    let mut lib = Command::new(env!("CARGO"));
    lib.current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "-p",
        "mm-upcall-client-capi",
        "--lib",
    ]);
    if release {
        lib.arg("--release");
    }
    util::run(&mut lib).context("cannot build libmmclient.so")?;
    let dir = target_dir().join(if release { "release" } else { "debug" });
    build_c_example(&dir)?;
    Ok(dir.join("mm-guest"))
}

/// Build the C example of the hint API, `client-lib/examples/hints.c`,
/// as a user would: with the flags `pkg-config` gives for `mmclient`, from
/// a `mmclient.pc` made from `client-lib/capi/mmclient.pc.in` for `dir`
/// (as `dir/mm-hints`, which the `hints` scenario runs); warnings are
/// errors.
fn build_c_example(dir: &std::path::Path) -> Result<()> {
    util::ensure_packages(&["gcc", "pkg-config"])?;
    let root = workspace_root();
    let pc_dir = dir.join("pkgconfig");
    std::fs::create_dir_all(&pc_dir)?;
    let template = std::fs::read_to_string(root.join("client-lib/capi/mmclient.pc.in"))?;
    let pc = template
        .replace("@LIBDIR@", &dir.display().to_string())
        .replace(
            "@INCLUDEDIR@",
            &root.join("client-lib/capi/include").display().to_string(),
        )
        .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
    std::fs::write(pc_dir.join("mmclient.pc"), pc)?;
    let flags = util::output(
        Command::new("pkg-config")
            .args(["--cflags", "--libs", "mmclient"])
            .env("PKG_CONFIG_PATH", &pc_dir),
    )
    .context("pkg-config --cflags --libs mmclient")?;
    // The library's SONAME, which the example is linked against.
    let soname = dir.join("libmmclient.so.0");
    let _ = std::fs::remove_file(&soname);
    std::os::unix::fs::symlink("libmmclient.so", &soname)?;
    let mut cc = Command::new("cc");
    cc.args(["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-O2", "-o"])
        .arg(dir.join("mm-hints"))
        .arg(root.join("client-lib/examples/hints.c"))
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", dir.display()));
    util::run(&mut cc).context("cannot build the C example client-lib/examples/hints.c")
}

/// The scenarios `mm-guest` knows, in the order `xtask test` runs them.
fn scenarios(guest_bin: &std::path::Path) -> Result<Vec<String>> {
    let list = util::output(Command::new(guest_bin).arg("--list"))?;
    Ok(list.lines().map(str::to_string).collect())
}

/// Run scenarios, one boot each; print PASS/FAIL lines; return the counts.
/// `None` runs every scenario.
fn run_scenarios(names: Option<&[String]>) -> Result<(usize, usize)> {
    run_scenarios_on(kernel::Flavor::Normal, names)
}

/// [`run_scenarios`] on either kernel; on the debug kernel the lines say
/// `PASS --debug <scenario>` and a boot may take twice as long.
fn run_scenarios_on(flavor: kernel::Flavor, names: Option<&[String]>) -> Result<(usize, usize)> {
    let guest_bin = build_guest()?;
    let known = scenarios(&guest_bin)?;
    let names = names.unwrap_or(&known);
    for n in names {
        if !known.contains(n) {
            bail!("unknown scenario `{n}` (known: {})", known.join(", "));
        }
    }
    // `service` runs mm-server from the package's tree; without it, that
    // scenario fails and the others run.
    let no_package = if names.iter().any(|n| n == "service") {
        package::build().err()
    } else {
        None
    };
    let kernel = kernel::ensure_flavor(flavor)?;
    let selftest = kernel::build_selftest(&kernel.tree)?;
    let env = format!("MM_SELFTEST={}", selftest.display());
    let debug = flavor == kernel::Flavor::Debug;
    let vm = Vm {
        bzimage: &kernel.bzimage,
        guest_bin,
        timeout: if debug {
            2 * SCENARIO_TIMEOUT
        } else {
            SCENARIO_TIMEOUT
        },
        append: if debug { vm::DEBUG_APPEND } else { "" },
    };
    let tag = if debug { "--debug " } else { "" };
    let (mut pass, mut fail) = (0, 0);
    for name in names {
        if let (Some(e), "service") = (&no_package, name.as_str()) {
            fail += 1;
            println!("FAIL {tag}{name}: the packages it runs were not built: {e:#}");
            continue;
        }
        let t = Instant::now();
        match vm.run(name, &env)? {
            Outcome::Pass => {
                pass += 1;
                println!("PASS {tag}{name} ({:.1}s)", t.elapsed().as_secs_f64());
            }
            Outcome::Fail(why) => {
                fail += 1;
                println!("FAIL {tag}{name}: {why}");
            }
        }
    }
    Ok((pass, fail))
}

fn cmd_vm(args: &[String]) -> Result<()> {
    let flavor = flavor(args.first());
    let names = if flavor == kernel::Flavor::Debug {
        &args[1..]
    } else {
        args
    };
    if names.is_empty() {
        let known = scenarios(&build_guest()?)?;
        bail!("name at least one scenario: {}", known.join(", "));
    }
    // `all`: every scenario `xtask test` runs.
    let names = (names != ["all"]).then_some(names);
    let (_, fail) = run_scenarios_on(flavor, names)?;
    if fail > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// VM benchmarks: each is a guest program `bench-<name>` that prints its
/// results as lines starting with `BENCH `.
const BENCHES: &[&str] = &["upcall", "fault", "anon"];

fn cmd_bench(names: &[String]) -> Result<()> {
    if names.is_empty() {
        bail!("name a benchmark: {}", BENCHES.join(", "));
    }
    let kernel = kernel::ensure()?;
    let vm = Vm {
        bzimage: &kernel.bzimage,
        guest_bin: build_guest_profile(true)?,
        timeout: SCENARIO_TIMEOUT,
        append: "",
    };
    for name in names {
        if !BENCHES.contains(&name.as_str()) {
            bail!("unknown benchmark `{name}` (known: {})", BENCHES.join(", "));
        }
        let lines = bench_lines(&vm, &format!("bench-{name}"))?;
        if name == "anon" {
            // The unattached overhead: the same fault loop on the same
            // configuration built without the series, boots alternating.
            let base_image = kernel::ensure_base()?;
            let base_vm = Vm {
                bzimage: &base_image,
                guest_bin: vm.guest_bin.clone(),
                timeout: vm.timeout,
                append: "",
            };
            let ns = |lines: &[String]| -> Option<f64> {
                let l = lines.iter().find(|l| l.starts_with("anon:"))?;
                l[..l.find(" ns/fault")?].rsplit(' ').next()?.parse().ok()
            };
            let (mut patched, mut base) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                base.extend(ns(&bench_lines(&base_vm, "bench-anon")?));
                patched.extend(ns(&bench_lines(&vm, "bench-anon")?));
            }
            patched.extend(ns(&lines));
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            if !patched.is_empty() && !base.is_empty() {
                println!(
                    "anon fault, nothing attached: patched {patched:.0?} ns, without the series {base:.0?} ns; \
                     medians {:.0} vs {:.0} ns, ratio {:.3}",
                    median(&mut patched),
                    median(&mut base),
                    median(&mut patched) / median(&mut base)
                );
            }
        }
    }
    Ok(())
}

/// Run one benchmark program in a VM; print and return its `BENCH` lines.
fn bench_lines(vm: &Vm<'_>, scenario: &str) -> Result<Vec<String>> {
    let outcome = vm.run(scenario, "")?;
    let console = target_dir().join("vm").join(scenario).join("console.log");
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let lines: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("BENCH "))
        .map(str::to_string)
        .collect();
    for l in &lines {
        println!("{l}");
    }
    if let Outcome::Fail(why) = outcome {
        bail!("benchmark {scenario} failed: {why}");
    }
    Ok(lines)
}

fn cmd_demo(flavor: kernel::Flavor) -> Result<()> {
    let kernel = kernel::ensure_flavor(flavor)?;
    let debug = flavor == kernel::Flavor::Debug;
    let vm = Vm {
        bzimage: &kernel.bzimage,
        guest_bin: build_guest()?,
        timeout: if debug {
            2 * SCENARIO_TIMEOUT
        } else {
            SCENARIO_TIMEOUT
        },
        append: if debug { vm::DEBUG_APPEND } else { "" },
    };
    println!("demo: booting the patched kernel (QEMU TCG, two-tier NUMA topology)");
    let outcome = vm.run("demo", "")?;
    let console = target_dir().join("vm/demo/console.log");
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    for l in text.lines().filter(|l| {
        [
            "online nodes",
            "node 0:",
            "node 1:",
            "memory_tier",
            "kernel: Demotion",
            "demo: ",
        ]
        .iter()
        .any(|p| l.starts_with(p))
    }) {
        println!("  {l}");
    }
    match outcome {
        Outcome::Pass => {
            let report = report::write(&console, &target_dir().join("demo"))?;
            println!("demo: report with charts: {}", report.display());
            Ok(())
        }
        Outcome::Fail(why) => bail!("demo failed: {why}"),
    }
}

fn cmd_series(objects: bool) -> Result<()> {
    let depth = if objects {
        kernel::Depth::Objects
    } else {
        kernel::Depth::Vmlinux
    };
    kernel::ensure()?;
    let results = kernel::series_check(depth)?;
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    let what = if objects {
        "compiles-alone"
    } else {
        "builds-alone"
    };
    for (name, ok) in &results {
        println!("{} {what} {name}", if *ok { "PASS" } else { "FAIL" });
    }
    println!("{} passed, {failed} failed", results.len() - failed);
    if failed > 0 {
        bail!("{failed} patch(es) do not build on their own; see target/kernel/series.log");
    }
    Ok(())
}

fn cmd_checkpatch() -> Result<()> {
    let (_, fail) = checkpatch()?;
    if fail > 0 {
        bail!("{fail} patch(es) not clean under checkpatch.pl --strict");
    }
    Ok(())
}

/// `scripts/checkpatch.pl --strict` on every patch of the series.
fn checkpatch() -> Result<(usize, usize)> {
    let kernel = kernel::ensure()?;
    let series = kernel::Series::load()?;
    let (mut pass, mut fail) = (0, 0);
    for p in &series.patches {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let out = Command::new(kernel.tree.join("scripts/checkpatch.pl"))
            .current_dir(&kernel.tree)
            .args(["--strict", "--no-tree", "--show-types"])
            .arg(p)
            .output()
            .context("cannot run checkpatch.pl")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("total: 0 errors, 0 warnings, 0 checks") {
            pass += 1;
            println!("PASS checkpatch {name}");
        } else {
            fail += 1;
            println!("FAIL checkpatch {name}:\n{text}");
        }
    }
    Ok((pass, fail))
}

/// Run a cargo step and count it as one check.
fn step(name: &str, args: &[&str]) -> bool {
    step_env(name, args, &[])
}

/// [`step`] with environment variables set.
fn step_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> bool {
    println!("==> {name}");
    let ok = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(args)
        .envs(env.iter().copied())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    println!("{} {name}", if ok { "PASS" } else { "FAIL" });
    ok
}

/// The fuzz targets (`fuzz/`, their own workspace): built with the stable
/// toolchain (no coverage instrumentation: `cargo fuzz` on nightly does
/// the real fuzzing) and each run over its seed corpus plus 100,000
/// random inputs, so that they keep building and their canonical-encoding
/// assertions hold.  Returns (passed, failed), one per target.
fn fuzz_smoke() -> (usize, usize) {
    println!("==> fuzz targets (build, seeds and a short random run)");
    // libfuzzer-sys compiles libFuzzer, which is C++.
    if let Err(e) = util::ensure_packages(&["g++"]) {
        println!("FAIL fuzz-build: {e:#}");
        return (0, 1);
    }
    let root = workspace_root();
    let built = Command::new(env!("CARGO"))
        .current_dir(root.join("fuzz"))
        .args(["build", "--quiet"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !built {
        println!("FAIL fuzz-build");
        return (0, 1);
    }
    let targets = [
        "upcall_desc",
        "io_cmd",
        "control_cmd",
        "event_batch",
        "socket_frame",
        "kernel_replies",
    ];
    let (mut pass, mut fail) = (0, 0);
    for t in targets {
        // libFuzzer adds what it finds to the first corpus directory: a
        // scratch one, so that the committed seeds stay as they are.
        let scratch = util::target_dir().join("fuzz-corpus").join(t);
        let _ = std::fs::remove_dir_all(&scratch);
        let _ = std::fs::create_dir_all(&scratch);
        let seeds = root.join("fuzz/seeds").join(t);
        let mut cmd = Command::new(root.join("fuzz/target/debug").join(t));
        cmd.arg("-runs=100000").arg(&scratch);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        let out = cmd.current_dir(&scratch).stdin(Stdio::null()).output();
        let ok = out.as_ref().is_ok_and(|o| o.status.success());
        // libFuzzer's last word: "Done 100024 runs in 3 second(s)".
        let runs = out
            .as_ref()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .find_map(|l| l.strip_prefix("Done ").map(str::to_string))
            })
            .unwrap_or_default();
        println!(
            "{} fuzz-smoke {t}{}",
            if ok { "PASS" } else { "FAIL" },
            if runs.is_empty() {
                String::new()
            } else {
                format!(" ({runs})")
            }
        );
        if ok {
            pass += 1;
        } else {
            println!(
                "  reproduce: cd fuzz && cargo build && ./target/debug/{t} -runs=100000 seeds/{t}"
            );
            fail += 1;
        }
    }
    (pass, fail)
}

/// Run the unit/property/ABI tests with nextest and return its counts.
fn nextest() -> Result<(usize, usize)> {
    println!("==> unit, property and ABI tests (cargo nextest)");
    ensure_cargo_tool("nextest", "cargo-nextest")?;
    let mut child = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args([
            "nextest",
            "run",
            "--workspace",
            "--no-fail-fast",
            "--color",
            "never",
        ])
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run cargo nextest (install cargo-nextest)")?;
    let mut counts = None;
    for line in BufReader::new(child.stderr.take().context("no stderr")?).lines() {
        let line = line?;
        eprintln!("{line}");
        if line.trim_start().starts_with("Summary") {
            let num = |word: &str| {
                let toks: Vec<&str> = line.split([' ', ',']).filter(|t| !t.is_empty()).collect();
                toks.windows(2)
                    .find(|w| w[1] == word)
                    .and_then(|w| w[0].parse::<usize>().ok())
                    .unwrap_or(0)
            };
            counts = Some((num("passed"), num("failed") + num("timed")));
        }
    }
    let status = child.wait()?;
    match counts {
        Some((p, f)) if status.success() || f > 0 => Ok((p, f)),
        // Build failure or a crash before the summary: one failure.
        _ => Ok((0, 1)),
    }
}

fn cmd_test() -> Result<()> {
    if let Some(image) = std::env::var_os("MM_UPCALL_BZIMAGE") {
        bail!(
            "MM_UPCALL_BZIMAGE={} is set: `cargo xtask test` proves the series in \
             kernel-upcall/linux/patches and boots the kernel built from it; unset it \
             (use `cargo xtask vm` to try another image)",
            image.to_string_lossy()
        );
    }
    let start = Instant::now();
    let (mut pass, mut fail) = (0usize, 0usize);
    let mut tally = |ok: bool| if ok { pass += 1 } else { fail += 1 };
    tally(step("rustfmt", &["fmt", "--all", "--check"]));
    tally(step(
        "clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ],
    ));
    tally(step_env(
        "rustdoc",
        &["doc", "--workspace", "--no-deps", "--quiet"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    ));
    let (p, f) = nextest()?;
    pass += p;
    fail += f;
    let (p, f) = fuzz_smoke();
    pass += p;
    fail += f;
    let (p, f) = package::check();
    pass += p;
    fail += f;
    println!("==> kernel patches (checkpatch.pl --strict)");
    match checkpatch() {
        Ok((p, f)) => {
            pass += p;
            fail += f;
        }
        Err(e) => {
            println!("FAIL checkpatch: {e:#}");
            fail += 1;
        }
    }
    println!(
        "==> every patch compiles on its own (series prefixes; `cargo xtask series` links each)"
    );
    // Build and cache the whole series first: the prefix builds then go
    // down from it, and the VM scenarios boot the cached image.
    match kernel::ensure().and_then(|_| kernel::series_check(kernel::Depth::Objects)) {
        Ok(results) => {
            for (name, ok) in results {
                println!("{} compiles-alone {name}", if ok { "PASS" } else { "FAIL" });
                if ok {
                    pass += 1;
                } else {
                    fail += 1;
                }
            }
        }
        Err(e) => {
            println!("FAIL series: {e:#}");
            fail += 1;
        }
    }
    println!("==> VM scenarios (QEMU TCG, two-tier NUMA)");
    match run_scenarios(None) {
        Ok((p, f)) => {
            pass += p;
            fail += f;
        }
        Err(e) => {
            println!("FAIL vm: {e:#}");
            fail += 1;
        }
    }
    println!("==> the kernel's mm selftests, managed mode (cargo xtask selftests --mode managed)");
    let (p, f) = selftests::suite();
    pass += p;
    fail += f;
    println!("suite took {:.0}s", start.elapsed().as_secs_f64());
    println!("{pass} passed, {fail} failed");
    if fail > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// `cargo xtask sim ...`: the simulator, optimized (`mm-sim`'s own
/// arguments).
fn cmd_sim(args: &[String]) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["run", "--quiet", "--release", "-p", "mm-sim", "--"])
        .args(args)
        .status()
        .context("cannot run mm-sim")?;
    if !status.success() {
        bail!("the simulation failed (the seed and the command that replays it are above)");
    }
    Ok(())
}

/// Install a cargo subcommand from crates.io when it is missing.
fn ensure_cargo_tool(sub: &str, krate: &str) -> Result<()> {
    let have = Command::new(env!("CARGO"))
        .args([sub, "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        eprintln!("xtask: installing {krate}");
        util::run(Command::new(env!("CARGO")).args(["install", "--locked", krate]))?;
    }
    Ok(())
}

fn cmd_fuzz(secs: Option<&str>) -> Result<()> {
    let secs: u64 = secs
        .unwrap_or("30")
        .parse()
        .context("seconds must be a number")?;
    ensure_cargo_tool("fuzz", "cargo-fuzz")?;
    let dir = workspace_root().join("fuzz");
    let list = util::output(
        Command::new(env!("CARGO"))
            .current_dir(&dir)
            .args(["fuzz", "list"]),
    )?;
    for target in list.lines().map(str::trim).filter(|t| !t.is_empty()) {
        println!("==> fuzz {target} ({secs}s)");
        // Its working corpus first (libFuzzer adds to it), then the
        // committed seeds (valid encodings; see proto's roundtrip tests).
        let corpus = format!("corpus/{target}");
        std::fs::create_dir_all(dir.join(&corpus))?;
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(&dir)
            .args(["fuzz", "run", "--sanitizer", "none", target, &corpus]);
        if dir.join("seeds").join(target).is_dir() {
            cmd.arg(format!("seeds/{target}"));
        }
        util::run(
            cmd.arg("--")
                .arg(format!("-max_total_time={secs}"))
                .arg("-print_final_stats=1"),
        )?;
    }
    Ok(())
}
