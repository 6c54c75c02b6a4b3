//! `cargo xtask package`: the Debian packages of mm-upcall, and the
//! suite's checks of them.
//!
//! Three binary packages, as Debian splits a daemon and a library:
//! `mm-upcall` (`mm-server` with its systemd unit, and the sysusers,
//! tmpfiles and sysctl files that create its socket's group, turn
//! demotion on and NUMA balancing with memory tiering,
//! `mmctl`, their man pages and completions, generated from the CLI
//! definitions, and `mm-server.example.toml` as the conffile
//! `/etc/mm-server.toml`, its client socket open to the group
//! `mm-upcall`), `libmmclient0` (`libmmclient.so.0`) and `libmmclient-dev`
//! (header, development link, pkg-config file).  The trees are laid out by
//! hand from a release build and packed with `dpkg-deb`; `dpkg-shlibdeps`
//! computes the dependencies.  The control data is in `packaging/debian/`.
//! (cargo-deb builds one package per crate from its manifest; it would
//! have to be built and installed on every fresh machine, and a library
//! split across two packages is not its model.)

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::util::{self, target_dir, workspace_root};

/// `systemd-analyze security --threshold` for the unit, in tenths (40: an
/// exposure level of 4.0).
const EXPOSURE_THRESHOLD: u32 = 40;

/// The C library's file name: its SONAME.
const SONAME: &str = "libmmclient.so.0";
/// Where the Debian multiarch libraries go on amd64.
const LIBDIR: &str = "usr/lib/x86_64-linux-gnu";

/// The packages, and the files of each with their modes.
const PACKAGES: &[(&str, &[(&str, u32)])] = &[
    (
        "mm-upcall",
        &[
            ("usr/sbin/mm-server", 0o755),
            ("usr/bin/mmctl", 0o755),
            ("usr/lib/systemd/system/mm-server.service", 0o644),
            ("usr/lib/sysusers.d/mm-upcall.conf", 0o644),
            ("usr/lib/tmpfiles.d/mm-upcall.conf", 0o644),
            ("usr/lib/sysctl.d/50-mm-upcall.conf", 0o644),
            ("etc/mm-server.toml", 0o644),
            ("usr/share/man/man8/mm-server.8.gz", 0o644),
            ("usr/share/man/man1/mmctl.1.gz", 0o644),
            ("usr/share/bash-completion/completions/mmctl", 0o644),
            ("usr/share/zsh/vendor-completions/_mmctl", 0o644),
            ("usr/share/fish/vendor_completions.d/mmctl.fish", 0o644),
            ("usr/share/doc/mm-upcall/README.md.gz", 0o644),
            ("usr/share/doc/mm-upcall/copyright", 0o644),
            ("usr/share/doc/mm-upcall/changelog.gz", 0o644),
        ],
    ),
    (
        "libmmclient0",
        &[
            ("usr/lib/x86_64-linux-gnu/libmmclient.so.0", 0o644),
            ("usr/share/doc/libmmclient0/copyright", 0o644),
            ("usr/share/doc/libmmclient0/changelog.gz", 0o644),
        ],
    ),
    (
        "libmmclient-dev",
        &[
            ("usr/include/mm_client.h", 0o644),
            ("usr/lib/x86_64-linux-gnu/pkgconfig/mmclient.pc", 0o644),
            ("usr/share/doc/libmmclient-dev/copyright", 0o644),
            ("usr/share/doc/libmmclient-dev/changelog.gz", 0o644),
        ],
    ),
];

/// The built packages.
pub struct Packages {
    /// Each package's name and `.deb`.
    pub debs: Vec<(&'static str, PathBuf)>,
    /// The trees they were built from, one per package, under this.
    pub out: PathBuf,
    pub version: &'static str,
    pub arch: String,
}

impl Packages {
    fn tree(&self, name: &str) -> PathBuf {
        self.out
            .join(format!("{name}_{}_{}", self.version, self.arch))
    }

    fn deb(&self, name: &str) -> &Path {
        &self
            .debs
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a package")
            .1
    }
}

/// `cargo xtask package`: build the packages and check them as the suite
/// does.
pub fn cmd() -> Result<()> {
    let (pass, fail) = check();
    println!("{pass} passed, {fail} failed");
    ensure!(fail == 0, "the packages failed {fail} check(s)");
    Ok(())
}

fn arch() -> Result<String> {
    Ok(
        util::output(Command::new("dpkg").arg("--print-architecture"))?
            .trim()
            .to_string(),
    )
}

/// The package a file belongs to, and its mode.
fn owner(rel: &str) -> Result<(&'static str, u32)> {
    PACKAGES
        .iter()
        .find_map(|(name, files)| {
            files
                .iter()
                .find(|(p, _)| *p == rel)
                .map(|&(_, mode)| (*name, mode))
        })
        .with_context(|| format!("{rel} is in no package's layout"))
}

/// Build the release binaries and the packages.
pub fn build() -> Result<Packages> {
    util::ensure_packages(&["dpkg-dev", "binutils"])?;
    let arch = arch()?;
    ensure!(
        arch == "amd64",
        "the packages are laid out for amd64 ({LIBDIR}); this machine is {arch}"
    );
    let src = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let packaging = src.join("packaging");
    let changelog = packaging.join("debian/changelog");
    let logged = util::output(
        Command::new("dpkg-parsechangelog")
            .arg("-l")
            .arg(&changelog)
            .args(["-S", "Version"]),
    )?;
    ensure!(
        logged.trim() == version,
        "packaging/debian/changelog is at {} but the workspace at {version}: add an entry",
        logged.trim()
    );
    for args in [
        &[
            "-p",
            "mm-server",
            "--bin",
            "mm-server",
            "-p",
            "mm-upcall-client",
            "--bin",
            "mmctl",
        ][..],
        &["-p", "mm-upcall-client-capi", "--lib"][..],
    ] {
        util::run(
            Command::new(env!("CARGO"))
                .current_dir(&src)
                .args(["build", "--quiet", "--release"])
                .args(args),
        )
        .context("cannot build the release binaries")?;
    }
    let release = target_dir().join("release");
    let out = target_dir().join("package");
    let _ = fs::remove_dir_all(&out);
    let pkgs = Packages {
        debs: Vec::new(),
        out,
        version,
        arch,
    };
    let put = |rel: &str, bytes: &[u8]| -> Result<PathBuf> {
        let (name, mode) = owner(rel)?;
        let path = pkgs.tree(name).join(rel);
        fs::create_dir_all(path.parent().expect("a path in a package"))?;
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(path)
    };
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));

    let server = put("usr/sbin/mm-server", &read(&release.join("mm-server"))?)?;
    let mmctl = put("usr/bin/mmctl", &read(&release.join("mmctl"))?)?;
    let lib = put(
        &format!("{LIBDIR}/{SONAME}"),
        &read(&release.join("libmmclient.so"))?,
    )?;
    for f in [&server, &mmctl, &lib] {
        util::run(
            Command::new("strip")
                .args(["--strip-unneeded", "--remove-section=.comment"])
                .arg(f),
        )?;
    }
    let dev = pkgs.tree("libmmclient-dev").join(LIBDIR);
    fs::create_dir_all(&dev)?;
    // The development link: -lmmclient finds the library by this name.
    std::os::unix::fs::symlink(SONAME, dev.join("libmmclient.so"))?;
    put(
        "usr/include/mm_client.h",
        &read(&src.join("client-lib/capi/include/mm_client.h"))?,
    )?;
    let pc = fs::read_to_string(src.join("client-lib/capi/mmclient.pc.in"))?
        .replace("@LIBDIR@", &format!("/{LIBDIR}"))
        .replace("@INCLUDEDIR@", "/usr/include")
        .replace("@VERSION@", version);
    put(&format!("{LIBDIR}/pkgconfig/mmclient.pc"), pc.as_bytes())?;

    put(
        "usr/lib/systemd/system/mm-server.service",
        &read(&packaging.join("mm-server.service"))?,
    )?;
    put(
        "usr/lib/sysusers.d/mm-upcall.conf",
        &read(&packaging.join("mm-upcall.sysusers"))?,
    )?;
    put(
        "usr/lib/tmpfiles.d/mm-upcall.conf",
        &read(&packaging.join("mm-upcall.tmpfiles"))?,
    )?;
    put(
        "usr/lib/sysctl.d/50-mm-upcall.conf",
        &read(&packaging.join("mm-upcall.sysctl"))?,
    )?;
    put("etc/mm-server.toml", config(&src)?.as_bytes())?;
    let run_bin = |bin: &Path, args: &[&str]| -> Result<Vec<u8>> {
        let o = Command::new(bin)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        ensure!(
            o.status.success(),
            "{} {}: {}",
            bin.display(),
            args.join(" "),
            o.status
        );
        Ok(o.stdout)
    };
    put(
        "usr/share/man/man8/mm-server.8.gz",
        &gzip(&run_bin(&server, &["man"])?)?,
    )?;
    put(
        "usr/share/man/man1/mmctl.1.gz",
        &gzip(&run_bin(&mmctl, &["man"])?)?,
    )?;
    for (shell, rel) in [
        ("bash", "usr/share/bash-completion/completions/mmctl"),
        ("zsh", "usr/share/zsh/vendor-completions/_mmctl"),
        ("fish", "usr/share/fish/vendor_completions.d/mmctl.fish"),
    ] {
        put(rel, &run_bin(&mmctl, &["completions", shell])?)?;
    }
    put(
        "usr/share/doc/mm-upcall/README.md.gz",
        &gzip(&read(&src.join("README.md"))?)?,
    )?;
    let copyright = read(&packaging.join("debian/copyright"))?;
    let changes = gzip(&read(&changelog)?)?;
    for (name, _) in PACKAGES {
        put(&format!("usr/share/doc/{name}/copyright"), &copyright)?;
        put(&format!("usr/share/doc/{name}/changelog.gz"), &changes)?;
    }

    let control = fs::read_to_string(packaging.join("debian/control"))?;
    // The same minimum version as the symbols file's.
    let shlibs = format!("libmmclient 0 libmmclient0 (>= {version})\n");
    let mut debs = Vec::new();
    for (name, _) in PACKAGES {
        let tree = pkgs.tree(name);
        let debian = tree.join("DEBIAN");
        fs::create_dir_all(&debian)?;
        let stanza = control
            .split("\n\n")
            .find(|st| st.starts_with(&format!("Package: {name}\n")))
            .with_context(|| format!("packaging/debian/control has no {name}"))?;
        let mut fields = stanza.replace("@VERSION@", version);
        if fields.contains("@SHLIBS@") {
            fields = fields.replace("@SHLIBS@", &depends(&tree)?);
        }
        // Version and the rest go after Package, as dpkg-gencontrol writes.
        let (first, rest) = fields.split_once('\n').expect("a Package line");
        let fields = format!(
            "{first}\nVersion: {version}\nArchitecture: {}\nMaintainer: {}\nInstalled-Size: {}\n{}\n",
            pkgs.arch,
            maintainer(&changelog)?,
            installed_kib(&tree)?,
            rest.trim_end()
        );
        fs::write(debian.join("control"), fields)?;
        let md5 = util::output(
            Command::new("sh")
                .current_dir(&tree)
                .args(["-c", "find . -path ./DEBIAN -prune -o -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 md5sum"]),
        )?;
        fs::write(debian.join("md5sums"), md5)?;
        for script in ["postinst", "prerm", "postrm", "triggers"] {
            let from = packaging.join(format!("debian/{name}.{script}"));
            if from.exists() {
                fs::copy(&from, debian.join(script))?;
                let mode = if script == "triggers" { 0o644 } else { 0o755 };
                fs::set_permissions(debian.join(script), fs::Permissions::from_mode(mode))?;
            }
        }
        if tree.join("etc").exists() {
            fs::write(debian.join("conffiles"), "/etc/mm-server.toml\n")?;
        }
        if *name == "libmmclient0" {
            fs::write(debian.join("shlibs"), &shlibs)?;
            symbols(&tree)?;
        }
        let deb = pkgs.out.join(format!("{name}_{version}_{}.deb", pkgs.arch));
        util::run(
            Command::new("dpkg-deb")
                .args(["--root-owner-group", "-Zxz", "--build"])
                .arg(&tree)
                .arg(&deb),
        )
        .with_context(|| format!("dpkg-deb --build {name}"))?;
        debs.push((*name, deb));
    }
    Ok(Packages { debs, ..pkgs })
}

/// The maintainer named by the changelog's latest entry.
fn maintainer(changelog: &Path) -> Result<String> {
    Ok(util::output(
        Command::new("dpkg-parsechangelog")
            .arg("-l")
            .arg(changelog)
            .args(["-S", "Maintainer"]),
    )?
    .trim()
    .to_string())
}

/// The example configuration, with the client socket open to the group
/// the package creates.
fn config(root: &Path) -> Result<String> {
    let example = fs::read_to_string(root.join("mm-server/mm-server.example.toml"))?;
    let commented = "# client_group = \"mm-upcall\"";
    ensure!(
        example.contains(commented),
        "mm-server.example.toml has no `{commented}` line to turn on"
    );
    Ok(example.replacen(commented, "client_group = \"mm-upcall\"", 1))
}

/// `gzip -9n`: reproducible (no name, no time stamp).
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run gzip")?;
    child.stdin.take().expect("piped stdin").write_all(bytes)?;
    let o = child.wait_with_output()?;
    ensure!(o.status.success(), "gzip: {}", o.status);
    Ok(o.stdout)
}

/// A package's installed size in KiB, as `dpkg-gencontrol` counts it.
fn installed_kib(root: &Path) -> Result<u64> {
    let mut kib = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                if e.file_name() != "DEBIAN" {
                    dirs.push(e.path());
                }
                kib += 1;
            } else {
                kib += e.metadata()?.len().div_ceil(1024).max(1);
            }
        }
    }
    Ok(kib)
}

/// A directory where the dpkg tools find the `debian/control` and
/// `debian/changelog` of a source package, as they want to.
fn debian_work() -> Result<PathBuf> {
    let work = target_dir().join("package/work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("debian"))?;
    let mut control = String::from("Source: mm-upcall\n");
    for (name, _) in PACKAGES {
        control.push_str(&format!("\nPackage: {name}\nArchitecture: any\n"));
    }
    fs::write(work.join("debian/control"), control)?;
    fs::copy(
        workspace_root().join("packaging/debian/changelog"),
        work.join("debian/changelog"),
    )?;
    Ok(work)
}

/// The library's symbols file, from `dpkg-gensymbols`: it fails when the
/// exported symbols differ from `packaging/debian/libmmclient0.symbols`
/// (a symbol added or lost is an ABI change to record there).
fn symbols(tree: &Path) -> Result<()> {
    let reference = workspace_root().join("packaging/debian/libmmclient0.symbols");
    let o = Command::new("dpkg-gensymbols")
        .current_dir(debian_work()?)
        .args(["-c4", "-plibmmclient0"])
        .arg(format!("-v{}", env!("CARGO_PKG_VERSION")))
        .arg(format!("-e{}", tree.join(LIBDIR).join(SONAME).display()))
        .arg(format!("-I{}", reference.display()))
        .arg(format!("-O{}", tree.join("DEBIAN/symbols").display()))
        .output()
        .context("cannot run dpkg-gensymbols")?;
    ensure!(
        o.status.success(),
        "libmmclient's exported symbols differ from {}: {}{}",
        reference.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// `Depends:` from `dpkg-shlibdeps` over a package's ELF files.
fn depends(tree: &Path) -> Result<String> {
    let work = debian_work()?;
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.current_dir(&work).arg("-O");
    for f in [
        "usr/sbin/mm-server",
        "usr/bin/mmctl",
        &format!("{LIBDIR}/{SONAME}"),
    ] {
        let path = tree.join(f);
        if path.exists() {
            cmd.arg(format!("-e{}", path.display()));
        }
    }
    let out = util::output(&mut cmd).context("dpkg-shlibdeps")?;
    let deps = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {out}"))?;
    Ok(deps.trim().to_string())
}

/// The suite's checks of the packages; each prints PASS or FAIL.  Returns
/// (passed, failed).
pub fn check() -> (usize, usize) {
    println!("==> the Debian packages (cargo xtask package)");
    let (mut pass, mut fail) = (0, 0);
    let p = match build() {
        Ok(p) => {
            println!(
                "PASS package-build ({})",
                p.debs
                    .iter()
                    .map(|(_, d)| d.file_name().unwrap_or_default().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            pass += 1;
            p
        }
        Err(e) => {
            println!("FAIL package-build: {e:#}");
            return (0, 1);
        }
    };
    for (name, r) in [
        ("package-contents", contents(&p)),
        ("package-unit", unit(&p)),
        ("package-lintian", lintian(&p)),
    ] {
        match r {
            Ok(what) => {
                println!("PASS {name}: {what}");
                pass += 1;
            }
            Err(e) => {
                println!("FAIL {name}: {e:#}");
                fail += 1;
            }
        }
    }
    (pass, fail)
}

/// What `dpkg-deb` put in each package is its layout, owned by root; the
/// library carries its SONAME; the extracted binaries run; the conffile
/// opens the client socket to the package's group.
fn contents(p: &Packages) -> Result<String> {
    let mut files = 0;
    for (name, layout) in PACKAGES {
        let list = util::output(Command::new("dpkg-deb").arg("--contents").arg(p.deb(name)))?;
        for (path, mode) in *layout {
            let line = list
                .lines()
                .find(|l| l.ends_with(&format!("./{path}")))
                .with_context(|| format!("{name} has no /{path}"))?;
            let want = format!("-{}", unix_mode(*mode));
            ensure!(
                line.starts_with(&want) && line.contains("root/root"),
                "{name}: /{path}: {line} (want {want}, root/root)"
            );
            files += 1;
        }
    }
    let dev = util::output(
        Command::new("dpkg-deb")
            .arg("--contents")
            .arg(p.deb("libmmclient-dev")),
    )?;
    ensure!(
        dev.lines()
            .any(|l| l.ends_with(&format!("./{LIBDIR}/libmmclient.so -> {SONAME}"))),
        "libmmclient-dev has no libmmclient.so -> {SONAME} link"
    );
    let dynamic = util::output(
        Command::new("readelf")
            .arg("-d")
            .arg(p.tree("libmmclient0").join(LIBDIR).join(SONAME)),
    )?;
    ensure!(
        dynamic.contains(&format!("Library soname: [{SONAME}]")),
        "libmmclient's SONAME is not {SONAME}"
    );
    let extracted = p.out.join("extracted");
    util::run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(p.deb("mm-upcall"))
            .arg(&extracted),
    )?;
    for bin in ["usr/bin/mmctl", "usr/sbin/mm-server"] {
        let v = util::output(Command::new(extracted.join(bin)).arg("--version"))?;
        ensure!(
            v.contains(p.version),
            "{bin} --version: {v} (want {})",
            p.version
        );
    }
    let config = fs::read_to_string(extracted.join("etc/mm-server.toml"))?;
    let parsed: toml::Table = config.parse().context("/etc/mm-server.toml")?;
    ensure!(
        parsed
            .get("server")
            .and_then(|s| s.get("client_group"))
            .and_then(|g| g.as_str())
            == Some("mm-upcall"),
        "/etc/mm-server.toml does not open the client socket to the group mm-upcall"
    );
    let depends = util::output(
        Command::new("dpkg-deb")
            .arg("--field")
            .arg(p.deb("mm-upcall"))
            .arg("Depends"),
    )?;
    Ok(format!(
        "{files} files in {} packages as laid out, {SONAME} with its SONAME, mm-upcall \
         Depends: {}",
        PACKAGES.len(),
        depends.trim()
    ))
}

fn unix_mode(mode: u32) -> String {
    (0..9)
        .map(|i| {
            if mode & (1 << (8 - i)) == 0 {
                '-'
            } else {
                ['r', 'w', 'x'][i % 3]
            }
        })
        .collect()
}

/// `systemd-analyze verify` of the unit (its commands pointed at the
/// package's tree, where they exist), and its exposure score.
fn unit(p: &Packages) -> Result<String> {
    util::ensure_packages(&["systemd"])?;
    let tree = p.tree("mm-upcall");
    let text = fs::read_to_string(tree.join("usr/lib/systemd/system/mm-server.service"))?;
    let dir = p.out.join("unit");
    fs::create_dir_all(&dir)?;
    let unit = dir.join("mm-server.service");
    let server = tree.join("usr/sbin/mm-server");
    ensure!(
        text.contains("=/usr/sbin/mm-server "),
        "the unit does not run /usr/sbin/mm-server"
    );
    fs::write(
        &unit,
        text.replace("=/usr/sbin/mm-server ", &format!("={} ", server.display())),
    )?;
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .context("cannot run systemd-analyze")?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {}: {}",
        o.status,
        err.trim()
    );
    // Fails above the threshold: a change that opens the sandbox shows.
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--threshold={EXPOSURE_THRESHOLD}"))
        .arg(&unit)
        .output()?;
    let text = String::from_utf8_lossy(&o.stdout);
    let score = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for mm-server.service: ")
                .nth(1)
        })
        .context("systemd-analyze security printed no exposure level")?
        .trim()
        .to_string();
    let most = f64::from(EXPOSURE_THRESHOLD) / 10.0;
    ensure!(
        o.status.success(),
        "systemd-analyze security: exposure level {score}, above {most}"
    );
    Ok(format!(
        "systemd-analyze verify is silent; exposure level {score} (at most {most})"
    ))
}

/// lintian, Debian's package checker: no error and no warning.
fn lintian(p: &Packages) -> Result<String> {
    util::ensure_packages(&["lintian"])?;
    let o = Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning",
            "--display-info",
            "--no-tag-display-limit",
        ])
        .args(p.debs.iter().map(|(_, d)| d))
        .output()
        .context("cannot run lintian")?;
    let text = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        bail!("lintian {}:\n{}", o.status, text.trim());
    }
    let info = text.lines().filter(|l| l.starts_with("I: ")).count();
    Ok(format!(
        "no error or warning in {} packages ({info} informational tag(s))",
        p.debs.len()
    ))
}
