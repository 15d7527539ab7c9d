//! The report's arithmetic: the skewed id distribution, latency percentiles, and the figures
//! wrk prints that `bench` does not keep (p99.9).

/// Ids drawn with probability proportional to `1 / rank^s` (Zipf), by inverting the
/// cumulative distribution: one binary search per draw over a table built once. Rank 1 is id
/// 1, so the hottest ids are the smallest; every system sees the same skew, and it is the
/// same as the wrk scripts' (see [`zipf_lua`]).
#[derive(Debug, Clone)]
pub(crate) struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub(crate) fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|k| {
                total += 1.0 / (k as f64).powf(s);
                total
            })
            .collect();
        for c in &mut cdf {
            *c /= total;
        }
        Self { cdf }
    }

    /// The id (1-based) for a uniform draw `u` in [0, 1).
    pub(crate) fn id_for(&self, u: f64) -> usize {
        let i = self.cdf.partition_point(|&c| c < u);
        i.min(self.cdf.len() - 1) + 1
    }

    pub(crate) fn sample(&self, rng: &mut fastrand::Rng) -> usize {
        self.id_for(rng.f64())
    }
}

/// The `q`-th percentile (0 < q <= 100) of ascending `sorted` values, by nearest rank: the
/// smallest value that at least q% of the values do not exceed. A measured value, never an
/// interpolation between two, so p99.9 of 1,000 samples is the largest one, not less.
pub(crate) fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // The epsilon keeps 99.9% of 1,000 at rank 999 despite 0.999 * 1000 = 999.000…1.
    let rank = (q / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latencies of one measurement, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// From latencies in microseconds, in any order.
    pub(crate) fn from_micros(mut us: Vec<u64>) -> Self {
        us.sort_unstable();
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            p50: ms(percentile(&us, 50.0)),
            p99: ms(percentile(&us, 99.0)),
            p999: ms(percentile(&us, 99.9)),
            max: ms(us.last().copied().unwrap_or(0)),
        }
    }
}

/// The wrk script's extra line: p99.9 in microseconds, which `--latency` does not print.
pub(crate) const P999_MARK: &str = "P999_US ";

/// p99.9 in milliseconds from wrk's output with [`wrk_lua`]'s `done` hook (0 when absent).
pub(crate) fn wrk_p999_ms(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(P999_MARK))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0.0, |us| us / 1000.0)
}

/// Which ids a workload asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ids {
    Uniform,
    Skewed,
}

/// Ids run over 1..=ID_COUNT, the demo rows of passerelle's services.
pub(crate) const ID_COUNT: usize = 10_000;
/// The skew: with s = 1.1 over 10,000 ids, id 1 gets about 15% of the draws, the 10 hottest
/// about 41% and the 100 hottest about 65%, a typical catalogue's popularity.
pub(crate) const ZIPF_S: f64 = 1.1;
/// Distinct client addresses the load claims to come from (X-Forwarded-For, trusted only
/// by passerelle, from the loopback). With the shipped per-client limits (100/s, and 600/min
/// on the composed route), one address sending thousands of requests per second would be
/// refused almost at once; spread over this many clients, no limit trips below ~40k req/s,
/// and each request still pays for its limit decisions in Redis.
pub(crate) const CLIENTS: u32 = 4096;

/// A wrk script: `GET /api/{u}/{p}` (`users_only`: `/users/{id}`) with uniform or skewed
/// ids, an X-Forwarded-For from [`CLIENTS`] addresses, and p99.9 printed when done. Each wrk
/// thread seeds its own generator, so threads do not replay one sequence.
pub(crate) fn wrk_lua(ids: Ids, users_only: bool) -> String {
    let draw = match ids {
        Ids::Uniform => format!("math.random(1, {ID_COUNT})"),
        Ids::Skewed => "zipf()".to_string(),
    };
    let path = if users_only {
        format!("\"/users/\" .. {draw}")
    } else {
        format!("\"/api/\" .. {draw} .. \"/\" .. {draw}")
    };
    format!(
        r#"local n, s, clients = {ID_COUNT}, {ZIPF_S}, {CLIENTS}
local cdf = {{}}
local threads = 0
setup = function(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
init = function(args)
  math.randomseed(4242 + (tid or 0) * 7919)
  local total = 0
  for k = 1, n do total = total + 1 / k ^ s; cdf[k] = total end
  for k = 1, n do cdf[k] = cdf[k] / total end
end
function zipf()
  local u = math.random()
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end
request = function()
  local c = math.random(0, clients - 1)
  local headers = {{ ["X-Forwarded-For"] = "10.0." .. math.floor(c / 256) .. "." .. (c % 256) }}
  return wrk.format("GET", {path}, headers)
end
done = function(summary, latency, requests)
  io.write(string.format("{P999_MARK}%d\n", latency:percentile(99.9)))
end
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_puts_most_draws_on_few_ids_and_stays_in_range() {
        let z = Zipf::new(ID_COUNT, ZIPF_S);
        assert_eq!(z.id_for(0.0), 1);
        assert_eq!(z.id_for(0.999_999_999), ID_COUNT);
        assert_eq!(z.id_for(1.0), ID_COUNT);
        let mut rng = fastrand::Rng::with_seed(7);
        let draws: Vec<usize> = (0..100_000).map(|_| z.sample(&mut rng)).collect();
        assert!(draws.iter().all(|&d| (1..=ID_COUNT).contains(&d)));
        let share = |max: usize| draws.iter().filter(|&&d| d <= max).count() as f64 / 1e5;
        // Exact shares for s = 1.1 over 10,000 ids: id 1 ≈ 0.151, ids 1..=100 ≈ 0.648.
        assert!((share(1) - 0.151).abs() < 0.01, "{}", share(1));
        assert!((share(100) - 0.648).abs() < 0.01, "{}", share(100));
        // Monotone: a hotter rank is drawn at least as often as a colder one.
        let count = |id: usize| draws.iter().filter(|&&d| d == id).count();
        assert!(count(1) > count(2) && count(2) > count(10) && count(10) > count(1000));
    }

    #[test]
    fn zipf_with_no_skew_is_uniform() {
        let z = Zipf::new(4, 0.0);
        assert_eq!(
            [0.1, 0.3, 0.6, 0.9].map(|u| z.id_for(u)),
            [1, 2, 3, 4],
            "quarters map to ids in order"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 500);
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&v, 100.0), 1000);
        assert_eq!(percentile(&[7], 99.9), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        // 10 samples: p99.9 is the largest, never below it.
        let ten: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&ten, 99.9), 10);
        assert_eq!(percentile(&ten, 50.0), 5);
    }

    #[test]
    fn latency_summary_sorts_and_converts_to_ms() {
        let l = Latency::from_micros(vec![3000, 1000, 2000, 100_000]);
        assert_eq!(l.p50, 2.0);
        assert_eq!(l.p99, 100.0);
        assert_eq!(l.max, 100.0);
        assert_eq!(Latency::from_micros(Vec::new()), Latency::default());
    }

    #[test]
    fn p999_is_read_from_the_done_hook_line() {
        let out = "Running 2s test @ http://127.0.0.1:1\n  Latency Distribution\n     50%  1.00ms\n\
                   Requests/sec:  1000.00\nP999_US 12345\n";
        assert_eq!(wrk_p999_ms(out), 12.345);
        assert_eq!(wrk_p999_ms("Requests/sec: 1\n"), 0.0);
    }

    #[test]
    fn wrk_scripts_ask_for_the_right_paths() {
        let api = wrk_lua(Ids::Skewed, false);
        assert!(api.contains("\"/api/\" .. zipf() .. \"/\" .. zipf()"));
        assert!(api.contains("X-Forwarded-For"));
        assert!(api.contains("P999_US %d"));
        let users = wrk_lua(Ids::Uniform, true);
        assert!(users.contains("\"/users/\" .. math.random(1, 10000)"));
    }
}
