//! End-to-end tests of the `difftrain` binary.

use std::process::Command;

fn difftrain(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_difftrain"))
        .args(args)
        .output()
        .expect("running difftrain");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn info_reports_adapter_limits_and_features() {
    let (ok, out, err) = difftrain(&["info"]);
    assert!(ok, "difftrain info failed: {err}");
    for needle in [
        "selected:",
        "backend:",
        "max storage buffer binding",
        "shader-f16",
        "subgroups",
    ] {
        assert!(out.contains(needle), "'{needle}' missing from:\n{out}");
    }
}

#[test]
fn bench_ops_prints_a_table() {
    let (ok, out, err) = difftrain(&["bench", "ops", "--filter", "matmul", "--iters", "1"]);
    assert!(ok, "bench failed: {err}");
    assert!(
        out.contains("median ms") && out.contains("GFLOP/s"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("matmul")).count(),
        3,
        "one row per dtype:\n{out}"
    );
}

#[test]
fn bad_input_gives_clear_errors() {
    let (ok, _, err) = difftrain(&["bench", "ops", "--filter", "no-such-op"]);
    assert!(!ok && err.contains("no benchmark matches"), "{err}");
    let (ok, _, err) = difftrain(&["--backend", "quantum", "info"]);
    assert!(!ok && err.contains("unknown backend 'quantum'"), "{err}");
    let (ok, _, err) = difftrain(&["--adapter", "no-such-gpu-xyz", "info"]);
    assert!(!ok && err.contains("no-such-gpu-xyz"), "{err}");
}
