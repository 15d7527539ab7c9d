//! The doctor's answer: findings with a severity, the evidence and the fix, rendered as text
//! for people or JSON for CI, and the exit code a script branches on.

use serde::Serialize;

/// How bad a finding is. The order matters: the report's worst finding sets the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; needs no action (exit code unaffected).
    Info,
    /// Will hurt under growth or a failure: fix before it does (exit 1).
    Warning,
    /// Loses data, blocks the server or opens it to anyone: fix now (exit 2).
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One thing the doctor found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// A stable identifier (`config.maxmemory_unset`, `keys.big`), for scripts and alerts.
    pub id: &'static str,
    pub severity: Severity,
    /// One line: what is wrong.
    pub title: String,
    /// What was observed that shows it.
    pub evidence: String,
    /// What to do about it.
    pub fix: String,
}

impl Finding {
    pub fn new(
        id: &'static str,
        severity: Severity,
        title: impl Into<String>,
        evidence: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            id,
            severity,
            title: title.into(),
            evidence: evidence.into(),
            fix: fix.into(),
        }
    }
}

/// The doctor's exit codes, as the README's table gives them.
pub mod exit {
    /// No warning, no critical finding.
    pub const CLEAN: u8 = 0;
    /// At least one warning, nothing critical.
    pub const WARNINGS: u8 = 1;
    /// At least one critical finding.
    pub const CRITICAL: u8 = 2;
    /// Nothing could be checked: unreachable, login refused, or the budget was spent
    /// before anything was learned.
    pub const NOT_CHECKED: u8 = 3;
}

/// What the scan covered, for the report's header.
#[derive(Debug, Clone, Serialize)]
pub struct Coverage {
    pub keys_total: u64,
    pub keys_scanned: u64,
    pub complete: bool,
    pub scan_ms: u64,
}

/// The whole answer for one server.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The server, password redacted.
    pub target: String,
    pub redis_version: Option<String>,
    /// The role the checks assumed: `cache`, `durable` or `unknown`.
    pub role: String,
    /// Why that role (`--role`, the configuration, or what was inferred from the server).
    pub role_source: String,
    pub coverage: Option<Coverage>,
    /// How hot keys were looked for: the LFU counters, a `MONITOR` sample, or not at all.
    pub hot_keys: String,
    pub findings: Vec<Finding>,
    /// What was not checked, and why.
    pub notes: Vec<String>,
    /// When nothing could be checked: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub elapsed_ms: u64,
    pub exit_code: u8,
}

impl Report {
    /// The report of a server nothing could be learned from.
    pub fn not_checked(target: String, error: String, elapsed_ms: u64) -> Self {
        Self {
            target,
            redis_version: None,
            role: "unknown".into(),
            role_source: String::new(),
            coverage: None,
            hot_keys: String::new(),
            findings: Vec::new(),
            notes: Vec::new(),
            error: Some(error),
            elapsed_ms,
            exit_code: exit::NOT_CHECKED,
        }
    }

    /// The exit code of a set of findings: the worst severity decides.
    pub fn code_for(findings: &[Finding]) -> u8 {
        match findings.iter().map(|f| f.severity).max() {
            Some(Severity::Critical) => exit::CRITICAL,
            Some(Severity::Warning) => exit::WARNINGS,
            Some(Severity::Info) | None => exit::CLEAN,
        }
    }

    /// Findings of at least `severity`.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    /// One line, for a log: `clean`, or `2 critical, 1 warning: keys.big, config.aof_off`.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("not checked: {e}");
        }
        let (c, w, i) = (
            self.count(Severity::Critical),
            self.count(Severity::Warning),
            self.count(Severity::Info),
        );
        if c + w == 0 {
            return format!("clean ({i} info)");
        }
        let mut worst: Vec<&Finding> = self
            .findings
            .iter()
            .filter(|f| f.severity > Severity::Info)
            .collect();
        worst.sort_by_key(|f| std::cmp::Reverse(f.severity));
        let ids: Vec<&str> = worst.iter().map(|f| f.id).collect();
        format!("{c} critical, {w} warning: {}", ids.join(", "))
    }

    /// The report for people: a header, then the findings worst first, each with its
    /// evidence and fix.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "passerelle doctor: {}", self.target);
        if let Some(e) = &self.error {
            let _ = writeln!(out, "  could not check: {e}");
            let _ = writeln!(out, "result: not checked (exit {})", self.exit_code);
            return out;
        }
        let _ = writeln!(
            out,
            "  redis {}, role {} ({})",
            self.redis_version.as_deref().unwrap_or("?"),
            self.role,
            self.role_source
        );
        if let Some(c) = &self.coverage {
            let _ = writeln!(
                out,
                "  keys: scanned {} of {}{} in {} ms",
                c.keys_scanned,
                c.keys_total,
                if c.complete {
                    ""
                } else {
                    " (sample: the budget or --max-keys ended the scan)"
                },
                c.scan_ms
            );
        }
        if !self.hot_keys.is_empty() {
            let _ = writeln!(out, "  hot keys: {}", self.hot_keys);
        }
        let mut sorted: Vec<&Finding> = self.findings.iter().collect();
        sorted.sort_by_key(|f| std::cmp::Reverse(f.severity));
        for f in sorted {
            let _ = writeln!(out, "\n[{}] {}: {}", f.severity.as_str(), f.id, f.title);
            let _ = writeln!(out, "  evidence: {}", f.evidence);
            let _ = writeln!(out, "  fix: {}", f.fix);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nnot checked:");
            for n in &self.notes {
                let _ = writeln!(out, "  - {n}");
            }
        }
        let _ = writeln!(
            out,
            "\nresult: {} (exit {}, {} ms)",
            self.summary(),
            self.exit_code,
            self.elapsed_ms
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(severity: Severity) -> Finding {
        Finding::new("test.finding", severity, "t", "e", "f")
    }

    #[test]
    fn the_worst_finding_sets_the_exit_code() {
        assert_eq!(Report::code_for(&[]), exit::CLEAN);
        assert_eq!(Report::code_for(&[finding(Severity::Info)]), exit::CLEAN);
        assert_eq!(
            Report::code_for(&[finding(Severity::Info), finding(Severity::Warning)]),
            exit::WARNINGS
        );
        assert_eq!(
            Report::code_for(&[finding(Severity::Critical), finding(Severity::Warning)]),
            exit::CRITICAL
        );
    }

    #[test]
    fn text_and_json_name_each_finding() {
        let findings = vec![finding(Severity::Warning), finding(Severity::Critical)];
        let r = Report {
            target: "redis://127.0.0.1:6379".into(),
            redis_version: Some("7.0.15".into()),
            role: "durable".into(),
            role_source: "--role".into(),
            coverage: None,
            hot_keys: "OBJECT FREQ".into(),
            exit_code: Report::code_for(&findings),
            findings,
            notes: vec!["hot keys: MONITOR refused".into()],
            error: None,
            elapsed_ms: 3,
        };
        let text = r.to_text();
        assert!(text.contains("[critical] test.finding"), "{text}");
        assert!(text.contains("result: 1 critical, 1 warning"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["exit_code"], 2);
        assert_eq!(json["findings"][1]["severity"], "critical");
        let unreachable = Report::not_checked("redis://x".into(), "refused".into(), 1);
        assert_eq!(unreachable.exit_code, exit::NOT_CHECKED);
        assert!(unreachable.to_text().contains("could not check: refused"));
    }
}
