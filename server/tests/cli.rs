//! The `seedling` command line as a user meets it, through the real binary:
//! help texts, enum flags that list their values and suggest on a typo,
//! negative numbers, a closed pipe, progress lines in a log, and a model
//! exported for Python that scores the same as `seedling eval`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_seedling");

fn seedling(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A training text, and a two-layer run on it (BPTT, a few steps) with a
/// head per input character: the shapes an export must get right.
fn tiny_run(dir: &Path) -> (PathBuf, PathBuf, Output) {
    let data = dir.join("book.txt");
    std::fs::write(
        &data,
        "It is a truth universally acknowledged, that a single man in possession \
         of a good fortune, must be in want of a wife.\n"
            .repeat(60),
    )
    .unwrap();
    let run = dir.join("run");
    let out = seedling(&[
        "train",
        "--method",
        "bptt",
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--hidden",
        "8",
        "--layers",
        "2",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--max-steps",
        "5",
        "--sample",
        "0",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    (data, run, out)
}

#[test]
fn top_level_help_describes_seedling_for_a_user() {
    let out = seedling(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(help.contains("volunteers donate"), "{help}");
    assert!(help.contains("seedling train --minutes"), "{help}");
    assert!(
        help.contains("export") && help.contains("docs/seedling.example.toml"),
        "{help}"
    );
}

#[test]
fn enum_flags_list_their_values_and_a_typo_exits_2_with_a_suggestion() {
    let help = text(&seedling(&["train", "-h"]).stdout);
    for values in [
        "lowrank, full",
        "constant, cosine, step",
        "ranks, zscores",
        "exact, es",
        "by-input, shared",
        "seen, all",
    ] {
        assert!(help.contains(values), "{values} missing from:\n{help}");
    }
    // Grouped under headings.
    for heading in [
        "Model:",
        "Evolution strategies:",
        "Optimizer:",
        "Server:",
        "Train:",
    ] {
        assert!(help.contains(heading), "{heading} missing from:\n{help}");
    }
    let out = seedling(&["train", "--schedule", "cosin"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("invalid value 'cosin'") && err.contains("cosine"),
        "{err}"
    );
    let out = seedling(&["plot", "--checkpoint", "x", "--x", "token"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("tokens"));
    // The old spelling of low-rank noise still parses.
    let out = seedling(&["train", "--noise", "low-rank", "--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_negative_temperature_is_a_value_with_a_clear_error() {
    let out = seedling(&["generate", "--checkpoint", "nowhere", "--temperature", "-1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("invalid value '-1'") && err.contains("must be a finite number >= 0"),
        "{err}"
    );
}

#[test]
fn train_logs_progress_lines_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, out) = tiny_run(dir.path());
    let err = text(&out.stderr);
    let last = err
        .lines()
        .rfind(|l| l.contains("steps/s"))
        .unwrap_or_else(|| panic!("no progress line in:\n{err}"));
    assert!(
        last.contains("step 5/5") && last.contains("tokens") && last.contains("val "),
        "{last}"
    );
}

#[test]
fn inspect_into_a_closed_pipe_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, run, _) = tiny_run(dir.path());
    // `seedling inspect RUN | head -1`, at its harshest: the reader closes
    // the pipe before the first line is written (the child still has to
    // start and load the checkpoint), so every write meets EPIPE.
    let mut child = Command::new(BIN)
        .args(["inspect", run.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.success(), "{status:?}: {err}");
}

/// The interpreter with numpy and safetensors: `SEEDLING_PYTHON`, which
/// `cargo xtask test` sets after its `python-venv` step, else that step's
/// venv. The test fails, never skips, without it.
fn python() -> PathBuf {
    let p = std::env::var_os("SEEDLING_PYTHON").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/tools/pyenv/bin/python"
            ))
        },
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "no Python with numpy and safetensors at {}: run `cargo xtask test --only python-venv` \
         (or set SEEDLING_PYTHON)",
        p.display()
    );
    p
}

/// The number in `validation loss X nats/char`.
fn nats(line: &str) -> f64 {
    line.split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no loss in {line:?}"))
}

#[test]
fn a_python_reader_of_the_export_agrees_with_seedling_eval() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let (data, run, _) = tiny_run(dir.path());
    let export = dir.path().join("model.safetensors");
    let out = seedling(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&export).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }
    let eval = seedling(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(eval.status.success(), "{}", text(&eval.stderr));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/seedling_eval.py");
    let py = Command::new(&python)
        .args([script, export.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", text(&py.stderr));
    let (want, got) = (text(&eval.stdout), text(&py.stdout));
    // Both score the same characters.
    assert_eq!(
        want.rsplit_once(" over ").unwrap().1,
        got.rsplit_once(" over ").unwrap().1,
        "{want} vs {got}"
    );
    assert!(
        (nats(&want) - nats(&got)).abs() < 1e-4,
        "seedling: {want}python: {got}"
    );
}

/// The reverse-proxy files keep what the page needs: the WebSocket upgrade
/// of `/ws` and the two headers that make it cross-origin isolated, with
/// the values the server itself sends.
#[test]
fn the_proxy_files_keep_websockets_and_isolation_headers() {
    let file = |name: &str| {
        std::fs::read_to_string(format!("{}/../docs/deploy/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let app = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/app.rs")).unwrap();
    for (header, value) in [
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cross-Origin-Embedder-Policy", "require-corp"),
    ] {
        assert!(
            app.contains(&format!("\"{}\"", header.to_lowercase())) && app.contains(&format!("\"{value}\"")),
            "the server no longer sends {header}: {value}; update docs/deploy"
        );
        assert!(file("Caddyfile").contains(&format!("{header} \"{value}\"")));
        assert!(file("nginx.conf").contains(&format!("add_header {header} \"{value}\" always;")));
    }
    let nginx = file("nginx.conf");
    assert!(nginx.contains("location = /ws") && nginx.contains("proxy_set_header Upgrade $http_upgrade;"));
    // The /ws URL carries session tokens (protocol::handshake).
    let ws = &nginx[nginx.find("location = /ws").unwrap()..];
    assert!(ws[..ws.find('}').unwrap()].contains("access_log off;"));
    assert!(file("Caddyfile").contains("reverse_proxy 127.0.0.1:8080"));
}
