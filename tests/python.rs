//! The Python side, as its users run it: the client package
//! (`clients/python`: built with its stubs generated from `proto/`, checked
//! by mypy, tested by pytest against the real binary), and the OpenAI
//! gateway example end to end (`examples/openai-gateway`: Tollgate, a fake
//! model server and the gateway as processes on loopback, driven by the
//! official `openai` package), and the alerts consumer example
//! (`examples/alerts`: a real Tollgate's alerts turned into emails and one
//! recharge through the admin CLI).
//!
//! Both run in one virtual environment with the pinned requirements of
//! each, made with pip from PyPI once and kept under `~/.cache/tollgate/python/`
//! (named by a hash of the requirements and the interpreter's version, so a
//! change makes a new one; made aside and renamed into place, so runs at
//! once never see half of one). The package itself is built on every run,
//! into a directory of the target (one per process) put first on
//! `PYTHONPATH`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const REQUIREMENTS: [&str; 2] = [
    "clients/python/requirements-dev.txt",
    "examples/openai-gateway/requirements.txt",
];

/// The environment's Python and the directory the package is built into
/// (once per run of this binary).
fn python() -> &'static (PathBuf, PathBuf) {
    static PYTHON: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = venv();
        let python = venv.join("bin/python");
        // One directory per process: nextest runs each test in a process of
        // its own, and one rebuilding a shared directory would pull the
        // package from under another's mypy. Those of processes gone are
        // removed.
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("py-tollgate-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let package = tmp.join(format!("py-tollgate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&package);
        // The stubs generated afresh from proto/.
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(["--no-deps", "--no-build-isolation", "--target"])
            .arg(&package)
            .arg(Path::new(ROOT).join("clients/python")));
        (python, package)
    })
}

/// The virtual environment with every requirement, made if missing.
fn venv() -> PathBuf {
    let mut key = Sha256::new();
    key.update(run(Command::new("python3").arg("--version")));
    for r in REQUIREMENTS {
        key.update(std::fs::read(Path::new(ROOT).join(r)).expect("a requirements file"));
    }
    let name: String = key.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect();
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    let venv = home.join(".cache/tollgate/python").join(name);
    if venv.join("bin/python").exists() {
        return venv;
    }
    let aside = venv.with_extension(format!("making-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&aside);
    run(Command::new("python3").args(["-m", "venv"]).arg(&aside));
    let mut pip = Command::new(aside.join("bin/python"));
    pip.args(["-m", "pip", "install", "-q", "--disable-pip-version-check"]);
    for r in REQUIREMENTS {
        pip.arg("-r").arg(Path::new(ROOT).join(r));
    }
    run(&mut pip);
    // Another run may have made it meanwhile: theirs is as good.
    if std::fs::rename(&aside, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&aside);
    }
    venv
}

/// Runs `command` to success, or fails the test with its output.
fn run(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{command:?} failed:\n{stdout}\n{stderr}");
    stdout.into_owned()
}

/// `python -m MODULE ARGS` in `dir`, with the package and the binary under
/// test. One at a time: a cold mypy beside a sidecar and a gateway starves
/// them on two cores, and their calls have deadlines.
fn python_module(dir: &str, module: &str, args: &[&str]) -> String {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (python, package) = python();
    run(Command::new(python)
        .current_dir(Path::new(ROOT).join(dir))
        .args(["-m", module])
        .args(args)
        .env("PYTHONPATH", package)
        .env("TOLLGATE_BIN", env!("CARGO_BIN_EXE_tollgate"))
        .env("PYTHONDONTWRITEBYTECODE", "1"))
}

#[test]
fn the_python_client_is_typed_and_passes_its_tests_against_the_binary() {
    let cache = format!("--cache-dir={}/mypy-cache-client", env!("CARGO_TARGET_TMPDIR"));
    let checked = python_module("clients/python", "mypy", &[&cache]);
    assert!(checked.contains("Success: no issues found"), "{checked}");
    let tested = python_module("clients/python", "pytest", &["-q", "-p", "no:cacheprovider"]);
    assert!(tested.contains(" passed"), "{tested}");
}

#[test]
fn the_openai_gateway_example_works_end_to_end_with_the_openai_package() {
    // A cache of its own: the two tests run at once, and mypy's cache is
    // one SQLite file.
    let cache = format!("--cache-dir={}/mypy-cache-gateway", env!("CARGO_TARGET_TMPDIR"));
    let files = ["gateway.py", "model_server.py", "tokens.py", "test_gateway.py"];
    let checked = python_module(
        "examples/openai-gateway",
        "mypy",
        &[&["--strict", "--ignore-missing-imports", &cache][..], &files].concat(),
    );
    assert!(checked.contains("Success: no issues found"), "{checked}");
    let tested = python_module("examples/openai-gateway", "pytest", &["-q", "-p", "no:cacheprovider"]);
    assert!(tested.contains(" passed"), "{tested}");
}

#[test]
fn the_alerts_consumer_example_mails_each_alert_and_recharges_once() {
    let cache = format!("--cache-dir={}/mypy-cache-alerts", env!("CARGO_TARGET_TMPDIR"));
    let files = ["consumer.py", "test_consumer.py"];
    let checked = python_module(
        "examples/alerts",
        "mypy",
        &[&["--strict", "--ignore-missing-imports", &cache][..], &files].concat(),
    );
    assert!(checked.contains("Success: no issues found"), "{checked}");
    let tested = python_module("examples/alerts", "pytest", &["-q", "-p", "no:cacheprovider"]);
    assert!(tested.contains(" passed"), "{tested}");
}
