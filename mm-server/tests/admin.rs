//! The admin socket, in process: the frames it answers, what it refuses,
//! and the metrics text.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use mm_server::admin;
use mm_server::metrics::{self, NodeCounters, NodeGauges, Snapshot};
use mm_upcall_client::AdminClient;
use mm_upcall_proto::socket::{ErrorCode, Frame, HEADER_SIZE, MAX_FRAME_SIZE};

fn snapshot() -> Snapshot {
    let mut s = Snapshot::default();
    s.metrics.write_faults = 7;
    s.metrics.credit_requests = 2;
    s.metrics.latency.observe(300);
    s.metrics.latency.observe(40_000);
    s.decisions.promote = 7;
    s.decisions.deny = 1;
    s.nodes.push((
        NodeGauges {
            nid: 1,
            start_pfn: 0x40000,
            spanned_pages: 262144,
            capacity: 1 << 29,
            used: 1 << 20,
            reserved: 0,
            credit: 0,
            resident: 1024,
            set_hash: 0x1234,
            zero: 10,
            level: 0,
            state: 0,
            standing: 1,
        },
        NodeCounters {
            demoted: 1024,
            evictions: 3,
            ..NodeCounters::default()
        },
    ));
    s
}

/// A socket served to this test's own uid, so that every check runs
/// whether the tests run as root or not (the daemon serves root only).
fn server(name: &str) -> PathBuf {
    server_for(name, my_uid())
}

fn server_for(name: &str, uid: u32) -> PathBuf {
    let path = std::env::temp_dir().join(format!("mm-admin-{name}-{}.sock", std::process::id()));
    let l = admin::bind(&path).unwrap();
    admin::spawn_for(l, Arc::new(Mutex::new(Arc::new(snapshot()))), uid, None).unwrap();
    path
}

fn my_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap()
}

#[test]
fn other_users_are_refused() {
    let path = server_for("refused", my_uid().wrapping_add(1));
    let err = AdminClient::connect(&path).unwrap_err().to_string();
    assert!(err.contains("PermissionDenied"), "{err}");
    std::fs::remove_file(&path).unwrap();
}

fn send(s: &mut UnixStream, f: Frame) {
    let mut buf = [0u8; MAX_FRAME_SIZE];
    let n = f.encode(&mut buf);
    s.write_all(&buf[..n]).unwrap();
}

fn hello(s: &mut UnixStream) {
    send(
        s,
        Frame::Hello {
            min_version: 1,
            max_version: 1,
            features: 0,
        },
    );
}

fn reply(s: &mut UnixStream) -> Frame {
    let mut buf = vec![0u8; HEADER_SIZE];
    s.read_exact(&mut buf).unwrap();
    let (_, total) = Frame::decode_header(&buf).unwrap();
    buf.resize(total, 0);
    s.read_exact(&mut buf[HEADER_SIZE..]).unwrap();
    Frame::decode(&buf).unwrap().0
}

#[test]
fn metrics_and_stats_over_the_socket() {
    let path = server("ok");
    let mut c = AdminClient::connect(&path).unwrap();
    let text = c.metrics().unwrap();
    assert_eq!(
        metrics::sample(&text, "mm_server_upcalls_total{kind=\"write_fault\"}"),
        Some(7.0)
    );
    assert_eq!(
        metrics::sample(&text, "mm_server_resident_pages{nid=\"1\"}"),
        Some(1024.0)
    );
    assert_eq!(
        metrics::sample(&text, "mm_server_verdict_latency_seconds_count"),
        Some(2.0)
    );
    assert_eq!(
        metrics::sample(
            &text,
            "mm_server_verdict_latency_seconds_bucket{le=\"0.0000005\"}"
        ),
        Some(1.0)
    );
    // Every sample line is `name{labels} value` with a numeric value.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, v) = l.rsplit_once(' ').unwrap();
        assert!(v.parse::<f64>().is_ok(), "{l}");
    }
    let st = c.stats().unwrap();
    assert_eq!(st.write_faults, 7);
    assert_eq!(st.upcalls, 9);
    assert_eq!(st.denials, 1);
    assert_eq!(st.evictions, 3);
    assert_eq!(st.resident_pages, 1024);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn hostile_clients_get_errors_not_hangs() {
    let path = server("hostile");
    let expect_error = |bytes: &[u8], want: ErrorCode| {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(bytes).unwrap();
        match reply(&mut s) {
            Frame::Error { code, .. } => assert_eq!(code, want, "for {bytes:?}"),
            other => panic!("{other:?} for {bytes:?}"),
        }
    };
    // Garbage, a bad magic, a request before Hello, a reply as a request.
    expect_error(&[0xff; 16], ErrorCode::BadFrame);
    let mut buf = [0u8; MAX_FRAME_SIZE];
    let n = Frame::Stats.encode(&mut buf);
    expect_error(&buf[..n], ErrorCode::BadFrame);
    let n = Frame::Hello {
        min_version: 7,
        max_version: 9,
        features: 0,
    }
    .encode(&mut buf);
    expect_error(&buf[..n], ErrorCode::BadVersion);
    // A MetricsReply header claiming a megabyte: refused before reading it.
    let n = Frame::MetricsReply { len: 1 << 20 }.encode(&mut buf);
    expect_error(&buf[..n], ErrorCode::BadFrame);

    // Advice is for the client socket: a clear Unsupported, and the
    // connection stays usable.
    let mut s = UnixStream::connect(&path).unwrap();
    hello(&mut s);
    assert!(matches!(
        reply(&mut s),
        Frame::HelloReply { version: 1, .. }
    ));
    send(
        &mut s,
        Frame::Residency {
            pid: 0,
            addr: 0,
            len: 4096,
        },
    );
    assert!(matches!(
        reply(&mut s),
        Frame::Error {
            code: ErrorCode::Unsupported,
            ..
        }
    ));
    send(&mut s, Frame::Stats);
    assert!(matches!(reply(&mut s), Frame::StatsReply(_)));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_second_server_cannot_take_a_live_socket() {
    let path = server("twice");
    let err = admin::bind(&path).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("stop it first"), "{err}");
    std::fs::remove_file(&path).unwrap();
    // A stale socket file (nobody listening) is replaced.
    let stale = std::env::temp_dir().join(format!("mm-admin-stale-{}.sock", std::process::id()));
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    admin::bind(&stale).unwrap();
    std::fs::remove_file(&stale).unwrap();
}

/// `MAX_CLIENTS` connections that said HELLO and then nothing, and one
/// that trickles half a frame, do not lock a new client out: the
/// connection that has waited longest for a frame is closed for it.
#[test]
fn idle_and_trickling_clients_cannot_lock_others_out() {
    let path = server("crowd");
    let mut idle = Vec::new();
    for _ in 0..admin::MAX_CLIENTS - 1 {
        let mut s = UnixStream::connect(&path).unwrap();
        hello(&mut s);
        assert!(matches!(reply(&mut s), Frame::HelloReply { .. }));
        idle.push(s);
    }
    // The last slot: a client trickling the first bytes of a header.
    let mut trickler = UnixStream::connect(&path).unwrap();
    trickler.write_all(&[0u8; 3]).unwrap();
    for round in 0..3 {
        let mut c = AdminClient::connect(&path)
            .unwrap_or_else(|e| panic!("round {round}: a new client was refused: {e:#}"));
        assert!(c.metrics().is_ok(), "round {round}");
    }
    // At least the first newcomer needed room (the later ones may find
    // the slot of an earlier one free): the clients that made it were
    // closed and read end of file.
    let mut closed = 0;
    for s in idle.iter_mut().chain(std::iter::once(&mut trickler)) {
        s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0)) {
            closed += 1;
        }
    }
    assert!(
        closed >= 1,
        "no waiting client was closed for the newcomers"
    );
    std::fs::remove_file(&path).unwrap();
}
