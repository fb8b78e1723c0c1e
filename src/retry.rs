//! Retries with exponential backoff and full jitter for transient failures (store 5xx,
//! timeouts, broker hiccups). Permanent failures are returned at once.

use std::future::Future;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// total tries, including the first
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            attempts: 5,
            base: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The sleep before retry number `n` (1-based): uniform in [0, min(max, base·2^(n−1))].
    pub fn delay(&self, n: u32) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(20))
            .min(self.max);
        cap.mul_f64(rand::random::<f64>())
    }
}

/// Runs `f` until it succeeds, fails permanently, or the attempts are used up.
pub async fn retry<T, E, F, Fut>(
    policy: Backoff,
    what: &str,
    is_transient: impl Fn(&E) -> bool,
    mut f: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut n = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if is_transient(&e) && n < policy.attempts => {
                let d = policy.delay(n);
                tracing::warn!(
                    attempt = n,
                    delay_ms = d.as_millis() as u64,
                    "{what} failed, retrying: {e}"
                );
                tokio::time::sleep(d).await;
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn retries_transient_and_stops_on_permanent() {
        let p = Backoff {
            attempts: 4,
            base: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        let calls = AtomicU32::new(0);
        let r: Result<u32, String> = retry(
            p,
            "x",
            |e: &String| e == "t",
            || async {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < 2 {
                    Err("t".to_string())
                } else {
                    Ok(n)
                }
            },
        )
        .await;
        assert_eq!(r, Ok(2));
        calls.store(0, Ordering::SeqCst);
        let r: Result<u32, String> = retry(
            p,
            "x",
            |e: &String| e == "t",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("p".to_string())
            },
        )
        .await;
        assert_eq!(r, Err("p".into()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        calls.store(0, Ordering::SeqCst);
        let _: Result<u32, String> = retry(
            p,
            "x",
            |_| true,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("t".to_string())
            },
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(p.delay(10) <= Duration::from_millis(2));
    }
}
