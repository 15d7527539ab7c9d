//! `cargo xtask bench report`: the seeds' before/after (being built).

use std::path::Path;

use crate::Result;
use crate::bench::Options;

/// Options of `bench report` that the other suites do not take, removed from `args`.
pub(crate) fn take_options(args: &[String]) -> Result<Vec<String>> {
    Ok(args.to_vec())
}

/// Runs the report.
pub(crate) fn run(_o: &Options, _bin: &Path, _dir: &Path) -> Result {
    Err("the report is not written yet".into())
}
