//! Samples and nearest-rank percentiles.

use std::time::{Duration, Instant};

/// Runs `f` and returns its result with the wall time it took.
pub fn timed<T, E>(f: impl FnOnce() -> Result<T, E>) -> Result<(T, Duration), E> {
    let t0 = Instant::now();
    let v = f()?;
    Ok((v, t0.elapsed()))
}

/// The `p`th percentile (0 < p ≤ 100) of `samples` by nearest rank: the
/// smallest sample with at least p% of all samples at or below it. With 30
/// samples, p99 is the largest. `None` for no samples.
pub fn nearest_rank(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil().clamp(1.0, n as f64) as usize;
    Some(sorted[rank - 1])
}

/// p50, p99 and n of one operation, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        Some(Summary {
            n: samples.len(),
            p50_ms: ms(nearest_rank(samples, 50.0)?),
            p99_ms: ms(nearest_rank(samples, 99.0)?),
        })
    }
}

/// Bytes in MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Milliseconds, to the microsecond.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_list(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn nearest_rank_matches_the_definition() {
        let s = ms_list(&[5, 1, 4, 2, 3]);
        assert_eq!(nearest_rank(&s, 50.0), Some(Duration::from_millis(3)));
        assert_eq!(nearest_rank(&s, 99.0), Some(Duration::from_millis(5)));
        assert_eq!(nearest_rank(&s, 20.0), Some(Duration::from_millis(1)));
        assert_eq!(nearest_rank(&s, 21.0), Some(Duration::from_millis(2)));
        assert_eq!(nearest_rank(&[], 50.0), None);
    }

    #[test]
    fn p50_of_an_even_count_is_the_lower_middle_and_p99_of_thirty_is_the_max() {
        let s: Vec<_> = (1..=30).map(Duration::from_millis).collect();
        assert_eq!(nearest_rank(&s, 50.0), Some(Duration::from_millis(15)));
        assert_eq!(nearest_rank(&s, 99.0), Some(Duration::from_millis(30)));
        let s: Vec<_> = (1..=200).map(Duration::from_millis).collect();
        assert_eq!(nearest_rank(&s, 99.0), Some(Duration::from_millis(198)));
    }
}
