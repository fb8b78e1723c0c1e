//! Deterministic identities. Every id and seed is a pure function of the campaign seed and the
//! sample (or shard) index, so every machine and every attempt computes the same ones.

use sha2::{Digest, Sha256};

fn h(parts: &[&[u8]]) -> [u8; 32] {
    let mut d = Sha256::new();
    for p in parts {
        d.update((p.len() as u64).to_le_bytes());
        d.update(p);
    }
    d.finalize().into()
}

/// The sample id: 24 hex characters derived from (campaign seed, sample index).
pub fn sample_id(campaign_seed: u64, index: u64) -> String {
    let d = h(&[
        b"defectforge/sample-id/v1",
        &campaign_seed.to_le_bytes(),
        &index.to_le_bytes(),
    ]);
    hex::encode(&d[..12])
}

/// The generator seed of one sample, derived from (campaign seed, sample index).
pub fn sample_seed(campaign_seed: u64, index: u64) -> u64 {
    let d = h(&[
        b"defectforge/sample-seed/v1",
        &campaign_seed.to_le_bytes(),
        &index.to_le_bytes(),
    ]);
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Shard ids are the zero-padded shard index, so they sort in plan order.
pub fn shard_id(index: u64) -> String {
    format!("{index:07}")
}

/// Turns a campaign name into the readable part of a campaign id: lower-case ASCII letters,
/// digits and single dashes, at most 40 characters.
pub fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= 40 {
            break;
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "campaign".into()
    } else {
        out
    }
}

/// True when `id` is safe as one object-key segment: `[a-z0-9-]`, 1..=64 characters.
pub fn is_safe_campaign_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

/// A fresh attempt id: the start time in milliseconds (hex, fixed width, so attempt ids sort by
/// start time) and 32 random bits. Attempt ids make every attempt's object keys unique.
pub fn new_attempt_id() -> String {
    let ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    format!("{ms:012x}-{:08x}", rand::random::<u32>())
}

/// sha256 of bytes as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        assert_eq!(sample_id(7, 3), sample_id(7, 3));
        assert_ne!(sample_id(7, 3), sample_id(7, 4));
        assert_ne!(sample_id(7, 3), sample_id(8, 3));
        assert_eq!(sample_id(7, 3).len(), 24);
        assert_eq!(sample_seed(1, 2), sample_seed(1, 2));
        assert_ne!(sample_seed(1, 2), sample_seed(1, 3));
    }

    #[test]
    fn slugs_are_key_safe() {
        assert_eq!(slug("My Demo / ../../etc"), "my-demo-etc");
        assert_eq!(slug("..."), "campaign");
        assert!(is_safe_campaign_id(&format!("{}-0123abcd", slug("a b"))));
        assert!(!is_safe_campaign_id("../x"));
        assert!(!is_safe_campaign_id("A"));
    }

    #[test]
    fn attempt_ids_sort_by_time() {
        let a = new_attempt_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_attempt_id();
        assert!(a < b, "{a} < {b}");
    }
}
