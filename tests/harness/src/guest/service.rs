//! `service`: mm-server as the `mm-upcall` package installs it.
//!
//! The guest has no systemd (busybox runs `/init`), so the scenario does
//! what systemd would do with the package's unit, from the package's tree
//! (`target/package/mm-upcall_<version>_amd64`, which `cargo xtask
//! package` lays out and the suite builds first): the group of the
//! sysusers file, the settings of its tmpfiles and sysctl files, the
//! `RuntimeDirectory`, `ExecStartPre`, then `ExecStart` as a `Type=notify`
//! service under the unit's `CapabilityBoundingSet`, `NoNewPrivileges` and
//! `LimitMEMLOCK`, stopped with its `KillSignal` within its
//! `TimeoutStopSec`.  The unit's paths (`/usr/sbin/mm-server`,
//! `/etc/mm-server.toml`) are read in the tree.  The packaged
//! configuration is used as it is, on node 1 of the test bed.
//!
//! Not applied here: the unit's file-system and namespace sandbox
//! (`ProtectSystem`, `PrivateNetwork`, `PrivateTmp`, `RestrictNamespaces`
//! and the like), which `systemd-analyze verify` checks on the host
//! (`cargo xtask package`), and the maintainer scripts.

#![allow(unsafe_code)]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use mm_upcall_client::{Advice, Client, Page};

use crate::clients::until_moved;
use crate::server::{Content, MmServer, check, fill};
use crate::sys::{self, Anon, PAGE_SIZE, ensure};

/// `nobody`.
const NOBODY: u32 = 65534;

/// The highest capability number (`CAP_CHECKPOINT_RESTORE`).
const CAP_LAST_CAP: u32 = 40;

/// A capability's number, from its name in `capabilities(7)`.
fn cap_number(name: &str) -> Option<u32> {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let n = name.strip_prefix("CAP_")?;
    NAMES.iter().position(|c| *c == n).map(|i| i as u32)
}

/// The `[Service]` settings of a unit file, in order.
fn service_section(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

/// A group id no group of `/etc/group` has.
fn free_gid(groups: &str) -> u32 {
    let used: Vec<u32> = groups
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    (900..65534)
        .rev()
        .find(|g| !used.contains(g))
        .unwrap_or(64999)
}

/// The package's mmctl, on the default sockets; (exit code, stdout).
fn mmctl(tree: &Path, args: &[&str]) -> Result<(i32, String)> {
    crate::clients::run_mmctl("service", Command::new(tree.join("usr/bin/mmctl")), args)
}

pub fn service() -> Result<()> {
    let target = PathBuf::from(std::env::var("MM_TARGET").context("MM_TARGET")?);
    let tree = target.join(format!(
        "package/mm-upcall_{}_amd64",
        env!("CARGO_PKG_VERSION")
    ));
    ensure(tree.is_dir(), || {
        format!(
            "{} is missing: run `cargo xtask package` first",
            tree.display()
        )
    })?;
    let in_tree = |p: &str| -> PathBuf {
        match p.strip_prefix('/') {
            Some(rel) if rel.starts_with("usr/") || rel.starts_with("etc/") => tree.join(rel),
            _ => PathBuf::from(p),
        }
    };
    let unit = std::fs::read_to_string(tree.join("usr/lib/systemd/system/mm-server.service"))?;
    let settings = service_section(&unit);
    let get = |k: &str| {
        settings
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    ensure(get("Type") == Some("notify"), || {
        "the unit is not Type=notify".into()
    })?;
    ensure(get("KillSignal") == Some("SIGTERM"), || {
        "the unit does not stop mm-server with SIGTERM (its drain)".into()
    })?;
    let command = |k: &str| -> Result<Command> {
        let line = get(k).with_context(|| format!("the unit has no {k}"))?;
        let mut words = line.split_whitespace().map(&in_tree);
        let mut cmd = Command::new(words.next().context("an empty command")?);
        cmd.args(words);
        Ok(cmd)
    };

    // systemd-sysusers: the group of the client socket.
    let sysusers = std::fs::read_to_string(tree.join("usr/lib/sysusers.d/mm-upcall.conf"))?;
    ensure(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["g", "mm-upcall"])),
        || "the sysusers file does not create the group mm-upcall".into(),
    )?;
    let groups = std::fs::read_to_string("/etc/group")?;
    let gid = free_gid(&groups);
    std::fs::write("/tmp/group", format!("{groups}mm-upcall:x:{gid}:\n"))?;
    rustix::mount::mount_bind("/tmp/group", "/etc/group").context("bind /etc/group")?;
    // What systemd-tmpfiles (`w` lines) and systemd-sysctl apply at boot.
    let tmpfiles = std::fs::read_to_string(tree.join("usr/lib/tmpfiles.d/mm-upcall.conf"))?;
    for l in tmpfiles.lines().filter(|l| l.starts_with("w ")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let [_, path, _, _, _, _, value] = f[..] else {
            bail!("tmpfiles line {l:?}: want 7 fields");
        };
        sys::write(path, value)?;
        println!("service: tmpfiles: {path} = {value}");
    }
    let sysctl = std::fs::read_to_string(tree.join("usr/lib/sysctl.d/50-mm-upcall.conf"))?;
    for l in sysctl
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
    {
        let (k, v) = l.split_once('=').expect("a = in the line");
        let path = format!("/proc/sys/{}", k.trim().replace('.', "/"));
        sys::write(&path, v.trim())?;
        println!("service: sysctl: {} = {}", k.trim(), v.trim());
    }
    // A /run of the guest's own, and the unit's RuntimeDirectory.
    rustix::mount::mount(
        "tmpfs",
        "/run",
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .context("mount a tmpfs on /run")?;
    let runtime = get("RuntimeDirectory").context("the unit has no RuntimeDirectory")?;
    let mode = get("RuntimeDirectoryMode").map_or(Ok(0o755), |m| u32::from_str_radix(m, 8))?;
    let dir = Path::new("/run").join(runtime);
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
    println!(
        "service: group mm-upcall is gid {gid}; {} is mode {mode:o}",
        dir.display()
    );

    let pre = command("ExecStartPre")?.output().context("ExecStartPre")?;
    let said = String::from_utf8_lossy(&pre.stdout);
    println!(
        "service: ExecStartPre: {} {}",
        said.trim(),
        String::from_utf8_lossy(&pre.stderr).trim()
    );
    ensure(pre.status.success(), || {
        format!(
            "ExecStartPre (mm-server --check-config) failed: {}",
            pre.status
        )
    })?;

    let cfg: toml::Table = std::fs::read_to_string(tree.join("etc/mm-server.toml"))?.parse()?;
    let path_of = |k: &str| -> Result<PathBuf> {
        Ok(PathBuf::from(
            cfg["server"]
                .get(k)
                .and_then(|v| v.as_str())
                .with_context(|| format!("/etc/mm-server.toml has no server.{k}"))?,
        ))
    };
    let (admin, client) = (path_of("admin_socket")?, path_of("client_socket")?);
    // What systemd applies to the main process.
    let keep: Vec<u32> = get("CapabilityBoundingSet")
        .context("the unit has no CapabilityBoundingSet")?
        .split_whitespace()
        .map(|c| cap_number(c).with_context(|| format!("unknown capability {c}")))
        .collect::<Result<_>>()?;
    let no_new_privs = get("NoNewPrivileges") == Some("yes");
    ensure(get("LimitMEMLOCK") == Some("infinity"), || {
        "the unit does not lift LimitMEMLOCK (mm-server locks its memory)".into()
    })?;
    let start = || -> Result<MmServer> {
        let mut exec = command("ExecStart")?;
        let keep = keep.clone();
        // SAFETY: between fork and exec only prctl(2) and setrlimit(2),
        // async-signal-safe system calls on this process's own state.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            exec.pre_exec(move || {
                for cap in 0..=CAP_LAST_CAP {
                    if !keep.contains(&cap)
                        && libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0)
                            != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let inf = libc::rlimit {
                    rlim_cur: libc::RLIM_INFINITY,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        MmServer::launch("service", exec, admin.clone(), client.clone())
    };
    let srv = start()?;
    let caps = std::fs::read_to_string(format!("/proc/{}/status", srv.pid()))?
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        .context("CapEff")?;
    println!("service: mm-server runs with CapEff {caps} (the unit's bounding set)");

    let meta = std::fs::metadata(&client)?;
    ensure(meta.mode() & 0o777 == 0o660 && meta.gid() == gid, || {
        format!(
            "{}: mode {:o}, gid {}; want 660 and the group mm-upcall ({gid})",
            client.display(),
            meta.mode() & 0o777,
            meta.gid()
        )
    })?;
    println!("service: {} is mode 660, group mm-upcall", client.display());
    let (code, _) = mmctl(&tree, &["status"])?;
    ensure(code == 0, || {
        format!("the package's mmctl status exited {code}")
    })?;
    let (code, out) = mmctl(&tree, &["doctor"])?;
    ensure(code == 0 && !out.contains("FAIL"), || {
        format!("the package's mmctl doctor exited {code}")
    })?;

    // A member of mm-upcall advises its own memory Cold; anyone else is
    // turned away by the socket's mode.
    let me = std::env::current_exe()?;
    let member = Command::new(&me)
        .args(["--service-helper", "member"])
        .arg(&client)
        .arg(gid.to_string())
        .status()?;
    ensure(member.success(), || {
        format!("the member of mm-upcall failed: {member}")
    })?;
    let outsider = Command::new(&me)
        .args(["--service-helper", "outsider"])
        .arg(&client)
        .status()?;
    ensure(outsider.success(), || {
        format!("the user outside mm-upcall was not refused: {outsider}")
    })?;

    // systemctl restart: the unit's RestartKillSignal stops the server
    // and leaves node 1 managed, with its pages, for the next one (a
    // package upgrade restarts it so).
    ensure(get("RestartKillSignal") == Some("SIGUSR2"), || {
        "the unit's RestartKillSignal is not SIGUSR2 (restart without a drain)".into()
    })?;
    let len = 4 << 20;
    let mut mem = Anon::new(len)?;
    fill(mem.as_mut_slice(), 0x5f, Content::Random);
    let mut c = Client::connect_to(&client)?;
    until_moved((len / PAGE_SIZE) as u64, || {
        c.advise(mem.addr(), len, Advice::Cold)
    })?;
    drop(c);
    let before = crate::managed::where_are(&mem)?.1;
    let log = srv.stop_with(libc::SIGUSR2)?;
    let after = crate::managed::where_are(&mem)?.1;
    println!(
        "service: restart: {before} pages on node 1 before SIGUSR2, {after} after the server \
         stopped"
    );
    ensure(
        log.contains("left managed") && after == before && before > 0,
        || {
            format!(
                "SIGUSR2 did not leave node 1 managed with its {before} pages ({after} left there)"
            )
        },
    )?;
    let srv = start()?;
    let (books, truth) = srv.settle("after the restart")?;
    ensure(books == truth && books.0 >= before as u64, || {
        format!("the restarted server's books {books:?} differ from /proc/kpageflags {truth:?}")
    })?;
    println!(
        "service: the restarted server adopted node 1: {} pages in its books = /proc/kpageflags",
        books.0
    );

    let timeout: u64 = get("TimeoutStopSec")
        .context("the unit has no TimeoutStopSec")?
        .parse()
        .context("TimeoutStopSec in seconds")?;
    let t = std::time::Instant::now();
    let log = srv.stop()?;
    // Past it, systemd would SIGKILL the drain.
    let took = t.elapsed().as_secs_f64();
    println!("service: stopped in {took:.1} s (TimeoutStopSec {timeout} s)");
    ensure(took < timeout as f64, || {
        format!("the drain took {took:.0} s, past the unit's TimeoutStopSec of {timeout} s")
    })?;
    ensure(log.contains("detached"), || {
        "mm-server did not detach node 1 on the unit's KillSignal".into()
    })?;
    let (code, _) = mmctl(&tree, &["status"])?;
    ensure(code == 4, || {
        format!("mmctl status after the stop exited {code}, not 4 (no server)")
    })?;
    ensure(
        crate::managed::where_are(&mem)?.1 == 0
            && check(mem.as_slice(), 0x5f, Content::Random).is_none(),
        || "after the drain, pages are left on node 1 or the data changed".into(),
    )?;
    println!("service: the drain moved all {before} pages back to node 0, data intact");
    Ok(())
}

/// `mm-guest --service-helper member|outsider <socket> [<gid>]`.
pub fn helper(args: &[String]) -> Result<()> {
    match args {
        [what, sock, gid] if what == "member" => {
            // nobody, with mm-upcall as a supplementary group.
            sys::drop_to_in(NOBODY, NOBODY, &[gid.parse()?], &[])?;
            let len = 4 << 20;
            let mut mem = Anon::new(len)?;
            fill(mem.as_mut_slice(), 0x5e, Content::Compressible);
            let mut c = Client::connect_to(Path::new(sock))?;
            let r = until_moved((len / PAGE_SIZE) as u64, || {
                c.advise(mem.addr(), len, Advice::Cold)
            })?;
            let pages = c.residency(mem.addr(), len)?;
            let on_node = pages
                .iter()
                .filter(|p| matches!(p, Page::Resident { node: 1, .. }))
                .count();
            println!(
                "service: uid {NOBODY} in mm-upcall advised {} pages Cold: {} moved, {on_node} on \
                 node 1",
                len / PAGE_SIZE,
                r.moved
            );
            ensure(on_node == len / PAGE_SIZE, || {
                format!("{on_node} of {} pages on node 1", len / PAGE_SIZE)
            })?;
            ensure(
                check(mem.as_slice(), 0x5e, Content::Compressible).is_none(),
                || "the member's data changed".into(),
            )
        }
        [what, sock] if what == "outsider" => {
            sys::drop_to(NOBODY, NOBODY, &[])?;
            match Client::connect_to(Path::new(sock)) {
                Err(e) if e.to_string().contains("Permission denied") => {
                    println!("service: uid {NOBODY} outside mm-upcall: {e}");
                    Ok(())
                }
                Err(e) => bail!("the outsider failed otherwise: {e}"),
                Ok(_) => bail!("uid {NOBODY} outside mm-upcall connected"),
            }
        }
        _ => bail!("--service-helper member <socket> <gid> | outsider <socket>"),
    }
}
