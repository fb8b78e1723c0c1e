//! Command-line pieces shared by the worker and the coordinator binaries: S3 and AMQP settings
//! (every flag with its environment twin; credentials never echoed) and logging set-up.

use clap::Args;
use defectforge::queue::AmqpConfig;
use defectforge::store::S3Config;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// S3 endpoint URL for S3-compatible servers (Garage, MinIO, Ceph), e.g. http://127.0.0.1:3900; unset = AWS
    #[arg(long, env = "DEFECTFORGE_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 signing region; must equal the server's region (Garage: s3_region); falls back to AWS_REGION
    #[arg(long, env = "DEFECTFORGE_S3_REGION")]
    pub s3_region: Option<String>,
    /// path-style addressing (default: on when --s3-endpoint is set, off for AWS)
    #[arg(long, env = "DEFECTFORGE_S3_PATH_STYLE")]
    pub s3_path_style: Option<bool>,
    /// access key id (standard AWS variable); unset = the default AWS credential chain
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key_id: Option<String>,
    /// secret access key (standard AWS variable); never logged
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
}

impl S3Args {
    pub fn config(&self) -> S3Config {
        S3Config {
            endpoint: self.s3_endpoint.clone(),
            region: self
                .s3_region
                .clone()
                .or_else(|| std::env::var("AWS_REGION").ok())
                .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok()),
            path_style: self.s3_path_style,
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct AmqpArgs {
    /// RabbitMQ URL (amqp://user:pass@host:5672/%2f); the password is never logged
    #[arg(
        long,
        env = "DEFECTFORGE_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub amqp_url: String,
    /// work queue name (the dead-letter queue is <queue>.dead)
    #[arg(long, env = "DEFECTFORGE_QUEUE", default_value = "defectforge.shards")]
    pub queue: String,
    /// deliveries of one shard before the broker dead-letters it (crash-loop backstop)
    #[arg(long, env = "DEFECTFORGE_DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,
    /// seconds to wait for a broker connection or a publisher confirm
    #[arg(long, env = "DEFECTFORGE_AMQP_TIMEOUT_S", default_value_t = 30)]
    pub amqp_timeout_s: u64,
}

impl AmqpArgs {
    pub fn config(&self, connection_name: &str) -> AmqpConfig {
        AmqpConfig {
            url: self.amqp_url.clone(),
            queue: self.queue.clone(),
            delivery_limit: self.delivery_limit,
            timeout: Duration::from_secs(self.amqp_timeout_s.max(1)),
            connection_name: connection_name.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr through tracing; RUST_LOG filters (default info).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,aws=warn,lapin=warn,aws_smithy_runtime=warn,aws_config=error",
        )
    });
    // The AMQP client logs its frames, the login frame with the password among them, at debug
    // and trace: its events above info are dropped, whatever RUST_LOG asks.
    let quiet_amqp = tracing_subscriber::filter::filter_fn(|m| {
        *m.level() <= tracing::Level::INFO
            || !(m.target().starts_with("lapin") || m.target().starts_with("amq_protocol"))
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().finish().with(quiet_amqp).try_init(),
        LogFormat::Text => b.finish().with(quiet_amqp).try_init(),
    };
}
