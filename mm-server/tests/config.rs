//! `mm-server --check-config` on good and hostile configurations: every
//! error says what to fix and the exit code is non-zero.

use std::path::PathBuf;
use std::process::Command;

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("mm-server-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (n, cpus) in [(0, "0-1\n"), (1, "\n")] {
            let node = dir.join(format!("sys/devices/system/node/node{n}"));
            std::fs::create_dir_all(&node).unwrap();
            std::fs::write(node.join("cpulist"), cpus).unwrap();
        }
        Self { dir }
    }

    fn check(&self, toml: &str) -> (bool, String) {
        let cfg = self.dir.join("mm-server.toml");
        std::fs::write(&cfg, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mm-server"))
            .arg("--check-config")
            .arg("--config")
            .arg(&cfg)
            .arg("--sysfs-root")
            .arg(self.dir.join("sys"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const GOOD: &str = r#"
[server]
device = "/dev/null"

[[node]]
nid = 1
capacity_mib = 512
"#;

fn fails_with(name: &str, toml: &str, needle: &str) {
    let f = Fixture::new(name);
    let (ok, text) = f.check(toml);
    assert!(!ok, "{name}: accepted:\n{text}");
    assert!(
        text.contains(needle),
        "{name}: message does not say `{needle}`:\n{text}"
    );
    assert!(text.starts_with("mm-server: "), "{name}: {text}");
}

#[test]
fn a_good_config_checks_out() {
    let f = Fixture::new("good");
    let (ok, text) = f.check(GOOD);
    assert!(ok, "{text}");
    assert!(
        text.contains("ok (1 managed node, device /dev/null)"),
        "{text}"
    );
}

#[test]
fn malformed_toml_names_the_line() {
    fails_with("malformed", "[[node]\nnid = 1", "line 1");
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    fails_with(
        "unknown",
        &format!("{GOOD}\n[policy]\nwritable_budgte = 3\n"),
        "writable_budgte",
    );
}

#[test]
fn impossible_watermarks_say_the_rule() {
    fails_with(
        "watermarks",
        "[server]\ndevice = \"/dev/null\"\n[[node]]\nnid = 1\ncapacity_mib = 64\nwatermarks = { low = 90, high = 80, critical = 95 }\n",
        "0 < low < high < critical <= 100",
    );
}

#[test]
fn a_node_that_does_not_exist_is_named() {
    fails_with(
        "missing-node",
        "[server]\ndevice = \"/dev/null\"\n[[node]]\nnid = 7\ncapacity_mib = 64\n",
        "node 7 does not exist",
    );
}

#[test]
fn a_node_with_cpus_cannot_be_managed() {
    fails_with(
        "cpu-node",
        "[server]\ndevice = \"/dev/null\"\n[policy]\nfast_nodes = [1]\n[[node]]\nnid = 0\ncapacity_mib = 64\n",
        "node 0 has CPUs",
    );
}

#[test]
fn a_missing_device_says_which_kernel_to_boot() {
    fails_with(
        "missing-device",
        "[server]\ndevice = \"/nonexistent/mm_upcall\"\n[[node]]\nnid = 1\ncapacity_mib = 64\n",
        "CONFIG_MM_UPCALL=y",
    );
}

#[test]
fn no_nodes_is_an_error() {
    fails_with(
        "no-nodes",
        "[server]\ndevice = \"/dev/null\"\n",
        "add at least one managed node",
    );
}

#[test]
fn a_missing_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_mm-server"))
        .args(["--check-config", "--config", "/nonexistent/mm-server.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read config file /nonexistent/mm-server.toml"),
        "{err}"
    );
}

#[test]
fn serving_on_a_device_that_is_not_mm_upcall_fails_and_says_which() {
    // /dev/null is a character device, so the checks pass; opening it as
    // the upcall transport cannot.
    let f = Fixture::new("serve");
    let cfg = f.dir.join("mm-server.toml");
    let sock = f.dir.join("admin.sock");
    std::fs::write(
        &cfg,
        GOOD.replace(
            "[server]",
            &format!("[server]\nadmin_socket = \"{}\"", sock.display()),
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mm-server"))
        .arg("--config")
        .arg(&cfg)
        .arg("--sysfs-root")
        .arg(f.dir.join("sys"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot open /dev/null"), "{err}");
    assert!(!sock.exists(), "the admin socket outlived the server");
}

#[test]
fn metrics_without_a_server_says_what_is_wrong() {
    let f = Fixture::new("metrics");
    let out = Command::new(env!("CARGO_BIN_EXE_mm-server"))
        .args(["metrics", "--socket"])
        .arg(f.dir.join("nothing.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is mm-server running"), "{err}");
}

#[test]
fn the_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/mm-server.example.toml");
    let cfg = mm_server::config::Config::load(std::path::Path::new(path)).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.node[0].nid, 1);
    assert_eq!(cfg.policy().writable_budget, 0);
}

#[test]
fn tenants_are_checked_and_each_error_says_what_to_fix() {
    let tenant = |body: &str| format!("{GOOD}\n[[tenant]]\n{body}\n");
    fails_with(
        "tenant-path",
        &tenant("cgroup = \"/tmp/batch\"\nmax_mib = 8"),
        "must be an absolute path below the cgroup2 mount",
    );
    fails_with(
        "tenant-dotdot",
        &tenant("cgroup = \"/sys/fs/cgroup/../../etc\"\nmax_mib = 8"),
        "must be an absolute path below the cgroup2 mount",
    );
    fails_with(
        "tenant-root",
        &tenant("cgroup = \"/sys/fs/cgroup/\"\nmax_mib = 8"),
        "must be an absolute path below the cgroup2 mount",
    );
    fails_with(
        "tenant-zero",
        &tenant("cgroup = \"/sys/fs/cgroup/batch\"\nmax_mib = 0"),
        "max_mib must be at least 1",
    );
    fails_with(
        "tenant-twice",
        &format!(
            "{}\n[[tenant]]\ncgroup = \"/sys/fs/cgroup/batch\"\nmax_mib = 9\n",
            tenant("cgroup = \"/sys/fs/cgroup/batch\"\nmax_mib = 8")
        ),
        "/sys/fs/cgroup/batch is configured twice",
    );
    fails_with(
        "tenant-missing",
        &tenant("cgroup = \"/sys/fs/cgroup/mm-server-no-such-tenant\"\nmax_mib = 8"),
        "is not a cgroup directory; create it (mkdir)",
    );
    fails_with(
        "tenant-typo",
        &tenant("cgroup = \"/sys/fs/cgroup/batch\"\nmax_mb = 8"),
        "max_mb",
    );
}
