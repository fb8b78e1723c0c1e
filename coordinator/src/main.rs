//! `defectforge`: the coordinator CLI. It plans campaigns, publishes their shards to RabbitMQ,
//! follows progress from the object store (the source of truth), and compacts committed shard
//! fragments into the Parquet manifest. `run` does everything in one process with no services.

mod commands;

use anyhow::Result;
use clap::{Parser, Subcommand};
use defectforge_worker::cli::{init_logging, AmqpArgs, LogFormat, S3Args};
use std::path::PathBuf;

/// Few-shot industrial defect synthesis at scale: plan, submit and finalize campaigns.
#[derive(Debug, Parser)]
#[command(name = "defectforge", version)]
struct Cli {
    /// log format (logs go to stderr)
    #[arg(long, env = "DEFECTFORGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// A campaign reference: a campaign id (with --output), or the path of its campaign file.
#[derive(Debug, Clone, clap::Args)]
pub struct CampaignRef {
    /// campaign id as printed by `submit`, or the campaign file
    pub campaign: String,
    /// the campaign's output location (directory or s3://bucket/prefix); not needed with a campaign file
    #[arg(long, env = "DEFECTFORGE_OUTPUT")]
    pub output: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Validate a campaign and print its plan (counts, shards, digest); touches no service
    Plan {
        /// campaign file (TOML)
        campaign: PathBuf,
        /// print JSON
        #[arg(long, env = "DEFECTFORGE_JSON")]
        json: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Record a campaign in the output store and publish its shards; prints the campaign id
    Submit {
        campaign: PathBuf,
        #[command(flatten)]
        amqp: AmqpArgs,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Follow a campaign with a progress bar until every shard is committed or failed
    Watch {
        #[command(flatten)]
        c: CampaignRef,
        /// seconds between polls
        #[arg(long, env = "DEFECTFORGE_POLL_S", default_value_t = 2.0)]
        interval_s: f64,
        /// give up after this many seconds (exit 1)
        #[arg(long, env = "DEFECTFORGE_WATCH_TIMEOUT_S")]
        timeout_s: Option<u64>,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Print planned, committed, failed and dead counts and the failure records
    Status {
        #[command(flatten)]
        c: CampaignRef,
        /// print JSON
        #[arg(long, env = "DEFECTFORGE_JSON")]
        json: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Publish the shards that have no committed attempt (skipping dead-lettered ones)
    Resume {
        #[command(flatten)]
        c: CampaignRef,
        /// also publish shards that have a failure record (they may be in the dead-letter queue too)
        #[arg(long, env = "DEFECTFORGE_INCLUDE_DEAD")]
        include_dead: bool,
        #[command(flatten)]
        amqp: AmqpArgs,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Mark a campaign cancelled: workers ack and skip its shards; finalize still works
    Cancel {
        #[command(flatten)]
        c: CampaignRef,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Compact committed fragments into manifest/part-*.parquet (one attempt per shard)
    Finalize {
        #[command(flatten)]
        c: CampaignRef,
        /// skip checking that every object a row names exists with its recorded size
        #[arg(long, env = "DEFECTFORGE_NO_VERIFY")]
        no_verify: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Move a campaign's dead-lettered shards back to the work queue (after fixing their inputs)
    RequeueDead {
        #[command(flatten)]
        c: CampaignRef,
        #[command(flatten)]
        amqp: AmqpArgs,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Delete objects no committed attempt references, older than the shard time limit
    Gc {
        #[command(flatten)]
        c: CampaignRef,
        /// only report what would be deleted
        #[arg(long, env = "DEFECTFORGE_DRY_RUN")]
        dry_run: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Embedded mode: plan, generate with in-process workers, finalize — no RabbitMQ, no S3
    Run {
        campaign: PathBuf,
        /// worker tasks (default: available cores)
        #[arg(long, env = "DEFECTFORGE_WORKERS")]
        workers: Option<usize>,
        /// write results here instead of the campaign's output
        #[arg(long, env = "DEFECTFORGE_OUTPUT")]
        output: Option<String>,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Write the procedural demo dataset (MVTec layout) into a directory
    DemoData { dir: PathBuf },
    /// Import and inspect AnomalyDiffusion models
    Models {
        #[command(subcommand)]
        cmd: ModelsCmd,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsCmd {
    /// Convert the official files (LDM model.ckpt + YAML + vocab.txt, embeddings.pt,
    /// spatial_encoder.pt) into a content-hashed model directory under <to>/models/<id>;
    /// prints the model URI to put in campaigns (anomalydiffusion.model)
    Import {
        /// the LDM txt2img checkpoint (model.ckpt, or its safetensors twin)
        #[arg(long, env = "DEFECTFORGE_LDM_CKPT")]
        ldm_ckpt: PathBuf,
        /// the LDM config: the official YAML (txt2img-1p4B-eval.yaml) or its JSON equivalent
        #[arg(long, env = "DEFECTFORGE_LDM_CONFIG")]
        ldm_config: PathBuf,
        /// bert-base-uncased's vocab.txt
        #[arg(long, env = "DEFECTFORGE_VOCAB")]
        vocab: PathBuf,
        /// the AnomalyDiffusion embeddings.pt (or a flat safetensors copy)
        #[arg(long, env = "DEFECTFORGE_EMBEDDINGS")]
        embeddings: PathBuf,
        /// the AnomalyDiffusion spatial_encoder.pt (or safetensors)
        #[arg(long, env = "DEFECTFORGE_SPATIAL_ENCODER")]
        spatial_encoder: PathBuf,
        /// the spatial encoder's shape as JSON (default: inferred from its tensors)
        #[arg(long, env = "DEFECTFORGE_SPATIAL_CONFIG")]
        spatial_config: Option<PathBuf>,
        /// a per-type mask model (train_mask.py's embeddings.pt) as <category>+<defect>=<file>,
        /// or a safetensors file whose embeddings are already named; repeat per type (the
        /// variable takes a comma-separated list)
        #[arg(long = "mask-embeddings", env = "DEFECTFORGE_MASK_EMBEDDINGS", value_delimiter = ',')]
        mask_embeddings: Vec<String>,
        /// where models live: a directory or s3://bucket/prefix (the model goes to <to>/models/<id>)
        #[arg(long, env = "DEFECTFORGE_MODELS")]
        to: String,
        /// local scratch folder for the conversion (needs about twice the checkpoint's size)
        #[arg(long, env = "DEFECTFORGE_STAGING", default_value_os_t = std::env::temp_dir())]
        staging: PathBuf,
        /// print the manifest as JSON instead of the URI
        #[arg(long, env = "DEFECTFORGE_JSON")]
        json: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Print a model's manifest (model.json) after checking it
    Show {
        /// the model URI printed by `models import` (…/models/<id>)
        model: String,
        #[command(flatten)]
        s3: S3Args,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let r: Result<i32> = match cli.cmd {
        Cmd::Plan { campaign, json, s3 } => commands::plan(&campaign, json, &s3.config()).await,
        Cmd::Submit { campaign, amqp, s3 } => {
            commands::submit(&campaign, &amqp, &s3.config()).await
        }
        Cmd::Watch {
            c,
            interval_s,
            timeout_s,
            s3,
        } => commands::watch(&c, interval_s, timeout_s, &s3.config()).await,
        Cmd::Status { c, json, s3 } => commands::status(&c, json, &s3.config()).await,
        Cmd::Resume {
            c,
            include_dead,
            amqp,
            s3,
        } => commands::resume(&c, include_dead, &amqp, &s3.config()).await,
        Cmd::Cancel { c, s3 } => commands::cancel(&c, &s3.config()).await,
        Cmd::Finalize { c, no_verify, s3 } => {
            commands::finalize(&c, !no_verify, &s3.config()).await
        }
        Cmd::RequeueDead { c, amqp, s3 } => commands::requeue_dead(&c, &amqp, &s3.config()).await,
        Cmd::Gc { c, dry_run, s3 } => commands::gc(&c, dry_run, &s3.config()).await,
        Cmd::Run {
            campaign,
            workers,
            output,
            s3,
        } => commands::run(&campaign, workers, output, &s3.config()).await,
        Cmd::DemoData { dir } => defectforge::demo::materialise(&dir)
            .map(|_| 0)
            .map_err(Into::into),
        Cmd::Models {
            cmd:
                ModelsCmd::Import {
                    ldm_ckpt,
                    ldm_config,
                    vocab,
                    embeddings,
                    spatial_encoder,
                    spatial_config,
                    mask_embeddings,
                    to,
                    staging,
                    json,
                    s3,
                },
        } => {
            match mask_embeddings
                .iter()
                .map(|s| defectforge_worker::models::parse_mask_embedding_arg(s))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(mask_embeddings) => {
                    let inputs = defectforge_worker::models::ImportInputs {
                        ldm_checkpoint: ldm_ckpt,
                        ldm_config,
                        vocab,
                        embeddings,
                        spatial_encoder,
                        spatial_config,
                        mask_embeddings,
                    };
                    commands::models_import(inputs, &to, &staging, json, &s3.config()).await
                }
                Err(e) => Err(e.into()),
            }
        }
        Cmd::Models {
            cmd: ModelsCmd::Show { model, s3 },
        } => commands::models_show(&model, &s3.config()).await,
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("defectforge: error: {e:#}");
            std::process::exit(1);
        }
    }
}
