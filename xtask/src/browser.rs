//! `cargo xtask browser`: the operator console in a real browser.
//!
//! The tests (tests/browser/, Python) start `passerelle up` on free loopback ports, send
//! traffic through its gateway, and drive Debian's `chromium` with Playwright over the
//! console at the root of the admin listener, checking what the page shows against what the
//! gateway does; axe-core audits its accessibility, and the screenshots of the README are
//! written on the way.
//!
//! Nothing is downloaded at run time beyond pinned, checked artifacts, each made once and
//! kept under the target directory:
//! - Playwright drives the system's browser (`executable_path`), never a browser of its own:
//!   Debian's `chromium` is patched and updated by apt, where Playwright's download would be
//!   one more unpatched binary, and hundreds of megabytes per fresh CI machine.
//! - Playwright and pytest come from PyPI at pinned versions, into a virtualenv of their own
//!   (`target/browser-venv`), made again when the pins change.
//! - axe-core is one file of an npm tarball; the tarball is fetched from the registry with
//!   curl and checked against its published SHA-512, so no node or npm is needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deploy::{apt_install, python_has_venv, target};
use crate::{Result, cargo, ensure_packages, root, step};

/// Playwright's Python package (its driver is bundled; its browsers are not used).
const PLAYWRIGHT: &str = "playwright==1.65.2";
const PYTEST: &str = "pytest==9.2.0";
/// The axe-core release injected into the page, and its tarball's SHA-512 (hex of the
/// registry's `dist.integrity`).
const AXE_VERSION: &str = "4.14.1";
const AXE_SHA512: &str = "1477dafa598d8d065f273d6af302aa203c02e83131707b7fa648cd41bd3d6b734f\
                          8c22a0dab86ee6a6f64b8afbe804b214d36db85a2826965edfb3a0b9d546b5";
/// Debian installs its browser here; Playwright is pointed at it.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs the browser tests; `args` go to pytest (e.g. `-k purge`, `-x`).
pub(crate) fn run(args: &[String]) -> Result {
    step("browser tests: checking for chromium, redis-server, curl and python3");
    ensure_packages(&[
        ("chromium", "chromium"),
        ("redis-server", "redis-server"),
        ("curl", "curl"),
        ("python3", "python3"),
    ])?;
    let venv = venv()?;
    let axe = axe_core()?;
    // The binary the integration tests run, built as `cargo nextest run --workspace`
    // builds it (`cargo test --no-run`): after the test run this is a no-op. `cargo build
    // -p passerelle` would resolve the workspace crates' features without the tests'
    // dev-dependencies, and compile half the workspace again for a second binary.
    step("browser tests: building passerelle (debug, as the integration tests build it)");
    crate::run(cargo().args(["test", "--workspace", "--no-run"]))?;
    let bin = target().join("debug").join("passerelle");
    let tests = root().join("tests").join("browser");
    let screenshots = root().join("docs").join("screenshots");
    step(&format!(
        "browser tests: pytest tests/browser (chromium at 1366x768, axe-core {AXE_VERSION}; \
         screenshots into docs/screenshots)"
    ));
    crate::run(
        Command::new(venv.join("bin").join("python"))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(&tests)
            .args(args)
            .current_dir(&tests)
            .env("PASSERELLE_BIN", &bin)
            .env("CHROMIUM", CHROMIUM)
            .env("AXE_JS", &axe)
            .env("SCREENSHOTS", &screenshots)
            // Nothing written into the source tree but the screenshots.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            // No Playwright download, ever: the tests launch `CHROMIUM`.
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
            .env_remove("PASSERELLE_CONFIG"),
    )
}

/// The virtualenv holding Playwright and pytest, made when missing or pinned differently.
fn venv() -> Result<PathBuf> {
    let venv = target().join("browser-venv");
    let pins = format!("{PLAYWRIGHT}\n{PYTEST}\n");
    let marker = venv.join("passerelle-pins.txt");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(pins.as_str()) {
        return Ok(venv);
    }
    if !python_has_venv() {
        // Debian's python3 keeps `venv` (its ensurepip) in a package of its own.
        apt_install("python3-venv")?;
    }
    step(&format!(
        "browser tests: installing {PLAYWRIGHT} and {PYTEST} into {}",
        venv.display()
    ));
    let _ = std::fs::remove_dir_all(&venv);
    crate::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    crate::run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        PLAYWRIGHT,
        PYTEST,
    ]))?;
    std::fs::write(&marker, pins).map_err(|e| format!("{}: {e}", marker.display()))?;
    Ok(venv)
}

/// `axe.min.js` of the pinned axe-core, fetched once from the npm registry and checked.
fn axe_core() -> Result<PathBuf> {
    let dir = target().join("browser-axe").join(AXE_VERSION);
    let js = dir.join("axe.min.js");
    if js.is_file() {
        return Ok(js);
    }
    let url = format!("https://registry.npmjs.org/axe-core/-/axe-core-{AXE_VERSION}.tgz");
    step(&format!(
        "browser tests: fetching axe-core {AXE_VERSION} ({url})"
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tarball = dir.join("axe-core.tgz");
    crate::run(
        Command::new("curl")
            .args(["-fsSL", "--retry", "3", "-o"])
            .arg(&tarball)
            .arg(&url),
    )?;
    let sum = sha512(&tarball)?;
    if sum != AXE_SHA512 {
        let _ = std::fs::remove_file(&tarball);
        return Err(format!(
            "{url}: SHA-512 {sum}, expected {AXE_SHA512}: refusing to use it"
        ));
    }
    // Extracted under a temporary name and renamed, so that an interrupted run never
    // leaves a partial file that the next one would take as the checked one.
    crate::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dir)
            .arg("package/axe.min.js"),
    )?;
    std::fs::rename(dir.join("package").join("axe.min.js"), &js)
        .map_err(|e| format!("{}: {e}", js.display()))?;
    let _ = std::fs::remove_dir_all(dir.join("package"));
    let _ = std::fs::remove_file(&tarball);
    Ok(js)
}

/// The SHA-512 of a file, in hex, by coreutils' `sha512sum`.
fn sha512(file: &Path) -> Result<String> {
    let out = Command::new("sha512sum")
        .arg(file)
        .output()
        .map_err(|e| format!("sha512sum: {e}"))?;
    if !out.status.success() {
        return Err(format!("sha512sum {} failed", file.display()));
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| "sha512sum printed nothing".to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pinned_checksum_is_a_sha512_in_hex() {
        assert_eq!(super::AXE_SHA512.len(), 128);
        assert!(super::AXE_SHA512.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
