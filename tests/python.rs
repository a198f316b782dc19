//! The Python side, as its users run it: the client package
//! (`clients/python`: built with its stubs generated from `proto/`, checked
//! by mypy, tested by pytest against the real binary), and the OpenAI
//! gateway example end to end (`examples/openai-gateway`: Tollgate, a fake
//! model server and the gateway as processes on loopback, driven by the
//! official `openai` package).
//!
//! Both run in one virtual environment under the target directory, made
//! with pip from PyPI (the pinned requirements of each) and remade when
//! those change; the package is reinstalled on every run.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The environment's Python, ready (once per run of this binary).
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("py-clients");
        let python = venv.join("bin/python");
        let requirements = [
            "clients/python/requirements-dev.txt",
            "examples/openai-gateway/requirements.txt",
        ];
        let wanted: String = requirements
            .iter()
            .map(|r| std::fs::read_to_string(Path::new(ROOT).join(r)).expect("requirements file"))
            .collect();
        let stamp = venv.join("requirements.stamp");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            let _ = std::fs::remove_dir_all(&venv);
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
            let mut pip = Command::new(&python);
            pip.args(["-m", "pip", "install", "-q", "--disable-pip-version-check"]);
            for r in requirements {
                pip.arg("-r").arg(Path::new(ROOT).join(r));
            }
            run(&mut pip);
            std::fs::write(&stamp, &wanted).unwrap();
        }
        // The package, its stubs generated afresh from proto/.
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(["--no-deps", "--no-build-isolation", "--force-reinstall"])
            .arg(Path::new(ROOT).join("clients/python")));
        python
    })
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

/// `python -m MODULE ARGS` in `dir`, with the binary under test.
fn python_module(dir: &str, module: &str, args: &[&str]) -> String {
    run(Command::new(python())
        .current_dir(Path::new(ROOT).join(dir))
        .args(["-m", module])
        .args(args)
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
