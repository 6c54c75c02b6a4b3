//! The client socket, in process, against a fake loop (a thread answering
//! from a real `Core`, no kernel): the handshake, hostile frames, admin
//! frames, the rate limit, who may advise whom, and `Residency` of this
//! test's own memory through the real `move_pages(2)` and pagemap.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use mm_server::capacity::{Geometry, NodeAccount};
use mm_server::clients::{self, Limits, may_advise_other};
use mm_server::core::{Core, CoreConfig};
use mm_server::driver::CoreHandle;
use mm_server::policy::PolicyConfig;
use mm_upcall_client::{Advice, Client, Error, Page};
use mm_upcall_proto::socket::{ErrorCode, Frame, HEADER_SIZE, MAX_FRAME_SIZE};

fn server(name: &str, limits: Limits) -> PathBuf {
    let path = std::env::temp_dir().join(format!("mm-clients-{name}-{}.sock", std::process::id()));
    let cfg = CoreConfig {
        policy: PolicyConfig::default(),
        hot_window_ns: 1_000_000_000,
        drain_timeout_ns: 1_000_000_000,
        detach_on_stop: false,
    };
    let g = Geometry {
        capacity: 16 << 20,
        granule: 64,
        low: 60,
        high: 80,
        critical: 95,
    };
    let account = NodeAccount::new(g, 0x100000, 4096).unwrap();
    let core = Core::new(cfg, vec![(1, account)], 0).unwrap();
    let handle = CoreHandle::fake_loop(core, 0).unwrap();
    let l = clients::bind(&path, None).unwrap();
    clients::spawn(l, handle, limits).unwrap();
    path
}

const LIMITS: Limits = Limits {
    requests_per_s: 1000,
    advise_bytes_per_s: 1 << 30,
};

fn send_raw(s: &mut UnixStream, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
}

fn frame(f: Frame) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME_SIZE];
    let n = f.encode(&mut buf);
    buf[..n].to_vec()
}

/// The next reply, or `None` once the server closed the connection.
fn reply(s: &mut UnixStream) -> Option<Frame> {
    let mut hdr = [0u8; HEADER_SIZE];
    s.read_exact(&mut hdr).ok()?;
    let (_, total) = Frame::decode_header(&hdr).unwrap();
    let mut buf = hdr.to_vec();
    buf.resize(total, 0);
    s.read_exact(&mut buf[HEADER_SIZE..]).unwrap();
    Some(Frame::decode(&buf).unwrap().0)
}

fn hello() -> Vec<u8> {
    frame(Frame::Hello {
        min_version: 1,
        max_version: 1,
        features: 0,
    })
}

fn refused(f: Option<Frame>) -> ErrorCode {
    match f {
        Some(Frame::Error { code, .. }) => code,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[test]
fn hostile_frames_get_an_error_and_a_closed_connection() {
    let path = server("hostile", LIMITS);
    let advise = frame(Frame::Advise {
        pid: 0,
        advice: Advice::Cold,
        addr: 0x1000,
        len: 4096,
    });
    let mut bad_version = hello();
    bad_version[4] = 9;
    let mut reserved = advise.clone();
    reserved[HEADER_SIZE + 24] = 1;
    let mut unknown_op = frame(Frame::Stats);
    unknown_op[6] = 200;
    let mut huge = frame(Frame::Stats);
    huge[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
    let mut bad_advice = advise.clone();
    bad_advice[HEADER_SIZE + 4] = 99;
    let cases: [(&str, Vec<u8>, ErrorCode); 6] = [
        ("wrong version", bad_version, ErrorCode::BadVersion),
        ("non-zero reserved", reserved, ErrorCode::BadFrame),
        ("unknown opcode", unknown_op, ErrorCode::BadFrame),
        ("huge length", huge, ErrorCode::BadFrame),
        ("unknown advice", bad_advice, ErrorCode::BadFrame),
        (
            "a reply sent as a request",
            frame(Frame::Ok),
            ErrorCode::BadFrame,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut s = UnixStream::connect(&path).unwrap();
        send_raw(&mut s, &hello());
        assert!(
            matches!(reply(&mut s), Some(Frame::HelloReply { .. })),
            "{what}"
        );
        send_raw(&mut s, &bytes);
        assert_eq!(refused(reply(&mut s)), code, "{what}");
        assert_eq!(reply(&mut s), None, "{what}: the connection stays open");
    }
    // Before Hello, nothing else is answered.
    let mut s = UnixStream::connect(&path).unwrap();
    send_raw(&mut s, &advise);
    assert_eq!(refused(reply(&mut s)), ErrorCode::BadFrame);
    // A truncated frame, then the client goes away: the server is still
    // serving others.
    let mut s = UnixStream::connect(&path).unwrap();
    send_raw(&mut s, &hello()[..7]);
    drop(s);
    let c = Client::connect_to(&path).unwrap();
    assert_eq!(c.version(), 1);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn admin_frames_are_refused_on_the_client_socket() {
    let path = server("admin", LIMITS);
    let mut s = UnixStream::connect(&path).unwrap();
    send_raw(&mut s, &hello());
    reply(&mut s).unwrap();
    for f in [Frame::Stats, Frame::Metrics] {
        send_raw(&mut s, &frame(f));
        assert_eq!(refused(reply(&mut s)), ErrorCode::PermissionDenied);
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn residency_of_own_memory_names_the_node_of_each_page() {
    let path = server("residency", LIMITS);
    let mut c = Client::connect_to(&path).unwrap();
    // Four pages, two touched.
    let mut v = vec![0u8; 8 * 4096];
    let base = (v.as_mut_ptr() as usize).next_multiple_of(4096);
    let off = base - v.as_ptr() as usize;
    v[off] = 1;
    v[off + 2 * 4096] = 1;
    let pages = c.residency(base, 4 * 4096).unwrap();
    assert_eq!(pages.len(), 4);
    // Node 0 (or whichever node this host put them on).
    assert!(pages[0].node().is_some(), "{:?}", pages[0]);
    assert!(pages[2].node().is_some(), "{:?}", pages[2]);
    assert!(matches!(
        pages[0],
        Page::Resident {
            compressed: None,
            ..
        }
    ));
    // Not mapped at all: page 0 of the address space.
    let unmapped = c.residency(0, 4096).unwrap();
    assert_eq!(unmapped, vec![Page::NotMapped]);
    // Unaligned: refused by the library before the server.
    assert!(matches!(
        c.residency(base + 1, 4096),
        Err(Error::Invalid(_))
    ));
    // Normal advice moves nothing and answers for every page.
    let r = c.advise(base, 4 * 4096, Advice::Normal).unwrap();
    assert_eq!((r.pages, r.moved), (4, 0));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn requests_over_the_rate_limit_are_refused_busy() {
    let path = server(
        "rate",
        Limits {
            requests_per_s: 1,
            advise_bytes_per_s: 1 << 30,
        },
    );
    let mut c = Client::connect_to(&path).unwrap();
    let v = vec![0u8; 2 * 4096];
    let base = (v.as_ptr() as usize).next_multiple_of(4096);
    // One request per second: of three in a row, at least one is refused
    // (whatever the host's load, they take well under two seconds).
    let busy = (0..3)
        .filter_map(|_| c.residency(base, 4096).err())
        .map(|e| match e {
            Error::Refused { code, errno, .. } => (code, errno),
            other => panic!("{other}"),
        })
        .collect::<Vec<_>>();
    assert!(!busy.is_empty());
    assert!(busy.iter().all(|&b| b == (ErrorCode::Busy, -libc::EAGAIN)));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn another_process_needs_cap_sys_nice_and_the_right_to_ptrace_it() {
    let nice = 1 << 23;
    let ptrace = 1 << 19;
    let eperm = Err((-libc::EPERM, ErrorCode::PermissionDenied));
    assert_eq!(may_advise_other(0, true), eperm);
    assert_eq!(may_advise_other(ptrace, true), eperm);
    assert_eq!(may_advise_other(nice, true), Ok(()));
    assert_eq!(may_advise_other(nice, false), eperm);
    assert_eq!(may_advise_other(nice | ptrace, false), Ok(()));
}

#[test]
fn a_process_of_the_same_user_may_be_advised_with_cap_sys_nice() {
    use std::os::fd::AsFd as _;
    let caps = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    let path = server("other", LIMITS);
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let p = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).unwrap();
    let mut c = Client::connect_to(&path).unwrap();
    let r = c.advise_process(fd.as_fd(), 0x1000, 4096, Advice::Normal);
    child.kill().unwrap();
    child.wait().unwrap();
    if caps & (1 << 23) != 0 {
        assert_eq!(r.unwrap().pages, 1);
    } else {
        assert!(
            matches!(
                r,
                Err(Error::Refused {
                    code: ErrorCode::PermissionDenied,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    std::fs::remove_file(&path).unwrap();
}
