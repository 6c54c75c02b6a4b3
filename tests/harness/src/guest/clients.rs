//! Scenarios of the hint API: `hints` (the C example through
//! `libmmclient.so`: Cold, Hot, KeepFast under reclaim) and `client-auth`
//! (who may advise whom over the client socket, and the daemon serving on
//! through refusals).

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use mm_upcall_client::{Advice, Client, Error, Page};
use mm_upcall_proto::socket::ErrorCode;

use crate::server::{Content, MmServer, check, fill};
use crate::sys::{self, Anon, Cgroup, PAGE_SIZE, ensure};

/// `nobody`/`nogroup`: the client socket's group in the scenarios.
const NOBODY: u32 = 65534;

/// `hints`: the C example maps 64 MiB; Cold puts it on node 1 with
/// measured sizes, Hot brings it back, and a KeepFast range stays on node
/// 0 under `memory.reclaim` that demotes its neighbours; data intact
/// throughout (the program checks each step and exits non-zero on any
/// failure).  Then mm-server's books equal `/proc/kpageflags`.
pub fn hints() -> Result<()> {
    let srv = MmServer::start("hints", 256, "")?;
    let bin = std::env::current_exe()?.with_file_name("mm-hints");
    let cg = Cgroup::enter("hints")?;
    let mut child = Command::new(&bin)
        .env("MM_UPCALL_SOCKET", &srv.client_sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    // The child stays in the cgroup; this process leaves it.
    cg.leave()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    let mut ready = false;
    while out.read_line(&mut line)? > 0 {
        print!("hints: {line}");
        if line.contains("keepfast ready") {
            ready = true;
            break;
        }
        line.clear();
    }
    if !ready {
        bail!("mm-hints stopped before KeepFast ({})", child.wait()?);
    }
    // Another process with CAP_SYS_NICE (this one) cannot move a
    // KeepFast range onto the node either: the server skips locked pages.
    let words: Vec<&str> = line.split_whitespace().collect();
    let (Some(addr), Some(len)) = (words.get(3), words.get(4)) else {
        bail!("mm-hints said {line:?}");
    };
    let addr = usize::from_str_radix(addr.trim_start_matches("0x"), 16)?;
    let len: usize = len.parse()?;
    let fd = pidfd(child.id())?;
    let r = Client::connect_to(&srv.client_sock)?.advise_process(
        std::os::fd::AsFd::as_fd(&fd),
        addr,
        len,
        Advice::Cold,
    )?;
    println!("hints: another process's Cold on the KeepFast range: {r:?}");
    ensure(
        r.moved == 0 && r.skipped == (len / PAGE_SIZE) as u64,
        || "the server moved locked pages onto node 1".into(),
    )?;
    // Push the cgroup: with no swap, reclaim can only demote.
    for _ in 0..8 {
        cg.reclaim(64 << 20);
    }
    // While the program holds its pages: the books equal the kernel's.
    let (books, truth) = srv.settle("after reclaim, KeepFast standing")?;
    ensure(books == truth && books.0 > 0, || {
        format!("mm-server's books {books:?}, /proc/kpageflags {truth:?}")
    })?;
    writeln!(child.stdin.as_mut().context("stdin")?, "go")?;
    line.clear();
    while out.read_line(&mut line)? > 0 {
        print!("hints: {line}");
        line.clear();
    }
    let st = child.wait()?;
    ensure(st.success(), || format!("mm-hints failed ({st})"))?;
    drop(cg);
    srv.stop()?;
    Ok(())
}

/// `client-auth`: a process without privilege cannot advise another
/// process's memory (EPERM, and the error names the privilege) nor use
/// admin frames on the client socket, nor connect to the admin socket;
/// it may advise its own.  With `CAP_SYS_NICE` it may advise a process of
/// its uid, still not root's.  Through all of it the daemon serves other
/// clients and upcalls.
pub fn client_auth() -> Result<()> {
    let srv = MmServer::start("client-auth", 256, "")?;
    let sock = srv.client_sock.display().to_string();
    let exe = std::env::current_exe()?;
    let helper = |args: &[&str]| {
        let mut c = Command::new(&exe);
        c.arg("--client-helper")
            .args(args)
            .env("MM_UPCALL_SOCKET", &sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        c
    };
    // A process of uid nobody with 8 MiB to advise.
    let mut target = helper(&["target"]).spawn()?;
    let mut out = BufReader::new(target.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let ["target", pid, addr] = words[..] else {
        bail!("the target helper said {line:?}");
    };
    println!("client-auth: target {pid} (uid {NOBODY}) maps 8 MiB at {addr}");
    // Root's own memory, also advised by the others.
    let mine = Anon::new(8 << 20)?;
    let root_pid = std::process::id().to_string();
    let root_addr = format!("{:#x}", mine.addr());
    for (who, args) in [
        (
            "unprivileged",
            vec!["plain", pid, addr, &root_pid, &root_addr],
        ),
        (
            "CAP_SYS_NICE",
            vec!["nice", pid, addr, &root_pid, &root_addr],
        ),
    ] {
        let o = helper(&args).stdin(Stdio::null()).output()?;
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            println!("client-auth: {who}: {l}");
        }
        ensure(o.status.success(), || {
            format!("the {who} helper failed ({})", o.status)
        })?;
    }
    drop(target.stdin.take());
    let st = target.wait()?;
    ensure(st.success(), || format!("the target's data changed ({st})"))?;
    let sent = replay_malformed(&srv.client_sock)?;
    println!("client-auth: {sent} malformed frames replayed, one connection each");
    // The daemon serves on: root advises its own memory Cold, then writes
    // it (write faults, answered by mm-server), data intact.
    let mut mem = mine;
    fill(mem.as_mut_slice(), 7, Content::Compressible);
    let faults0 = srv.get("mm_server_upcalls_total{kind=\"write_fault\"}")?;
    let mut c = Client::connect_to(&srv.client_sock)?;
    let r = c.advise(mem.addr(), 8 << 20, Advice::Cold)?;
    println!("client-auth: root's own Cold: {r:?}");
    ensure(r.moved == 2048, || {
        format!("root's Cold moved {} of 2048 pages", r.moved)
    })?;
    for p in mem.as_mut_slice().chunks_mut(PAGE_SIZE) {
        p[0] = p[0].wrapping_add(1);
        p[0] = p[0].wrapping_sub(1);
    }
    ensure(
        check(mem.as_slice(), 7, Content::Compressible).is_none(),
        || "root's data changed across Cold and the writes".into(),
    )?;
    let faults = srv.get("mm_server_upcalls_total{kind=\"write_fault\"}")? - faults0;
    println!("client-auth: mm-server answered {faults} write faults after the refusals");
    ensure(faults >= 1.0, || "mm-server answered no write fault".into())?;
    let (books, truth) = srv.settle("after client-auth")?;
    ensure(books == truth, || {
        format!("mm-server's books {books:?} differ from /proc/kpageflags {truth:?}")
    })?;
    srv.stop()?;
    Ok(())
}

/// Advise `Cold` until `pages` have moved in all, as a client should when
/// the server has no room yet (its credit promised to the kernel, or an
/// eviction running): at most 10 tries, 1 s apart.  Returns the sum.
pub fn until_moved(
    pages: u64,
    mut advise: impl FnMut() -> std::result::Result<mm_upcall_client::Advised, Error>,
) -> Result<mm_upcall_client::Advised> {
    let mut total = mm_upcall_client::Advised::default();
    for attempt in 0..10 {
        match advise() {
            Ok(r) => {
                total.pages = r.pages;
                total.moved += r.moved;
                total.already = r.already;
                total.skipped = r.skipped;
            }
            Err(Error::Refused {
                code: ErrorCode::Busy,
                ..
            }) => {}
            Err(e) => return Err(e.into()),
        }
        if total.moved >= pages {
            break;
        }
        println!(
            "(Cold: {} of {pages} moved after try {attempt}; again in 1 s)",
            total.moved
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    Ok(total)
}

/// Drop to uid and gid `nobody`, keeping `CAP_SYS_NICE` when `nice`.
fn become_nobody(nice: bool) -> Result<()> {
    sys::drop_to(
        NOBODY,
        NOBODY,
        if nice { &[sys::CAP_SYS_NICE] } else { &[] },
    )
}

/// `mm-guest --client-helper <what> ...`: the processes of `client-auth`.
pub fn helper(args: &[String]) -> Result<()> {
    let what = args.first().map(String::as_str).unwrap_or_default();
    match what {
        "target" => {
            become_nobody(false)?;
            let mut mem = Anon::new(8 << 20)?;
            fill(mem.as_mut_slice(), 3, Content::Compressible);
            println!("target {} {:#x}", std::process::id(), mem.addr());
            std::io::stdout().flush()?;
            // Until the scenario closes stdin.
            let _ = std::io::stdin().read_line(&mut String::new());
            ensure(
                check(mem.as_slice(), 3, Content::Compressible).is_none(),
                || "the target's data changed".into(),
            )?;
            Ok(())
        }
        "plain" | "nice" => {
            let nice = what == "nice";
            let [pid, addr, root_pid, root_addr] = &args[1..] else {
                bail!("--client-helper {what} <pid> <addr> <root pid> <root addr>");
            };
            let num = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16);
            let (pid, addr): (u32, u64) = (pid.parse()?, num(addr)?);
            let (root_pid, root_addr): (u32, u64) = (root_pid.parse()?, num(root_addr)?);
            become_nobody(nice)?;
            advise_others(nice, pid, addr, root_pid, root_addr)
        }
        other => bail!("unknown client helper {other:?}"),
    }
}

fn pidfd(pid: u32) -> Result<std::os::fd::OwnedFd> {
    let p = rustix::process::Pid::from_raw(pid as i32).context("pid")?;
    Ok(rustix::process::pidfd_open(
        p,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// The text of the refusal `r` must be: `code` with `errno` (negative).
fn refused(
    r: std::result::Result<impl std::fmt::Debug, Error>,
    code: ErrorCode,
    errno: i32,
) -> Result<String> {
    match r {
        Err(e @ Error::Refused { .. }) if matches!(&e, Error::Refused { code: c, errno: n, .. } if *c == code && *n == errno) => {
            Ok(e.to_string())
        }
        other => bail!("expected a refusal {code:?} ({errno}), got {other:?}"),
    }
}

fn advise_others(nice: bool, pid: u32, addr: u64, root_pid: u32, root_addr: u64) -> Result<()> {
    let mut c = Client::connect()?;
    let len = 8 << 20;
    let target = pidfd(pid)?;
    let root = pidfd(root_pid)?;
    use std::os::fd::AsFd as _;
    // Root's memory: refused either way (another uid, no CAP_SYS_PTRACE).
    let e = refused(
        c.advise_process(root.as_fd(), root_addr as usize, len, Advice::Cold),
        ErrorCode::PermissionDenied,
        -libc::EPERM,
    )?;
    println!("root's memory: refused: {e}");
    ensure(e.contains("CAP_SYS_NICE"), || {
        format!("the error does not name the privilege: {e}")
    })?;
    if nice {
        let r = until_moved(2048, || {
            c.advise_process(target.as_fd(), addr as usize, len, Advice::Cold)
        })?;
        println!("the target's memory, Cold: {r:?}");
        ensure(r.moved == 2048, || {
            format!("Cold moved {} of 2048 pages", r.moved)
        })?;
        let pages = c.residency_process(target.as_fd(), addr as usize, len)?;
        let on1 = pages.iter().filter(|p| p.node() == Some(1)).count();
        println!("the target's memory: {on1} of 2048 pages on node 1");
        ensure(on1 == 2048, || format!("{on1} of 2048 pages on node 1"))?;
    } else {
        let e = refused(
            c.advise_process(target.as_fd(), addr as usize, len, Advice::Cold),
            ErrorCode::PermissionDenied,
            -libc::EPERM,
        )?;
        println!("the target's memory (same uid, no CAP_SYS_NICE): refused: {e}");
        let e = refused(
            c.residency_process(target.as_fd(), addr as usize, len),
            ErrorCode::PermissionDenied,
            -libc::EPERM,
        )?;
        println!("the target's residency: refused: {e}");
        // Admin frames on the client socket, and the admin socket itself.
        let admin = std::env::var("MM_UPCALL_SOCKET")?.replace("-client.sock", ".sock");
        match mm_upcall_client::AdminClient::connect(std::path::Path::new(&admin)) {
            Err(Error::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                println!("the admin socket: permission denied");
            }
            other => bail!("the admin socket let an unprivileged process in: {other:?}"),
        }
        // Its own memory it may advise.
        let mut own = Anon::new(1 << 20)?;
        fill(own.as_mut_slice(), 5, Content::Compressible);
        let r = until_moved(256, || c.advise(own.addr(), 1 << 20, Advice::Cold))?;
        println!("its own memory, Cold: {r:?}");
        ensure(r.moved == 256, || {
            format!("Cold of its own memory moved {} of 256", r.moved)
        })?;
        let back = c.advise(own.addr(), 1 << 20, Advice::Hot)?;
        ensure(back.moved == 256, || {
            format!("Hot moved {} of 256", back.moved)
        })?;
        ensure(
            check(own.as_slice(), 5, Content::Compressible).is_none(),
            || "its data changed".into(),
        )?;
        ensure(
            c.residency(own.addr(), 1 << 20)?
                .iter()
                .all(|p| matches!(p, Page::Resident { node: 0, .. })),
            || "its memory is not all back on node 0".into(),
        )?;
    }
    Ok(())
}

/// Run `mmctl` with the scenario's sockets; returns its exit code and
/// stdout (printed).
fn mmctl(name: &str, args: &[&str]) -> Result<(i32, String)> {
    let bin = std::env::current_exe()?.with_file_name("mmctl");
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket")
        .arg(format!("/tmp/{name}-client.sock"))
        .arg("--admin-socket")
        .arg(format!("/tmp/{name}.sock"));
    run_mmctl(name, cmd, args)
}

/// Run mmctl (`cmd`, with its socket options) with `args`, its output
/// printed under `name`; (exit code, stdout).
pub fn run_mmctl(name: &str, mut cmd: Command, args: &[&str]) -> Result<(i32, String)> {
    let o = cmd
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", cmd.get_program().to_string_lossy()))?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    for l in out
        .lines()
        .chain(String::from_utf8_lossy(&o.stderr).lines())
    {
        println!("{name}: mmctl {}: {l}", args.join(" "));
    }
    Ok((o.status.code().unwrap_or(-1), out))
}

/// `doctor`: `mmctl doctor` on the patched kernel names what is wrong and
/// exits 3 with node 1 as ordinary memory and no server, exits 0 with a
/// server, and names the node left managed by a killed server.
pub fn doctor() -> Result<()> {
    sys::write("/sys/kernel/mm/numa/demotion_enabled", "true")?;
    sys::write("/proc/sys/kernel/numa_balancing", "2")?;
    let (code, out) = mmctl("doctor", &["doctor"])?;
    ensure(code == 3, || {
        format!("doctor with no server exited {code}, not 3")
    })?;
    ensure(out.contains("FAIL server: not running"), || {
        "doctor did not say the server is not running".into()
    })?;
    ensure(out.contains("FAIL node 1: ordinary memory"), || {
        "doctor did not say node 1 is ordinary memory".into()
    })?;
    ensure(
        out.contains("ok   kernel:") && out.contains("ok   node 1: in memory_tier"),
        || "doctor did not pass the kernel and tier checks".into(),
    )?;
    let srv = MmServer::start("doctor", 256, "")?;
    let (code, out) = mmctl("doctor", &["doctor"])?;
    ensure(
        code == 0 && !out.contains("FAIL") && !out.contains("warn"),
        || format!("doctor with a server exited {code}"),
    )?;
    let (code, json) = mmctl("doctor", &["doctor", "--json"])?;
    ensure(
        code == 0 && json.contains("\"status\": \"ok\"") && !json.contains("\"fail\""),
        || "doctor --json with a server".into(),
    )?;
    // The operator's other read commands, as root.
    let (code, nodes) = mmctl("doctor", &["nodes", "--json"])?;
    ensure(code == 0 && nodes.contains("\"nid\": 1"), || {
        "mmctl nodes --json".into()
    })?;
    let (code, stats) = mmctl("doctor", &["stats", "--json"])?;
    ensure(code == 0 && stats.contains("\"upcalls\""), || {
        "mmctl stats --json".into()
    })?;
    let (code, _) = mmctl("doctor", &["status"])?;
    ensure(code == 0, || format!("mmctl status exited {code}"))?;
    srv.kill()?;
    let (code, out) = mmctl("doctor", &["doctor"])?;
    ensure(
        code == 3 && out.contains("FAIL node 1: managed by the kernel"),
        || "doctor after the server was killed did not name node 1 left managed".into(),
    )?;
    let (code, _) = mmctl("doctor", &["status"])?;
    ensure(code == 4, || {
        format!("mmctl status with no server exited {code}, not 4")
    })?;
    Ok(())
}

/// Replay malformed frames at a running daemon's client socket, one
/// connection each: the fuzz seeds cut short, with each byte of their
/// header flipped, and with huge lengths.  Each gets an answer or a
/// closed connection, never a hang; the daemon then still serves.
/// Returns how many were sent.
pub fn replay_malformed(sock: &std::path::Path) -> Result<usize> {
    use mm_upcall_proto::socket::{Frame, HEADER_SIZE, MAX_FRAME_SIZE};
    use std::io::Read as _;
    use std::os::unix::net::UnixStream;
    let seeds = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent()?.parent())
        .context("workspace root")?
        .join("fuzz/seeds/socket_frame");
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for e in std::fs::read_dir(&seeds).with_context(|| seeds.display().to_string())? {
        let seed = std::fs::read(e?.path())?;
        for cut in [
            1,
            HEADER_SIZE - 1,
            HEADER_SIZE,
            seed.len().saturating_sub(1),
        ] {
            frames.push(seed[..cut.min(seed.len())].to_vec());
        }
        for i in 0..HEADER_SIZE.min(seed.len()) {
            let mut f = seed.clone();
            f[i] ^= 0xff;
            frames.push(f);
        }
        let mut huge = seed.clone();
        if huge.len() >= 12 {
            huge[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
            frames.push(huge);
        }
    }
    let mut hello = [0u8; MAX_FRAME_SIZE];
    let n = Frame::Hello {
        min_version: 1,
        max_version: 1,
        features: 0,
    }
    .encode(&mut hello);
    for f in &frames {
        let mut s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        s.write_all(&hello[..n])?;
        s.write_all(f)?;
        // Half-close: a frame cut short ends there.
        s.shutdown(std::net::Shutdown::Write)?;
        let mut reply = Vec::new();
        match s.read_to_end(&mut reply) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => bail!("a malformed frame left the connection hanging: {e}"),
        }
    }
    Ok(frames.len())
}

/// Allocate `len` bytes charged to cgroup `cg` (entered for the
/// allocation), filled with `seed`'s pattern, and demote them with
/// `memory.reclaim`; returns the mapping and how many pages reached node 1.
fn demoted_in(cg: &Cgroup, len: usize, seed: u64) -> Result<(Anon, usize)> {
    cg.rejoin()?;
    let mut mem = Anon::new(len)?;
    fill(mem.as_mut_slice(), seed, Content::Compressible);
    cg.leave()?;
    for _ in 0..8 {
        cg.reclaim(len);
        if crate::managed::where_are(&mem)?.1 == len / PAGE_SIZE {
            break;
        }
    }
    let on1 = crate::managed::where_are(&mem)?.1;
    Ok((mem, on1))
}

/// `drain`: `mmctl evict --cgroup --min-age` evicts only that cgroup's old
/// pages; `mmctl policy set` changes a watermark and refuses a bad one;
/// `mmctl drain 1` empties node 1, data intact, books at 0, and detaches
/// it.
pub fn drain() -> Result<()> {
    const MIB: usize = 1 << 20;
    let srv = MmServer::start("drain", 256, "")?;
    let a = Cgroup::enter("drain-a")?;
    a.leave()?;
    let b = Cgroup::enter("drain-b")?;
    b.leave()?;
    let (old_a, n_old) = demoted_in(&a, 16 * MIB, 11)?;
    let old_done = std::time::Instant::now();
    println!("drain: cgroup drain-a: {n_old} old pages on node 1");
    // The gap that tells old from young, in the server's 1 s stamps.
    std::thread::sleep(std::time::Duration::from_secs(8));
    let young_start = std::time::Instant::now();
    let (young_a, n_young) = demoted_in(&a, 8 * MIB, 12)?;
    let (mem_b, n_b) = demoted_in(&b, 16 * MIB, 13)?;
    println!("drain: drain-a: {n_young} young pages on node 1; drain-b: {n_b}");
    ensure(n_old > 0 && n_young > 0 && n_b > 0, || {
        "reclaim demoted nothing".into()
    })?;
    // Older than anything young, younger than everything old.
    // Stamps are whole seconds: a margin of 2 s on each side.
    let min_age = young_start.elapsed().as_secs() + 3;
    ensure(old_done.elapsed().as_secs() >= min_age + 2, || {
        format!("no gap between old and young pages for --min-age {min_age}")
    })?;
    let (code, out) = mmctl(
        "drain",
        &[
            "evict",
            "--cgroup",
            "/sys/fs/cgroup/drain-a",
            "--max-bytes",
            "1G",
            "--min-age",
            &min_age.to_string(),
        ],
    )?;
    ensure(code == 0, || format!("mmctl evict exited {code}"))?;
    ensure(out.starts_with(&format!("{n_old} pages")), || {
        format!("mmctl evict queued other than the {n_old} old pages of drain-a")
    })?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while crate::managed::where_are(&old_a)?.1 > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let left = (
        crate::managed::where_are(&old_a)?.1,
        crate::managed::where_are(&young_a)?.1,
        crate::managed::where_are(&mem_b)?.1,
    );
    println!(
        "drain: after evict: drain-a old {} / young {} / drain-b {} pages on node 1",
        left.0, left.1, left.2
    );
    ensure(left == (0, n_young, n_b), || {
        format!("evict moved other pages: want (0, {n_young}, {n_b}) on node 1, got {left:?}")
    })?;
    // Policy at run time.
    let (code, _) = mmctl("drain", &["policy", "set", "--high", "85"])?;
    ensure(code == 0, || format!("policy set exited {code}"))?;
    let (_, json) = mmctl("drain", &["policy", "get", "--json"])?;
    ensure(json.contains("\"high\": 85"), || {
        "policy get does not show high 85".into()
    })?;
    let (code, _) = mmctl("drain", &["policy", "set", "--low", "90"])?;
    ensure(code == 1, || {
        format!("a low watermark above high was accepted ({code})")
    })?;
    // Drain node 1.
    let (code, _) = mmctl("drain", &["drain", "1"])?;
    ensure(code == 0, || format!("mmctl drain exited {code}"))?;
    for (mem, seed, what) in [
        (&old_a, 11, "old"),
        (&young_a, 12, "young"),
        (&mem_b, 13, "b"),
    ] {
        ensure(crate::managed::where_are(mem)?.1 == 0, || {
            format!("{what} pages still on node 1 after the drain")
        })?;
        ensure(
            check(mem.as_slice(), seed, Content::Compressible).is_none(),
            || format!("{what} pages changed across evict and drain"),
        )?;
    }
    let books = srv.node1("resident_pages")?;
    let state = srv.node1("node_state")?;
    let (start, spanned) = (
        srv.node1("node_start_pfn")?,
        srv.node1("node_spanned_pages")?,
    );
    let (truth, _) = crate::managed::kpageflags_truth(start, spanned)?;
    println!("drain: after drain: books {books} pages, kpageflags {truth}, node state {state}");
    ensure(books == 0 && truth == 0 && state == 3, || {
        "node 1 not empty and detached after mmctl drain".into()
    })?;
    srv.stop()?;
    Ok(())
}

/// The `standing-verdict` part with mm-server and its default policy: it
/// leaves node 1 a standing verdict, so writes to pages advised `Cold` are
/// promoted by the kernel with no WRITE_FAULT upcall and the books stay
/// equal to the kernel's; with a writable budget (`mmctl policy set`)
/// every fault is asked again.
pub fn standing_by_default() -> Result<()> {
    use crate::server::{Books, agree};
    const LEN: usize = 8 << 20;
    let n = (LEN / PAGE_SIZE) as u64;
    let srv = MmServer::start_with_policy("standing", 256, "", "")?;
    let gauge = "mm_server_standing_verdict{nid=\"1\"}";
    let wait_gauge = |want: f64| -> Result<()> {
        let start = std::time::Instant::now();
        while srv.get(gauge)? != want {
            ensure(start.elapsed() < std::time::Duration::from_secs(30), || {
                format!("{gauge} is not {want} after 30 s")
            })?;
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(())
    };
    wait_gauge(1.0)?;
    let mut c = Client::connect_to(&srv.client_sock)?;
    for (round, asked) in [("standing", false), ("writable budget 64", true)] {
        let mut mem = Anon::new(LEN)?;
        sys::madvise(&mem, libc::MADV_NOHUGEPAGE)?;
        fill(mem.as_mut_slice(), 0x5a0, Content::Compressible);
        until_moved(n, || c.advise(mem.addr(), LEN, Advice::Cold))?;
        agree(&srv, &format!("{round}: after Cold"), Books::FromEvents)?;
        let wf = "mm_server_upcalls_total{kind=\"write_fault\"}";
        let (wf0, fenced0, st0) = (
            srv.get(wf)?,
            crate::upcall::stat("write_faults")?,
            crate::upcall::stat("standing_verdicts")?,
        );
        fill(mem.as_mut_slice(), 0x5a1, Content::Compressible);
        let (fenced, st) = (
            crate::upcall::stat("write_faults")? - fenced0,
            crate::upcall::stat("standing_verdicts")? - st0,
        );
        // The kernel's counters are exact at once; mm-server's metrics
        // come from a snapshot it publishes after each batch.
        agree(
            &srv,
            &format!("{round}: after the writes"),
            Books::FromEvents,
        )?;
        let asked_of_server = srv.get(wf)? - wf0;
        let (n0, n1, _) = crate::managed::where_are(&mem)?;
        println!(
            "standing-verdict: mm-server, {round}: {n} pages written: {fenced} fenced write \
             faults, {st} decided standing, {asked_of_server} WRITE_FAULT upcalls answered; {n0} \
             pages on node 0, {n1} on node 1"
        );
        ensure(
            check(mem.as_slice(), 0x5a1, Content::Compressible).is_none(),
            || format!("{round}: data corrupted"),
        )?;
        let want = if asked { (n, 0, n as f64) } else { (n, n, 0.0) };
        ensure((fenced, st, asked_of_server) == want, || {
            format!(
                "{round}: {fenced} fenced, {st} standing, {asked_of_server} upcalls; want {want:?}"
            )
        })?;
        ensure(asked || n0 as u64 == n, || {
            format!("{round}: {n0} of {n} pages on node 0")
        })?;
        if !asked {
            let (code, _) = mmctl("standing", &["policy", "set", "--writable-budget", "64"])?;
            ensure(code == 0, || format!("policy set exited {code}"))?;
            wait_gauge(0.0)?;
        }
    }
    srv.stop()?;
    Ok(())
}

/// `tenant-limit`: a `[[tenant]]` over its `max_mib` has its oldest pages
/// evicted until its pages cost less than the limit on the device; a
/// tenant within its limit keeps all of its pages there; data intact and
/// books exact.
pub fn tenant_limit() -> Result<()> {
    const MIB: usize = 1 << 20;
    const LIMIT_MIB: usize = 4;
    let a = Cgroup::enter("tenant-a")?;
    a.leave()?;
    let b = Cgroup::enter("tenant-b")?;
    b.leave()?;
    let srv = MmServer::start(
        "tenant-limit",
        256,
        &format!(
            "\n[[tenant]]\ncgroup = \"/sys/fs/cgroup/tenant-a\"\nmax_mib = {LIMIT_MIB}\n\n\
             [[tenant]]\ncgroup = \"/sys/fs/cgroup/tenant-b\"\nmax_mib = 64\n"
        ),
    )?;
    let metric = |name: &str, tenant: &str| -> Result<f64> {
        srv.get(&format!("mm_server_{name}{{tenant=\"{tenant}\"}}"))
    };
    // Random pages: each costs a whole page and more on the device.
    let demote = |cg: &Cgroup, seed: u64| -> Result<(Anon, usize)> {
        cg.rejoin()?;
        let mut mem = Anon::new(16 * MIB)?;
        fill(mem.as_mut_slice(), seed, Content::Random);
        cg.leave()?;
        cg.reclaim(32 * MIB);
        let on1 = crate::managed::where_are(&mem)?.1;
        Ok((mem, on1))
    };
    let (mem_b, n_b) = demote(&b, 21)?;
    let (mem_a, n_a) = demote(&a, 22)?;
    println!(
        "tenant-limit: reclaim demoted {n_a} pages of tenant-a (limit {LIMIT_MIB} MiB) and {n_b} \
         of tenant-b (limit 64 MiB)"
    );
    ensure(n_a * PAGE_SIZE > LIMIT_MIB * MIB && n_b > 0, || {
        format!(
            "reclaim did not take tenant-a over its limit ({n_a} pages) or demoted no page of tenant-b"
        )
    })?;
    // The tenants are looked at every second; evictions go through the
    // server's queue.
    let limit = (LIMIT_MIB * MIB) as f64;
    let mut used = f64::NAN;
    for _ in 0..60 {
        used = metric("tenant_used_bytes", "tenant-a")?;
        if used <= limit && metric("tenant_evictions_queued_total", "tenant-a")? > 0.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    let on1_a = crate::managed::where_are(&mem_a)?.1;
    let on1_b = crate::managed::where_are(&mem_b)?.1;
    let (evicted_a, evicted_b) = (
        metric("tenant_evictions_queued_total", "tenant-a")?,
        metric("tenant_evictions_queued_total", "tenant-b")?,
    );
    println!(
        "tenant-limit: tenant-a: {on1_a} pages left on node 1, costing {used} bytes (limit {}), \
         {evicted_a} queued for eviction, over its limit {} time(s); tenant-b: {on1_b} of {n_b} pages on node \
         1, {evicted_b} queued",
        limit,
        metric("tenant_over_limit_total", "tenant-a")?
    );
    ensure(
        used <= limit && on1_a * PAGE_SIZE <= LIMIT_MIB * MIB,
        || {
            format!(
                "tenant-a still costs {used} bytes ({on1_a} pages on node 1), over its {LIMIT_MIB} MiB"
            )
        },
    )?;
    ensure(evicted_a > 0.0 && on1_a < n_a, || {
        "nothing of tenant-a was evicted".into()
    })?;
    ensure(on1_b == n_b && evicted_b == 0.0, || {
        format!(
            "tenant-b, within its limit, lost pages: {on1_b} of {n_b} left, {evicted_b} evicted"
        )
    })?;
    ensure(
        check(mem_a.as_slice(), 22, Content::Random).is_none()
            && check(mem_b.as_slice(), 21, Content::Random).is_none(),
        || "a tenant's data changed".into(),
    )?;
    println!("tenant-limit: both tenants' data intact");
    let (books, truth) = srv.settle("after the tenant evictions")?;
    ensure(books == truth, || {
        format!("mm-server's books {books:?} differ from /proc/kpageflags {truth:?}")
    })?;
    srv.stop()?;
    Ok(())
}
