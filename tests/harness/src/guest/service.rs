//! `service`: mm-server as the `mm-upcall` package installs it.
//!
//! The guest has no systemd (busybox runs `/init`), so the scenario does
//! what systemd would do with the package's unit, from the package's tree
//! (`target/package/mm-upcall_<version>_amd64`, which `cargo xtask
//! package` lays out and the suite builds first): the group of the
//! sysusers file, the settings of its tmpfiles and sysctl files, the
//! `RuntimeDirectory`, `ExecStartPre`, then `ExecStart`
//! as a `Type=notify` service with `KillSignal` to stop it.  The unit's
//! paths (`/usr/sbin/mm-server`, `/etc/mm-server.toml`) are read in the
//! tree.  The packaged configuration is used as it is, on node 1 of the
//! test bed.

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
    let bin = tree.join("usr/bin/mmctl");
    let o = Command::new(&bin)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    for l in out
        .lines()
        .chain(String::from_utf8_lossy(&o.stderr).lines())
    {
        println!("service: mmctl {}: {l}", args.join(" "));
    }
    Ok((o.status.code().unwrap_or(-1), out))
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
    let srv = MmServer::launch("service", command("ExecStart")?, admin, client.clone())?;

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

    let log = srv.stop()?;
    ensure(log.contains("detached"), || {
        "mm-server did not detach node 1 on the unit's KillSignal".into()
    })?;
    let (code, _) = mmctl(&tree, &["status"])?;
    ensure(code == 4, || {
        format!("mmctl status after the stop exited {code}, not 4 (no server)")
    })?;
    Ok(())
}

/// `mm-guest --service-helper member|outsider <socket> [<gid>]`.
pub fn helper(args: &[String]) -> Result<()> {
    match args {
        [what, sock, gid] if what == "member" => {
            sys::drop_to(NOBODY, gid.parse()?, &[])?;
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
