//! The uapi header and the Rust mirror agree on every size, offset, field
//! width, opcode and flag.  Change one side alone and this test fails.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};

use mm_upcall_abi_test::c_side;
use mm_upcall_proto::raw::{self, *};

fn width<T, F>(_: fn(&T) -> &F) -> u64 {
    size_of::<F>() as u64
}

macro_rules! structs {
    ($m:ident; $($c:literal => $ty:ty { $($f:ident),* $(,)? })*) => {$(
        $m.insert(format!("sizeof({})", $c), size_of::<$ty>() as u64);
        $(
            let name = stringify!($f).trim_start_matches("r#");
            $m.insert(format!("{}.{}", $c, name), offset_of!($ty, $f) as u64);
            $m.insert(format!("{}.{}.size", $c, name), width(|s: &$ty| &s.$f));
        )*
    )*};
}

fn rust_side() -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    structs! { m;
        "desc" => Desc { op, flags, nid, cpu_nid, order, seq, tgid, tid, pfn, vaddr, arg, reserved }
        "io_cmd" => IoCmd { q_id, slot, verdict, reserved, seq, arg }
        "event" => Event { r#type, reason, nid, target_nid, order, tgid, pfn, vaddr, count }
        "hello" => Hello { api_version, nr_queues, queue_depth, reserved0, timeout_ms, reserved1, features, reply_addr }
        "hello_reply" => HelloReply { api_version, nr_queues, queue_depth, desc_size, timeout_ms, reserved0, features, reserved1 }
        "attach_node" => AttachNode { nid, flags, credit_pages, reply_addr, reserved }
        "node_info" => NodeInfo { nid, reserved0, start_pfn, spanned_pages, present_pages, mmap_offset, reserved1 }
        "detach_node" => DetachNode { nid, flags, reserved }
        "set_credit" => SetCredit { nid, flags, pages }
        "set_standing" => SetStanding { nid, verdict, flags, arg, reserved }
        "promote_pfn" => PromotePfn { pfn, nid, flags }
        "resync" => Resync { nid, flags, start_pfn, nr_pages, reserved }
        "ping" => Ping { nr_upcalls, nr_threads, flags, reply_addr, reserved }
        "ping_reply" => PingReply { issued, answered, mismatched, timed_out, defaulted, total_ns, max_ns, reserved, hist }
    }
    let consts: &[(&str, u64)] = &[
        ("MM_UPCALL_API_VERSION", API_VERSION.into()),
        ("MM_UPCALL_F_ALL", Features::ALL.bits()),
        ("MM_UPCALL_MAX_QUEUES", MAX_QUEUES.into()),
        ("MM_UPCALL_MAX_QUEUE_DEPTH", MAX_QUEUE_DEPTH.into()),
        ("MM_UPCALL_MIN_TIMEOUT_MS", MIN_TIMEOUT_MS.into()),
        ("MM_UPCALL_MAX_TIMEOUT_MS", MAX_TIMEOUT_MS.into()),
        ("MM_UPCALL_DEFAULT_TIMEOUT_MS", DEFAULT_TIMEOUT_MS.into()),
        ("MM_UPCALL_IOC_MAGIC", IOC_MAGIC.into()),
        ("MM_UPCALL_IO_FETCH", io_op::FETCH.into()),
        (
            "MM_UPCALL_IO_COMMIT_AND_FETCH",
            io_op::COMMIT_AND_FETCH.into(),
        ),
        ("MM_UPCALL_CTRL_CMD_SIZE", CTRL_CMD_SIZE as u64),
        ("MM_UPCALL_OP_WRITE_FAULT", op::WRITE_FAULT.into()),
        ("MM_UPCALL_OP_HINT_FAULT", op::HINT_FAULT.into()),
        ("MM_UPCALL_OP_DEMOTE_CREDIT", op::DEMOTE_CREDIT.into()),
        ("MM_UPCALL_OP_PING", op::PING.into()),
        ("MM_UPCALL_DESC_F_ALL", DescFlags::ALL.bits().into()),
        ("MM_UPCALL_V_NONE", raw::verdict::NONE.into()),
        ("MM_UPCALL_V_PROMOTE", raw::verdict::PROMOTE.into()),
        (
            "MM_UPCALL_V_ALLOW_IN_PLACE",
            raw::verdict::ALLOW_IN_PLACE.into(),
        ),
        ("MM_UPCALL_V_STAY", raw::verdict::STAY.into()),
        ("MM_UPCALL_V_GRANT", raw::verdict::GRANT.into()),
        ("MM_UPCALL_V_DENY", raw::verdict::DENY.into()),
        ("MM_UPCALL_V_DEFAULT", raw::verdict::DEFAULT.into()),
        ("MM_UPCALL_V_PONG", raw::verdict::PONG.into()),
        ("MM_UPCALL_EV_PLACED", ev::PLACED.into()),
        ("MM_UPCALL_EV_FREED", ev::FREED.into()),
        ("MM_UPCALL_EV_PROMOTED", ev::PROMOTED.into()),
        ("MM_UPCALL_EV_OVERFLOW", ev::OVERFLOW.into()),
        ("MM_UPCALL_EV_PING", ev::PING.into()),
        ("MM_UPCALL_PING_F_EVENTS", ping::F_EVENTS.into()),
        ("MM_UPCALL_PING_F_ALL", ping::F_ALL.into()),
        ("MM_UPCALL_PING_MAX_UPCALLS", ping::MAX_UPCALLS.into()),
        ("MM_UPCALL_PING_MAX_THREADS", ping::MAX_THREADS.into()),
        ("MM_UPCALL_PING_MAX_SECS", ping::MAX_SECS.into()),
        ("MM_UPCALL_PING_HIST_BUCKETS", ping::HIST_BUCKETS as u64),
        ("MM_UPCALL_REASON_DEMOTION", reason::DEMOTION.into()),
        ("MM_UPCALL_REASON_MIGRATION", reason::MIGRATION.into()),
        ("MM_UPCALL_REASON_RESYNC", reason::RESYNC.into()),
        ("MM_UPCALL_DESC_OFFSET_BASE", DESC_OFFSET_BASE),
        ("MM_UPCALL_DESC_QUEUE_STRIDE", DESC_QUEUE_STRIDE),
        ("MM_UPCALL_NODE_OFFSET_BASE", NODE_OFFSET_BASE),
        ("MM_UPCALL_DESC_OFFSET(3)", desc_offset(3)),
    ];
    for (k, v) in consts {
        m.insert((*k).to_string(), *v);
    }
    // Every feature bit, by the name bitflags gives it.
    for (name, f) in Features::all().iter_names() {
        m.insert(format!("MM_UPCALL_F_{name}"), f.bits());
    }
    for (name, f) in DescFlags::all().iter_names() {
        m.insert(format!("MM_UPCALL_DESC_F_{name}"), f.bits().into());
    }
    for (op, name) in ctrl_op::ALL {
        m.insert(format!("MM_UPCALL_CMD_{name}"), op.into());
    }
    m
}

#[test]
fn rust_mirror_matches_the_uapi_header() {
    let c = c_side();
    let rust = rust_side();
    let mut problems = Vec::new();
    for (k, cv) in &c {
        match rust.get(k) {
            None => problems.push(format!("{k}: in the header ({cv:#x}) but not in proto")),
            Some(rv) if rv != cv => problems.push(format!("{k}: header {cv:#x}, proto {rv:#x}")),
            Some(_) => {}
        }
    }
    for k in rust.keys().filter(|k| !c.contains_key(*k)) {
        problems.push(format!("{k}: in proto but not exported by abi.c"));
    }
    assert!(c.len() > 150, "abi.c exported only {} entries", c.len());
    assert!(
        problems.is_empty(),
        "ABI mismatch:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_record_is_a_multiple_of_eight_bytes() {
    for (k, v) in c_side().iter().filter(|(k, _)| k.starts_with("sizeof(")) {
        assert_eq!(v % 8, 0, "{k} = {v}");
    }
}
