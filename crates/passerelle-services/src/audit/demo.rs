//! Demo transfers for `passerelle up`: deterministic (ids `demo-000001`...), spread over
//! the last days, so seeding twice (or from several instances) records them once.

use super::record::{Status, Transfer};

/// `n` demo transfers ending at `now_ms`: 50 accounts, 12 users, mostly completed.
pub fn transfers(n: u64, now_ms: i64) -> Vec<Transfer> {
    const CURRENCIES: [&str; 3] = ["EUR", "EUR", "USD"];
    const CHANNELS: [&str; 3] = ["web", "mobile", "api"];
    (1..=n)
        .map(|i| {
            let k = i.wrapping_mul(2_654_435_761);
            let from = k % 50 + 1;
            let to = (from + 1 + (k >> 8) % 49) % 50 + 1;
            let status = match k % 20 {
                0 => Status::Rejected,
                1 => Status::Reversed,
                2 | 3 => Status::Initiated,
                _ => Status::Completed,
            };
            Transfer {
                id: format!("demo-{i:06}"),
                // One every ~97 s back from now: 3,000 cover about three days.
                time: now_ms - (i as i64) * 97_000,
                from_account: format!("ACC-{from:03}"),
                to_account: format!("ACC-{to:03}"),
                amount: ((k >> 16) % 500_000) as i64,
                currency: CURRENCIES[(k % 3) as usize].to_string(),
                status,
                user: format!("{}", (k >> 4) % 12 + 1),
                channel: CHANNELS[((k >> 2) % 3) as usize].to_string(),
                client_ip: None,
                request_id: None,
                metadata: serde_json::Map::new(),
            }
        })
        .collect()
}
