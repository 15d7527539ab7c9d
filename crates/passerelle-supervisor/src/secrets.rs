//! Secrets `passerelle up` generates on first start and keeps in `<data_dir>/secrets/`, one
//! file per secret, readable by the owner only (0600, in a 0700 directory): the admin
//! token now; the API-key HMAC secret, the identity secret and a development JWT key use
//! the same helper. A file that exists is read, never rewritten, so a secret survives
//! restarts and whoever was given it keeps working.
//!
//! A secret is never printed: `up` prints the path of its file and how to use it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use passerelle_config::Secret;

use crate::UpError;

/// The directory of generated secrets under a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("secrets")
}

/// `bytes` random bytes as lowercase hex (twice as many characters): fit for a token, a
/// password or an HMAC secret, in a file, a header or a URL alike.
pub fn random_hex(bytes: usize) -> Result<String, UpError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| UpError::Setup(format!("no randomness for a secret: {e}")))?;
    Ok(buf
        .iter()
        .fold(String::with_capacity(bytes * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        }))
}

/// Writes `contents` to `path` readable by the owner only. The mode is given at creation
/// and set again, so a file that existed with wider rights is narrowed too.
pub fn write_private(path: &Path, contents: &str) -> Result<(), UpError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |e: std::io::Error| UpError::Setup(format!("writing {}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)
}

/// The secret `name` in `dir`: the first line of `dir/name` if that file exists, else
/// `generate()`'s value, written there first (the directory is created 0700). A file
/// that exists but holds no secret is an error naming it, rather than a silent new one.
pub fn load_or_create(
    dir: &Path,
    name: &str,
    generate: impl FnOnce() -> Result<String, UpError>,
) -> Result<Secret, UpError> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(_) => {
            return Secret::resolve(None, Some(&path))
                .map_err(UpError::Setup)?
                .ok_or_else(|| {
                    UpError::Setup(format!(
                        "{} is empty; delete it to have a new secret generated",
                        path.display()
                    ))
                });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(UpError::Setup(format!("reading {}: {e}", path.display()))),
    }
    create_private_dir(dir)?;
    let value = generate()?;
    write_private(&path, &format!("{value}\n"))?;
    Ok(Secret::new(value))
}

fn create_private_dir(dir: &Path) -> Result<(), UpError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |e: std::io::Error| UpError::Setup(format!("creating {}: {e}", dir.display()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_secret_is_generated_once_private_and_then_read() {
        let data = tempfile::tempdir().expect("tempdir");
        let dir = dir(data.path());
        let first = load_or_create(&dir, "admin-token", || random_hex(32)).expect("created");
        assert_eq!(first.expose().len(), 64);
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("admin-token")), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let again = load_or_create(&dir, "admin-token", || {
            Err(UpError::Setup("must not generate again".into()))
        })
        .expect("read");
        assert_eq!(again, first);
        std::fs::write(dir.join("empty"), "\n").expect("write");
        let err = load_or_create(&dir, "empty", || random_hex(8)).expect_err("empty");
        assert!(err.to_string().contains("is empty"), "{err}");
    }
}
