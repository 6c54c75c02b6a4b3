//! `mmctl` as a user runs it, with no server: exit codes, the man page,
//! completions and the errors it prints.

use std::process::Command;

fn mmctl(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_mmctl"))
        .args([
            "--socket",
            "/nonexistent/mm.sock",
            "--admin-socket",
            "/nonexistent/a.sock",
        ])
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn no_server_is_exit_4_with_what_to_do() {
    let (code, out, _) = mmctl(&["status"]);
    assert_eq!(code, 4);
    assert!(out.contains("is mm-server running"), "{out}");
    let (code, _, err) = mmctl(&["stats", "--json"]);
    assert_eq!(code, 4);
    assert!(err.contains("/nonexistent/a.sock"), "{err}");
    let (code, json, _) = mmctl(&["status", "--json"]);
    assert_eq!(code, 4);
    assert!(json.contains("\"server\": false"), "{json}");
}

#[test]
fn bad_usage_is_exit_2() {
    assert_eq!(
        mmctl(&["advise", "--pid", "1", "0x1000", "12Q", "cold"]).0,
        2
    );
    assert_eq!(mmctl(&["no-such-command"]).0, 2);
}

#[test]
fn man_page_and_completions_come_from_the_cli_definition() {
    let (code, man, _) = mmctl(&["man"]);
    assert_eq!(code, 0);
    assert!(man.contains(".TH mmctl"), "{man}");
    assert!(man.contains("doctor"), "{man}");
    let (code, bash, _) = mmctl(&["completions", "bash"]);
    assert_eq!(code, 0);
    assert!(
        bash.contains("mmctl") && bash.contains("residency"),
        "{bash}"
    );
}
