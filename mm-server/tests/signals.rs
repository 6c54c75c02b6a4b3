//! The server's signal handling: SIGINT, SIGTERM and SIGUSR2 each write a
//! byte the event loop reads (and so start the stop), SIGUSR2 after
//! setting the flag that keeps the nodes managed; SIGHUP is ignored.
//! (Each test binary is its own process; nextest runs each test in its
//! own process too.)

use std::time::Duration;

use mm_server::sys::{drain_signals, stop_signals};

fn raise(sig: i32) {
    rustix::process::kill_process(
        rustix::process::getpid(),
        rustix::process::Signal::from_named_raw(sig).expect("a signal"),
    )
    .expect("kill");
}

#[test]
fn sigterm_and_sigint_are_counted_and_sighup_is_ignored() {
    let s = stop_signals().expect("handlers").socket;
    raise(signal_hook::consts::SIGHUP);
    std::thread::sleep(Duration::from_millis(50));
    // Still here (SIGHUP's default would have ended the process), and no
    // stop was signalled.
    assert_eq!(drain_signals(&s), 0, "SIGHUP must not stop the server");
    raise(signal_hook::consts::SIGTERM);
    raise(signal_hook::consts::SIGINT);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(drain_signals(&s), 2, "one stop per SIGTERM/SIGINT");
}

#[test]
fn sigusr2_stops_and_keeps_the_nodes() {
    let s = stop_signals().expect("handlers");
    assert!(!s.keep_nodes.load(std::sync::atomic::Ordering::Relaxed));
    raise(signal_hook::consts::SIGUSR2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(drain_signals(&s.socket), 1, "SIGUSR2 stops the server");
    assert!(
        s.keep_nodes.load(std::sync::atomic::Ordering::Relaxed),
        "SIGUSR2 keeps the nodes managed"
    );
}
