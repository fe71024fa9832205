//! The mock upstream, as a process of its own.
//!
//! `mock-upstream` is a binary of this crate, so the tests of other crates cannot name it with
//! `CARGO_BIN_EXE_…`. [`mock_upstream_bin`] finds it beside the running test's own executable
//! (`target/<profile>/mock-upstream`, where `cargo test --workspace` puts it: this crate has an
//! integration test, so cargo builds its binaries with the others). When it is missing there or
//! older than its sources, it asks cargo to build it (`$CARGO build -p bulkhead-testkit --bin
//! mock-upstream`) and takes the path cargo reports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// The binary's name.
const NAME: &str = "mock-upstream";

/// The path of an up-to-date `mock-upstream` binary, built when needed (once per process).
pub fn mock_upstream_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match beside_this_test() {
        Some(path) if !stale(&path) => path,
        _ => cargo_build(),
    })
    .clone()
}

/// `target/<profile>/mock-upstream` for a test running from `target/<profile>/deps/`.
fn beside_this_test() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let path = profile_dir.join(format!("{NAME}{}", std::env::consts::EXE_SUFFIX));
    path.is_file().then_some(path)
}

/// The files the binary is built from, besides the dependencies that `Cargo.lock` pins.
fn sources() -> Vec<PathBuf> {
    let krate = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = vec![krate.join("Cargo.toml"), krate.join("../../Cargo.lock")];
    let mut dirs = vec![krate.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Whether the binary at `path` is older than one of its sources.
fn stale(path: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = modified(path) else { return true };
    sources().iter().filter_map(|p| modified(p)).any(|m: SystemTime| m > built)
}

/// Builds the binary with the cargo running this test (`CARGO`, else `cargo` on the `PATH`) and
/// returns the path cargo reports for it.
fn cargo_build() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cmd = std::process::Command::new(&cargo);
    cmd.args(["build", "--locked", "--message-format=json-render-diagnostics", "-p", "bulkhead-testkit"])
        .args(["--bin", NAME, "--manifest-path"])
        .arg(&manifest);
    // A test built with `--release` gets a release build beside it.
    let release = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.file_name().map(|n| n == "release"))
        .unwrap_or(false);
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {} to build {NAME}: {e}", cargo.to_string_lossy()));
    assert!(
        out.status.success(),
        "`cargo build -p bulkhead-testkit --bin {NAME}` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let executable = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == NAME)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from));
    executable.unwrap_or_else(|| panic!("cargo built {NAME} but did not say where it is"))
}

/// Starts `mock-upstream` on an ephemeral loopback port (the process is killed when the returned
/// child is dropped); returns it and its base URL, `http://127.0.0.1:PORT`.
pub async fn start_mock_upstream() -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let bin = tokio::task::spawn_blocking(mock_upstream_bin).await.expect("find or build mock-upstream");
    let mut child = tokio::process::Command::new(&bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let out = child.stdout.take().expect("mock stdout");
    let line = tokio::time::timeout(Duration::from_secs(60), tokio::io::BufReader::new(out).lines().next_line())
        .await
        .expect("mock-upstream printed its address in time")
        .expect("read mock stdout")
        .expect("a line");
    let base = line.rsplit(' ').next().expect("address").to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "mock address: {line}");
    (child, base)
}
