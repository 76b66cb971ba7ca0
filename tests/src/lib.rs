//! `weft-tests`: black-box tests that run the real `weft` and `weft-relay` binaries.
//!
//! The tests live in `tests/tests.rs` (one test binary, as in ripgrep); this library
//! holds what they share: finding the built binaries and running them in temp homes.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of a binary built from this workspace (`weft`, `weft-relay`), next to the
/// test executable's `deps/` directory. `scripts/test` builds the binaries first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// Runs `weft --home HOME ARGS...` to completion.
pub fn weft(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(binary("weft"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("running weft")
}
