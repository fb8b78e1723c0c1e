//! `defectforge`: the coordinator CLI. It plans campaigns, publishes their shards to RabbitMQ,
//! follows progress from the object store (the source of truth), and compacts committed shard
//! fragments into the Parquet manifest. `run` does everything in one process with no services.

mod commands;
mod embedded;

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
    /// Print planned, committed (verified: every commit read and its objects listed), failed
    /// and dead counts, invalid commits and the failure records
    Status {
        #[command(flatten)]
        c: CampaignRef,
        /// print JSON
        #[arg(long, env = "DEFECTFORGE_JSON")]
        json: bool,
        /// count every fragment as a commit without reading it (fast on huge campaigns; says
        /// "unverified")
        #[arg(long, env = "DEFECTFORGE_QUICK")]
        quick: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Publish the shards that have no valid commit — never committed, or whose commit lost
    /// objects or does not hold the planned samples (skipping dead-lettered ones)
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
        /// write the manifest even when shards have no valid commit (it records which, and
        /// `complete: false`); without it an incomplete campaign writes nothing and exits 2
        #[arg(long, env = "DEFECTFORGE_ALLOW_PARTIAL")]
        allow_partial: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// List the dead-lettered jobs with why each died (all campaigns on the queue)
    Dead {
        /// print JSON
        #[arg(long, env = "DEFECTFORGE_JSON")]
        json: bool,
        #[command(flatten)]
        amqp: AmqpArgs,
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
    /// Learned defect masks: sample a mask bank for campaigns with mask = "bank"
    Masks {
        #[command(subcommand)]
        cmd: MasksCmd,
    },
    /// Import and inspect AnomalyDiffusion models
    Models {
        #[command(subcommand)]
        cmd: ModelsCmd,
    },
    /// Does the data help? Train the paper's detector (DRAEM's discriminative U-Net) per
    /// category and seed on half real normals and half a campaign's generated pairs, score it on
    /// the real test defects the generator never saw; several campaigns: one comparison table
    Eval {
        /// evaluation spec (TOML, see configs/eval/)
        spec: PathBuf,
        /// compare these campaign folders (<output>/campaigns/<id>) instead of the spec's
        #[arg(long, env = "DEFECTFORGE_EVAL_COMPARE", num_args = 1.., value_delimiter = ',')]
        compare: Vec<String>,
        /// print results.json instead of the table
        #[arg(long, env = "DEFECTFORGE_JSON")]
        json: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Learn new defect types from a few real examples (AnomalyDiffusion's embeddings and
    /// spatial encoder, the official recipe); the result is a model campaigns can use
    Train {
        #[command(subcommand)]
        cmd: TrainCmd,
    },
}

#[derive(Debug, Subcommand)]
enum TrainCmd {
    /// Train on this machine, or resume the run of the same name from its newest checkpoint:
    /// checkpoints, the training log (Parquet) and preview grids go to the spec's output;
    /// prints the trained model's URI
    Run {
        spec: PathBuf,
        /// stop after this step (the run resumes from there later)
        #[arg(long, env = "DEFECTFORGE_TRAIN_STOP_AT")]
        stop_at: Option<u64>,
        /// local model cache
        #[arg(long, env = "DEFECTFORGE_MODEL_CACHE", default_value_os_t = defectforge_worker::models::default_cache_dir())]
        model_cache: PathBuf,
        /// local scratch folder for writing the trained model
        #[arg(long, env = "DEFECTFORGE_STAGING", default_value_os_t = std::env::temp_dir())]
        staging: PathBuf,
        /// print the run's result record as JSON instead of the model URI
        #[arg(long, env = "DEFECTFORGE_JSON")]
        json: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Record the run and queue it for the worker fleet (segments of `segment_steps`, each
    /// committed and followed by the next); prints the run id. Again later: resumes it
    Submit {
        spec: PathBuf,
        #[command(flatten)]
        amqp: AmqpArgs,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Follow a run until it finishes (exit 0), is cancelled (3) or the timeout passes (1)
    Watch {
        spec: PathBuf,
        /// seconds between looks at the store
        #[arg(long, env = "DEFECTFORGE_WATCH_INTERVAL_S", default_value_t = 10)]
        interval_s: u64,
        #[arg(long, env = "DEFECTFORGE_WATCH_TIMEOUT_S")]
        timeout_s: Option<u64>,
        #[command(flatten)]
        s3: S3Args,
    },
    /// A run's progress from its store: newest checkpoint, recent losses, the result
    Status {
        spec: PathBuf,
        #[arg(long, env = "DEFECTFORGE_JSON")]
        json: bool,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Stop a run at its next checkpoint (`train run` or `train submit` again resumes it)
    Cancel {
        spec: PathBuf,
        #[command(flatten)]
        s3: S3Args,
    },
}

#[derive(Debug, Subcommand)]
enum MasksCmd {
    /// Sample N accepted masks per defect type with the types' learned mask models (classifier-
    /// free guidance, official post-processing) into <to>/<category>/<defect>/, with
    /// provenance.json; running again completes a bank instead of starting over
    Generate {
        /// the model URI printed by `defectforge models import` (imported with --mask-embeddings)
        #[arg(long, env = "DEFECTFORGE_MASK_MODEL")]
        model: String,
        /// defect types as <category>+<defect>, comma-separated
        #[arg(
            long,
            env = "DEFECTFORGE_MASK_TYPES",
            value_delimiter = ',',
            required = true
        )]
        types: Vec<String>,
        /// masks per type
        #[arg(long, env = "DEFECTFORGE_MASK_COUNT")]
        count: u64,
        /// the bank: a directory or s3://bucket/prefix
        #[arg(long, env = "DEFECTFORGE_MASK_BANK")]
        to: String,
        /// bank seed (mask i of a type is drawn from a seed derived from it)
        #[arg(long, env = "DEFECTFORGE_MASK_SEED", default_value_t = 0)]
        seed: u64,
        /// use this mask embedding for every type instead of <category>+<defect>
        #[arg(long, env = "DEFECTFORGE_MASK_EMBEDDING")]
        embedding: Option<String>,
        /// DDIM steps (official: 100)
        #[arg(long, env = "DEFECTFORGE_MASK_STEPS", default_value_t = 100)]
        steps: u32,
        /// DDIM eta (official: 1)
        #[arg(long, env = "DEFECTFORGE_MASK_ETA", default_value_t = 1.0)]
        eta: f32,
        /// classifier-free guidance scale (official: 5)
        #[arg(long, env = "DEFECTFORGE_MASK_GUIDANCE", default_value_t = 5.0)]
        guidance: f32,
        /// binarisation threshold on the decoded RGB mean in [-1, 1] (official: 0.8)
        #[arg(
            long,
            env = "DEFECTFORGE_MASK_THRESHOLD",
            default_value_t = 0.8,
            allow_hyphen_values = true
        )]
        threshold: f32,
        /// draws per mask before giving up
        #[arg(long, env = "DEFECTFORGE_MASK_MAX_ATTEMPTS", default_value_t = 16)]
        max_attempts: u32,
        /// masks per model call
        #[arg(long, env = "DEFECTFORGE_MASK_BATCH", default_value_t = 8)]
        batch: u32,
        /// prompt with the placeholder *, or "random" for the official templates
        #[arg(long, env = "DEFECTFORGE_MASK_PROMPT", default_value = "random")]
        prompt: defectforge::campaign::Prompt,
        /// also reject masks that vanish at the 32x32 latent grid
        #[arg(long, env = "DEFECTFORGE_MASK_REJECT_THIN")]
        reject_thin: bool,
        /// masks per job (rounded up to whole --batch batches)
        #[arg(long, env = "DEFECTFORGE_MASK_CHUNK", default_value_t = defectforge_worker::masks::bank::DEFAULT_CHUNK)]
        chunk: u64,
        /// publish the bank's jobs to the broker for the worker fleet and wait for them, instead
        /// of sampling in this process (embedded)
        #[arg(long, env = "DEFECTFORGE_MASK_SUBMIT")]
        submit: bool,
        /// embedded: sampling workers in this process
        #[arg(long, env = "DEFECTFORGE_MASK_WORKERS", default_value_t = 1)]
        workers: usize,
        /// --submit: give up waiting after this many seconds (0: wait until done); the jobs stay
        /// queued and running the command again continues the bank
        #[arg(long, env = "DEFECTFORGE_MASK_TIMEOUT_S", default_value_t = 0)]
        timeout_s: u64,
        #[command(flatten)]
        amqp: AmqpArgs,
        /// local model cache
        #[arg(long, env = "DEFECTFORGE_MODEL_CACHE", default_value_os_t = defectforge_worker::models::default_cache_dir())]
        model_cache: PathBuf,
        /// print the provenance as JSON
        #[arg(long, env = "DEFECTFORGE_JSON")]
        json: bool,
        #[command(flatten)]
        s3: S3Args,
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
        #[arg(
            long = "mask-embeddings",
            env = "DEFECTFORGE_MASK_EMBEDDINGS",
            value_delimiter = ','
        )]
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
        Cmd::Status { c, json, quick, s3 } => {
            commands::status(&c, json, !quick, &s3.config()).await
        }
        Cmd::Dead { json, amqp } => commands::dead(json, &amqp).await,
        Cmd::Resume {
            c,
            include_dead,
            amqp,
            s3,
        } => commands::resume(&c, include_dead, &amqp, &s3.config()).await,
        Cmd::Cancel { c, s3 } => commands::cancel(&c, &s3.config()).await,
        Cmd::Finalize {
            c,
            no_verify,
            allow_partial,
            s3,
        } => commands::finalize(&c, !no_verify, allow_partial, &s3.config()).await,
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
                        lineage: None,
                    };
                    commands::models_import(inputs, &to, &staging, json, &s3.config()).await
                }
                Err(e) => Err(e.into()),
            }
        }
        Cmd::Masks {
            cmd:
                MasksCmd::Generate {
                    model,
                    types,
                    count,
                    to,
                    seed,
                    embedding,
                    steps,
                    eta,
                    guidance,
                    threshold,
                    max_attempts,
                    batch,
                    prompt,
                    reject_thin,
                    chunk,
                    submit,
                    workers,
                    timeout_s,
                    amqp,
                    model_cache,
                    json,
                    s3,
                },
        } => {
            let settings = defectforge::campaign::MaskModelSettings {
                model: Some(model.clone()),
                embedding,
                steps,
                eta,
                guidance,
                threshold,
                max_attempts,
                prompt,
                batch,
                reject_thin,
            };
            let req = defectforge_worker::masks::bank::BankRequest {
                model,
                types,
                count,
                seed,
                settings,
                dest: to,
            };
            let how = commands::BankRunArgs {
                chunk,
                submit: submit.then_some(amqp),
                workers,
                timeout_s,
                model_cache,
            };
            commands::masks_generate(req, how, json, &s3.config()).await
        }
        Cmd::Models {
            cmd: ModelsCmd::Show { model, s3 },
        } => commands::models_show(&model, &s3.config()).await,
        Cmd::Train {
            cmd:
                TrainCmd::Run {
                    spec,
                    stop_at,
                    model_cache,
                    staging,
                    json,
                    s3,
                },
        } => commands::train_run(&spec, stop_at, model_cache, staging, json, &s3.config()).await,
        Cmd::Train {
            cmd: TrainCmd::Status { spec, json, s3 },
        } => commands::train_status(&spec, json, &s3.config()).await,
        Cmd::Train {
            cmd: TrainCmd::Submit { spec, amqp, s3 },
        } => commands::train_submit(&spec, &amqp, &s3.config()).await,
        Cmd::Train {
            cmd:
                TrainCmd::Watch {
                    spec,
                    interval_s,
                    timeout_s,
                    s3,
                },
        } => commands::train_watch(&spec, interval_s, timeout_s, &s3.config()).await,
        Cmd::Train {
            cmd: TrainCmd::Cancel { spec, s3 },
        } => commands::train_cancel(&spec, &s3.config()).await,
        Cmd::Eval {
            spec,
            compare,
            json,
            s3,
        } => commands::eval(&spec, compare, json, &s3.config()).await,
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("defectforge: error: {e:#}");
            std::process::exit(1);
        }
    }
}
