//! S3-compatible object store on aws-sdk-s3. Settings that matter for non-AWS servers (Garage,
//! MinIO, Ceph): an explicit endpoint, path-style addressing, the server's region name, and
//! checksum calculation/validation "when required" (reference/pipeline.md §2.2: SDK defaults since
//! 2025 send aws-chunked CRC32 trailers that many servers reject). Objects above
//! `MULTIPART_THRESHOLD` go up as multipart uploads without echoed part checksums.

use super::{check_key, ObjectMeta, ObjectStore, StoreError};
use async_trait::async_trait;
use aws_sdk_s3::config::{
    retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Credentials, Region,
    RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Objects larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
const PART_SIZE: usize = 8 << 20;

/// How to reach S3. Every field has a CLI flag and environment twin in the binaries; the
/// credentials default to the standard AWS chain (AWS_ACCESS_KEY_ID, profiles, IRSA, …).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct S3Config {
    /// e.g. http://127.0.0.1:3900; None = AWS
    pub endpoint: Option<String>,
    /// signing region; must equal the server's region (Garage: `s3_region`)
    pub region: Option<String>,
    /// path-style addressing; defaults to true when an endpoint is set
    pub path_style: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl S3Config {
    fn endpoint_label(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| "AWS S3".into())
    }
}

/// One cached client per (thread, runtime, config). An SDK client's connection pool spawns its
/// connection tasks on the runtime that first used it; once that runtime is dropped, every pooled
/// connection fails with "runtime dropped the dispatch task". So a client is only reused on the
/// runtime that built it: the cache is per thread (tokio's worker and blocking threads belong to
/// one runtime) and each entry holds a liveness token owned by a task on its runtime, which dies
/// with the runtime (covers several runtimes run one after another on the same thread).
struct CachedClient {
    alive: std::sync::Weak<()>,
    client: Client,
}

thread_local! {
    static CLIENTS: RefCell<HashMap<S3Config, CachedClient>> = RefCell::new(HashMap::new());
}

async fn client_for(cfg: &S3Config) -> Client {
    let cached = CLIENTS.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|_, v| v.alive.strong_count() > 0);
        c.get(cfg).map(|v| v.client.clone())
    });
    if let Some(c) = cached {
        return c;
    }
    let region = Region::new(cfg.region.clone().unwrap_or_else(|| "us-east-1".into()));
    // A hanging endpoint costs at most OPERATION_TIMEOUT per call (3 attempts of 20 s inside
    // it): callers' own retries and the shard time limit stay meaningful.
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build();
    let mut b = match (&cfg.access_key_id, &cfg.secret_access_key) {
        (Some(ak), Some(sk)) => aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(Credentials::new(ak, sk, None, None, "defectforge-static")),
        _ => {
            let shared = aws_config::defaults(BehaviorVersion::latest())
                .region(region.clone())
                .load()
                .await;
            aws_sdk_s3::config::Builder::from(&shared)
        }
    };
    b = b
        .region(region)
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(3));
    if let Some(ep) = &cfg.endpoint {
        b = b
            .endpoint_url(ep)
            .force_path_style(cfg.path_style.unwrap_or(true))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    } else if let Some(ps) = cfg.path_style {
        b = b.force_path_style(ps);
    }
    let client = Client::from_conf(b.build());
    let token = Arc::new(());
    let alive = Arc::downgrade(&token);
    tokio::spawn(async move {
        let _token = token;
        std::future::pending::<()>().await
    });
    CLIENTS.with(|c| {
        c.borrow_mut().insert(
            cfg.clone(),
            CachedClient {
                alive,
                client: client.clone(),
            },
        )
    });
    client
}

#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
}

impl S3Store {
    pub async fn new(cfg: &S3Config, bucket: &str, prefix: &str) -> Self {
        Self {
            client: client_for(cfg).await,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: cfg.endpoint_label(),
        }
    }

    fn full(&self, key: &str) -> Result<String, StoreError> {
        check_key(key)?;
        Ok(if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }

    fn rel(&self, full: &str) -> String {
        if self.prefix.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(&format!("{}/", self.prefix))
                .unwrap_or(full)
                .to_string()
        }
    }

    fn map_err<E>(
        &self,
        key: &str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let uri = self.uri(key);
        let status = e.raw_response().map(|r| r.status().as_u16());
        let code = e.code().map(str::to_string);
        let message = brief(&e);
        let full = format!("{}", DisplayErrorContext(&e));
        if full.contains("loading credentials")
            || full.contains("no credentials")
            || full.contains("CredentialsNotLoaded")
        {
            return StoreError::Auth {
                uri,
                message: format!("no usable AWS credentials ({message})"),
            };
        }
        match (&e, status, code.as_deref()) {
            (_, _, Some("NoSuchBucket")) => StoreError::NoBucket {
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
            },
            (_, _, Some("NoSuchKey")) | (_, Some(404), _) => StoreError::NotFound { uri },
            (_, _, Some("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied"))
            | (_, Some(401 | 403), _) => StoreError::Auth {
                uri,
                message: code.unwrap_or_else(|| format!("HTTP {}", status.unwrap_or(403))),
            },
            (
                SdkError::TimeoutError(_)
                | SdkError::DispatchFailure(_)
                | SdkError::ResponseError(_),
                _,
                _,
            ) => StoreError::Transient {
                uri,
                message: format!("cannot reach {}: {message}", self.endpoint),
            },
            (_, Some(s), _) if s >= 500 || s == 429 => StoreError::Transient { uri, message },
            (
                _,
                _,
                Some("SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout"),
            ) => StoreError::Transient { uri, message },
            _ => StoreError::Other { uri, message },
        }
    }

    async fn put_multipart(
        &self,
        key: &str,
        full: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<(), StoreError> {
        let up = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .content_type(content_type)
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        let upload_id = up.upload_id().unwrap_or_default().to_string();
        let result: Result<(), StoreError> = async {
            let mut parts = vec![];
            for (i, chunk) in body.chunks(PART_SIZE).enumerate() {
                let n = i as i32 + 1;
                let p = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .body(ByteStream::from(body.slice_ref(chunk)))
                    .send()
                    .await
                    .map_err(|e| self.map_err(key, e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(p.e_tag().map(Into::into))
                        .build(),
                );
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| self.map_err(key, e))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }
}

/// The error and its innermost cause, short enough for a log line or a failure record.
fn brief(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    let mut last = None;
    while let Some(s) = src {
        last = Some(s.to_string());
        src = s.source();
    }
    if let Some(l) = last {
        if !parts[0].contains(&l) {
            parts.push(l);
        }
    }
    let mut m = parts.join(": ");
    if m.len() > 300 {
        let mut cut = 300;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push('…');
    }
    m
}

fn to_chrono(t: Option<&aws_sdk_s3::primitives::DateTime>) -> chrono::DateTime<chrono::Utc> {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos()))
        .unwrap_or_else(chrono::Utc::now)
}

/// The longest one S3 request attempt may take (a part of a multipart upload is one request).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest one S3 operation may take, its SDK retries included.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(45);

#[async_trait]
impl ObjectStore for S3Store {
    fn root_uri(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StoreError> {
        let full = self.full(key)?;
        if body.len() > MULTIPART_THRESHOLD {
            return self.put_multipart(key, &full, body, content_type).await;
        }
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .content_type(content_type)
            .content_length(body.len() as i64)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.get_limited(key, u64::MAX).await
    }

    async fn get_limited(&self, key: &str, limit: u64) -> Result<Bytes, StoreError> {
        let full = self.full(key)?;
        // A body that breaks off mid-stream is re-requested: the object itself is immutable.
        let mut tries = 0;
        loop {
            tries += 1;
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| self.map_err(key, e))?;
            let size = out.content_length().unwrap_or(0).max(0) as u64;
            if size > limit {
                return Err(StoreError::TooLarge {
                    uri: self.uri(key),
                    size,
                    limit,
                });
            }
            match out.body.collect().await {
                Ok(data) => return Ok(data.into_bytes()),
                Err(e) if tries < 3 => {
                    tracing::debug!("re-reading {}: the body broke off ({e})", self.uri(key));
                }
                Err(e) => {
                    return Err(StoreError::Transient {
                        uri: self.uri(key),
                        message: format!("reading the body failed: {}", brief(&e)),
                    })
                }
            }
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let full = self.full(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(h) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: h.content_length().unwrap_or(0).max(0) as u64,
                last_modified: to_chrono(h.last_modified()),
            })),
            Err(e) => match self.map_err(key, e) {
                StoreError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let full_prefix = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        let mut out = vec![];
        let mut token: Option<String> = None;
        loop {
            let resp = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| self.map_err(prefix, e))?;
            for o in resp.contents() {
                if let Some(k) = o.key() {
                    out.push(ObjectMeta {
                        key: self.rel(k),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        last_modified: to_chrono(o.last_modified()),
                    });
                }
            }
            match resp.next_continuation_token() {
                Some(t) if resp.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.map_err(key, e))?;
        Ok(())
    }

    async fn check(&self) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                match (status, self.map_err("", e)) {
                    (Some(404), _) => Err(StoreError::NoBucket {
                        bucket: self.bucket.clone(),
                        endpoint: self.endpoint.clone(),
                    }),
                    (_, StoreError::Auth { message, .. }) => Err(StoreError::Auth {
                        uri: self.root_uri(),
                        message,
                    }),
                    (_, other) => Err(other),
                }
            }
        }
    }
}
