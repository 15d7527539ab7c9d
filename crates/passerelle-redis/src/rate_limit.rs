//! Rate-limit state in Redis: the decision for the limits of one request, atomic, in one
//! round trip ([`scripts::RATE_LIMIT`]).
//!
//! The caller groups a request's limits by counted identity (the hash tag): limits of one
//! group are decided together, all or nothing. The gateway owns policy (which limits, what
//! to do when Redis fails); this module owns keys, the script and its wire format.

use std::time::Duration;

use passerelle_config::LimitAlgorithm;

use crate::keys::KeySchema;
use crate::{RedisClient, RedisError, scripts};

/// The parameters of one limit, as the script needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitParams {
    pub algorithm: LimitAlgorithm,
    /// Requests per period.
    pub limit: u64,
    pub period: Duration,
    /// GCRA: requests allowed at once on a full bucket.
    pub burst: u64,
}

/// What the script does with a group of limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Decide, and consume one request from every limit if all admit it.
    Check,
    /// Decide without writing (what would happen now).
    Peek,
    /// Give back one request admitted earlier (another group refused the request).
    Refund,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Check => "check",
            Mode::Peek => "peek",
            Mode::Refund => "refund",
        }
    }
}

/// One limit's state after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    /// Requests still allowed now (after this one, when it was admitted).
    pub remaining: u64,
    /// Until the limit is fully restored (GCRA) or the window ends.
    pub reset: Duration,
    /// When refused: until a request would be admitted.
    pub retry_after: Duration,
}

/// The decision on a group: admitted or not, and each limit's state, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    pub states: Vec<LimitState>,
}

impl RedisClient {
    /// Decides the `limits` (name, parameters) that count `identity`.
    pub async fn rate_limit(
        &self,
        keys: &KeySchema,
        identity: &str,
        limits: &[(&str, &LimitParams)],
        mode: Mode,
    ) -> Result<Verdict, RedisError> {
        let mut inv = scripts::RATE_LIMIT.prepare_invoke();
        inv.arg(mode.as_str());
        for (name, p) in limits {
            inv.key(keys.rate_limit(identity, name));
            inv.arg(match p.algorithm {
                LimitAlgorithm::Gcra => "gcra",
                LimitAlgorithm::SlidingWindow => "sliding",
                LimitAlgorithm::FixedWindow => "fixed",
            })
            .arg(p.limit)
            .arg(u64::try_from(p.period.as_micros()).unwrap_or(u64::MAX))
            .arg(p.burst.max(1));
        }
        let raw: Vec<i64> = inv.invoke_async(&mut self.conn()).await?;
        parse_verdict(&raw, limits.len())
    }

    /// Forgets a limit's state for `identity` (an operator's reset). True when there was any.
    pub async fn rate_limit_reset(
        &self,
        keys: &KeySchema,
        identity: &str,
        limit: &str,
    ) -> Result<bool, RedisError> {
        let n: i64 = redis::cmd("DEL")
            .arg(keys.rate_limit(identity, limit))
            .query_async(&mut self.conn())
            .await?;
        Ok(n > 0)
    }
}

fn parse_verdict(raw: &[i64], n: usize) -> Result<Verdict, RedisError> {
    if raw.len() != 1 + 3 * n {
        return Err(RedisError::Protocol(format!(
            "rate-limit script answered {} values for {n} limits",
            raw.len()
        )));
    }
    let ms = |v: i64| Duration::from_millis(v.max(0) as u64);
    Ok(Verdict {
        admitted: raw[0] == 1,
        states: raw[1..]
            .chunks_exact(3)
            .map(|c| LimitState {
                remaining: c[0].max(0) as u64,
                reset: ms(c[1]),
                retry_after: ms(c[2]),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_parse_and_malformed_answers_are_errors() {
        let v = parse_verdict(&[0, 5, 1000, 0, 0, 60_000, 250], 2).unwrap();
        assert!(!v.admitted);
        assert_eq!(v.states[1].retry_after, Duration::from_millis(250));
        assert_eq!(v.states[0].remaining, 5);
        assert!(parse_verdict(&[1, 2], 1).is_err());
    }
}
