//! The object store seam: where campaign records, generated images, masks, shard fragments and
//! manifests live. `S3Store` (aws-sdk-s3, any S3-compatible server) and `LocalStore` (a
//! directory) implement the same trait; keys are always relative to the store's root prefix and
//! are checked so that nothing can escape it.

mod local;
mod s3;

pub use local::LocalStore;
pub use s3::{S3Config, S3Store};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{uri} does not exist")]
    NotFound { uri: String },
    #[error("bucket {bucket:?} does not exist at {endpoint}: create it (e.g. `garage bucket create {bucket}`) or fix the s3:// URI")]
    NoBucket { bucket: String, endpoint: String },
    #[error("access denied to {uri}: {message} (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the key's bucket permissions)")]
    Auth { uri: String, message: String },
    #[error("object key {key:?} is not allowed: {reason}")]
    BadKey { key: String, reason: String },
    #[error("{uri} is {size} bytes, over the input limit of {limit} bytes (raise --max-input-bytes / DEFECTFORGE_MAX_INPUT_BYTES if it is a real input)")]
    TooLarge { uri: String, size: u64, limit: u64 },
    #[error("{uri} is outside what this worker may open ({allowed}); for an output store add it to --stores / DEFECTFORGE_STORES, for an input move it under the campaign's dataset")]
    NotAllowed { uri: String, allowed: String },
    #[error("{uri} is not a regular file")]
    NotAFile { uri: String },
    #[error("no space left writing {uri}: {message}")]
    Full { uri: String, message: String },
    #[error("transient store error on {uri}: {message}")]
    Transient { uri: String, message: String },
    #[error("store error on {uri}: {message}")]
    Other { uri: String, message: String },
}

impl StoreError {
    /// True for errors worth retrying: timeouts, connection failures, 5xx, throttling.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient { .. })
    }
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// key relative to the store root
    pub key: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
}

#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// The store's root as a URI (`s3://bucket/prefix` or an absolute directory).
    fn root_uri(&self) -> String;
    /// The full URI of a key (what manifest rows record).
    fn uri(&self, key: &str) -> String {
        let root = self.root_uri();
        if root.ends_with('/') {
            format!("{root}{key}")
        } else {
            format!("{root}/{key}")
        }
    }
    /// Writes an object atomically: readers see the old state or the whole new object.
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StoreError>;
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;
    /// Reads an object of at most `limit` bytes: a larger one (or, locally, anything that is
    /// not a regular file) is refused before its body is read in full.
    async fn get_limited(&self, key: &str, limit: u64) -> Result<Bytes, StoreError> {
        if let Some(m) = self.head(key).await? {
            if m.size > limit {
                return Err(StoreError::TooLarge {
                    uri: self.uri(key),
                    size: m.size,
                    limit,
                });
            }
        }
        let b = self.get(key).await?;
        if b.len() as u64 > limit {
            return Err(StoreError::TooLarge {
                uri: self.uri(key),
                size: b.len() as u64,
                limit,
            });
        }
        Ok(b)
    }
    /// Metadata of a key, or None when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError>;
    /// Every object whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;
    /// Deletes a key; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Checks that the store is reachable, the credentials work and the bucket exists.
    async fn check(&self) -> Result<(), StoreError>;
}

/// Rejects keys that could escape the store root or are ambiguous: absolute keys, `..` or `.`
/// segments, empty segments, backslashes and control characters.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| {
        Err(StoreError::BadKey {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return bad("empty key");
    }
    if key.starts_with('/') {
        return bad("absolute keys are not allowed");
    }
    if key.contains('\\') || key.chars().any(|c| c.is_control()) {
        return bad("backslashes and control characters are not allowed");
    }
    for seg in key.split('/') {
        if seg == ".." || seg == "." {
            return bad("'.' and '..' segments are not allowed");
        }
    }
    if key.contains("//") {
        return bad("empty path segments are not allowed");
    }
    Ok(())
}

/// True when `uri` names `root` itself or something below it, compared by path segment (so
/// `/data/a` is not under `/data/ab`); a URI with `.` or `..` segments, a backslash or a control
/// character is never under anything. Local paths are compared as written: resolve symbolic
/// links before (the worker does, for inputs it opens).
pub fn is_within(uri: &str, root: &str) -> bool {
    if uri.contains('\\') || uri.chars().any(|c| c.is_control()) {
        return false;
    }
    let segs = |s: &str| -> Option<Vec<String>> {
        let (scheme, rest) = match s.strip_prefix("s3://") {
            Some(r) => ("s3://", r),
            None => ("", s),
        };
        let mut v = vec![scheme.to_string()];
        for seg in rest.split('/').filter(|x| !x.is_empty()) {
            if seg == "." || seg == ".." {
                return None;
            }
            v.push(seg.to_string());
        }
        Some(v)
    };
    match (segs(uri), segs(root)) {
        (Some(u), Some(r)) => u.len() >= r.len() && u[..r.len()] == r[..],
        _ => false,
    }
}

/// Splits `s3://bucket/prefix` into (bucket, prefix without surrounding slashes).
pub fn parse_s3_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return None;
    }
    Some((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// Opens the store rooted at a location: `s3://bucket/prefix` or a local directory.
pub async fn open(location: &str, s3: &S3Config) -> Result<Arc<dyn ObjectStore>, StoreError> {
    if let Some((bucket, prefix)) = parse_s3_uri(location) {
        Ok(Arc::new(S3Store::new(s3, &bucket, &prefix).await))
    } else if location.contains("://") {
        Err(StoreError::Other {
            uri: location.to_string(),
            message: "only s3:// URIs and local paths are supported".into(),
        })
    } else {
        Ok(Arc::new(LocalStore::new(location)))
    }
}

/// Opens the store that holds one object URI and returns it with the object's key. Used to read
/// inputs (normal images, masks, textures) named by absolute URIs.
pub async fn open_object(
    uri: &str,
    s3: &S3Config,
) -> Result<(Arc<dyn ObjectStore>, String), StoreError> {
    if let Some((bucket, key)) = parse_s3_uri(uri) {
        Ok((Arc::new(S3Store::new(s3, &bucket, "").await), key))
    } else {
        let p = std::path::Path::new(uri);
        let parent = p
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok((Arc::new(LocalStore::new(&parent)), name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_compares_whole_segments_and_refuses_dot_dot() {
        assert!(is_within("/data/mvtec/bottle/a.png", "/data/mvtec"));
        assert!(is_within("/data/mvtec", "/data/mvtec/"));
        assert!(!is_within("/data/mvtec2/a.png", "/data/mvtec"));
        assert!(!is_within("/data/mvtec/../../etc/shadow", "/data/mvtec"));
        assert!(!is_within("/etc/shadow", "/data"));
        assert!(is_within("s3://b/ds/x.png", "s3://b/ds"));
        assert!(is_within("s3://b/ds/x.png", "s3://b"));
        assert!(!is_within("s3://b2/ds/x.png", "s3://b"));
        assert!(!is_within("/b/ds/x.png", "s3://b"));
        assert!(!is_within("s3://b/ds\\..\\x", "s3://b"));
    }

    #[test]
    fn keys_cannot_escape() {
        for k in [
            "../x",
            "a/../../b",
            "/etc/passwd",
            "a//b",
            "a\\b",
            "./a",
            "",
        ] {
            assert!(check_key(k).is_err(), "{k:?} should be rejected");
        }
        for k in ["a", "campaigns/x/samples/0a/1.png", "a.b/c..d"] {
            assert!(check_key(k).is_ok(), "{k:?} should be allowed");
        }
    }

    #[test]
    fn s3_uris_split() {
        assert_eq!(
            parse_s3_uri("s3://b/p/q/"),
            Some(("b".into(), "p/q".into()))
        );
        assert_eq!(parse_s3_uri("s3://b"), Some(("b".into(), "".into())));
        assert_eq!(parse_s3_uri("s3:///x"), None);
        assert_eq!(parse_s3_uri("/tmp/x"), None);
    }
}
