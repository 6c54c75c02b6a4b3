//! `mm-guest <scenario>`: the test programs that run inside the QEMU guest.
//!
//! Started by the test bed's `/init` (see `xtask vm`), as root, chrooted
//! into the host root mounted read-only over 9p.  Exit status 0 means the
//! scenario passed; on failure the reason is printed as
//! `mm-guest: FAIL: <reason>` and the exit status is 1.

#![deny(unsafe_code)]

mod bad_input;
mod bench;
mod fence;
mod holes;
mod managed;
mod node;
mod server;
mod sys;
mod topology;
mod upcall;

use anyhow::{Result, bail};

/// Every scenario the guest knows, in the order `xtask test` runs them.
pub const SCENARIOS: &[&str] = &[
    "topology",
    "upcall-ping",
    "upcall-server-death",
    "upcall-slow-server",
    "upcall-bad-input",
    "upcall-c-client",
    "node-mmap",
    "isolation",
    "credit",
    "demote-write-promote",
    "write-fence",
    "resync",
    "fault-no-server",
    "fence-holes",
    "no-hang",
    "isolation-paths",
    "server-e2e",
    "server-restart",
    "capacity-adversarial",
];

fn run(scenario: &str) -> Result<()> {
    match scenario {
        "topology" => topology::run(),
        "upcall-ping" => upcall::ping(),
        "upcall-server-death" => upcall::server_death(),
        "upcall-slow-server" => upcall::slow_server(),
        "upcall-bad-input" => bad_input::run(),
        "upcall-c-client" => upcall::c_client(),
        "node-mmap" => node::run(),
        "isolation" => fence::isolation(),
        "credit" => fence::credit(),
        "demote-write-promote" => fence::demote_write_promote(),
        "write-fence" => fence::write_fence(),
        "resync" => fence::resync(),
        "fault-no-server" => fence::fault_no_server(),
        "fence-holes" => holes::fence_holes(),
        "no-hang" => holes::no_hang(),
        "isolation-paths" => holes::isolation_paths(),
        "server-e2e" => server::e2e(),
        "server-restart" => server::restart(),
        "capacity-adversarial" => server::adversarial(),
        // Benchmarks (`xtask bench <name>`), not part of the test list.
        "bench-upcall" => bench::upcall(),
        "bench-fault" => bench::fault(),
        "bench-anon" => bench::anon(),
        // Used by `xtask demo`: print what the guest sees, assert nothing.
        "show-topology" => topology::show(),
        // `xtask demo`: the topology, then the transport at work.
        "demo" => topology::show()
            .and_then(|()| upcall::demo())
            .and_then(|()| server::demo()),
        other => bail!(
            "unknown scenario `{other}` (known: {})",
            SCENARIOS.join(", ")
        ),
    }
}

fn main() {
    let scenario = std::env::args().nth(1).unwrap_or_default();
    if scenario == "--serve" {
        // A server child of upcall-server-death, or the managed-node test
        // server.
        let mode = std::env::args().nth(2).unwrap_or_default();
        let rest: Vec<String> = std::env::args().skip(3).collect();
        let served = if mode == "managed" {
            managed::serve(&rest)
        } else {
            upcall::serve(&mode)
        };
        if let Err(e) = served {
            println!("mm-guest: server {mode}: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if scenario == "--helper" {
        // A helper process of the `fence-holes` and `no-hang` scenarios.
        let what = std::env::args().nth(2).unwrap_or_default();
        if let Err(e) = holes::helper(&what) {
            println!("mm-guest: helper {what}: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if scenario == "--list" {
        // `xtask` asks the guest program which scenarios exist.
        for s in SCENARIOS {
            println!("{s}");
        }
        return;
    }
    match run(&scenario) {
        Ok(()) => println!("mm-guest: PASS {scenario}"),
        Err(e) => {
            println!("mm-guest: FAIL: {e:#}");
            std::process::exit(1);
        }
    }
}
