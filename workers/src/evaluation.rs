//! `defectforge eval`: trains the paper's localisation model (DRAEM's discriminative U-Net,
//! `defectforge_engine::detect`) per category and seed on half real normal images and half a
//! campaign's generated pairs, and scores it on the real test defects the generator never saw
//! (docs/evaluation.md). Several campaigns share the detector, the seeds and the test set.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use defectforge::evaluation::{
    campaign_location, comparison_table, scores_parquet, summarise, test_set, CampaignSummary,
    EvalSpec, ImageScore, Metrics, Protocol, SeedResult, TestImage,
};
use defectforge::ledger::{read_record, CampaignRecord, ManifestIndex};
use defectforge::manifest::ManifestRow;
use defectforge::store::{self, S3Config};
use defectforge_engine::detect::{focal_loss, Detector};
use defectforge_engine::noise::SplitMix64;
use defectforge_engine::train::adam::{Adam, AdamConfig};
use defectforge_engine::{Device, Tensor};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};
use tracing::info;

/// One image (and mask) prepared for the detector: CHW floats in [0, 1] and a 0/1 mask.
#[derive(Clone)]
pub(crate) struct Prepared {
    pub(crate) rgb: Vec<f32>,
    pub(crate) mask: Vec<f32>,
}

/// Everything an evaluation produced (`results.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub name: String,
    pub protocol: Protocol,
    pub dataset: String,
    pub spec: EvalSpec,
    /// the detector family and how it was initialised
    pub detector: String,
    /// category → the real test images scored (identities)
    pub test_sets: BTreeMap<String, Vec<TestImage>>,
    pub results: Vec<SeedResult>,
    /// campaign → metric → mean ± std over seeds of the category average
    pub summaries: BTreeMap<String, CampaignSummary>,
    /// the comparison table as printed
    pub table: String,
    pub finished_at: chrono::DateTime<chrono::Utc>,
}

struct Campaign {
    uri: String,
    rec: CampaignRecord,
    rows: Vec<ManifestRow>,
}

async fn load_campaign(uri: &str, s3: &S3Config) -> Result<Campaign> {
    let (root, cid) = campaign_location(uri).map_err(|e| anyhow!(e))?;
    let st = store::open(&root, s3)
        .await
        .with_context(|| format!("cannot open the campaign store {root}"))?;
    let rec = read_record(st.as_ref(), &cid)
        .await
        .with_context(|| format!("campaign {uri}"))?;
    let key = defectforge::layout::manifest_index(&cid);
    let index: ManifestIndex = match st.get(&key).await {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{} is not a manifest index", st.uri(&key)))?,
        Err(store::StoreError::NotFound { .. }) => bail!(
            "campaign {uri} has no manifest: finalize it first (`defectforge finalize {cid} --output {root}`)"
        ),
        Err(e) => return Err(e).context(format!("cannot read {}", st.uri(&key))),
    };
    let mut rows = vec![];
    for part in &index.parts {
        // parts are listed as full URIs (or keys): the key starts at the manifest prefix
        let prefix = defectforge::layout::manifest_prefix(&cid);
        let key = part.rfind(&prefix).map_or(part.as_str(), |i| &part[i..]);
        let b = st
            .get(key)
            .await
            .with_context(|| format!("cannot read manifest part {part}"))?;
        rows.extend(defectforge::manifest::read_rows(b, &st.uri(key))?);
    }
    if rows.is_empty() {
        bail!("campaign {uri} has an empty manifest: there is nothing to train a detector on");
    }
    Ok(Campaign {
        uri: uri.to_string(),
        rec,
        rows,
    })
}

async fn read(uri: &str, s3: &S3Config) -> Result<Bytes> {
    defectforge::dataset::read_file(uri, s3)
        .await
        .map_err(|e| anyhow!("cannot read {uri}: {e}"))
}

fn prepare(img: &RgbImage, mask: Option<&GrayImage>, size: u32) -> Prepared {
    let img = image::imageops::resize(img, size, size, image::imageops::FilterType::Triangle);
    let n = (size * size) as usize;
    let mut rgb = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            rgb[c * n + i] = p.0[c] as f32 / 255.0;
        }
    }
    let mask = match mask {
        Some(m) => {
            // bilinear, then ≥ 0.5 (the official loader's cast keeps only exact ones; see docs)
            let m = image::imageops::resize(m, size, size, image::imageops::FilterType::Triangle);
            m.pixels()
                .map(|p| if p.0[0] >= 128 { 1.0 } else { 0.0 })
                .collect()
        }
        None => vec![0.0; n],
    };
    Prepared { rgb, mask }
}

async fn load_pair(image: &str, mask: Option<&str>, size: u32, s3: &S3Config) -> Result<Prepared> {
    let ib = read(image, s3).await?;
    let img = defectforge::imaging::decode_rgb(&ib, "image", image)?;
    let m = match mask {
        Some(u) => {
            let mb = read(u, s3).await?;
            let m = defectforge::imaging::decode_mask(&mb, u)?;
            if m.dimensions() != img.dimensions() {
                bail!(
                    "mask {u} is {}×{} but its image {image} is {}×{}: give the mask of that image",
                    m.width(),
                    m.height(),
                    img.width(),
                    img.height()
                );
            }
            Some(m)
        }
        None => None,
    };
    Ok(prepare(&img, m.as_ref(), size))
}

/// Training data of one category: real normals and generated pairs by defect type.
struct TrainData {
    normals: Vec<Prepared>,
    generated: Vec<Vec<Prepared>>,
}

fn batch_tensors(items: &[&Prepared], size: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let n = items.len();
    let x: Vec<f32> = items.iter().flat_map(|p| p.rgb.iter().copied()).collect();
    let m: Vec<f32> = items.iter().flat_map(|p| p.mask.iter().copied()).collect();
    Ok((
        Tensor::from_vec(x, (n, 3, size, size), dev)?,
        Tensor::from_vec(m, (n, 1, size, size), dev)?,
    ))
}

/// Scores `test` with `det`: (maps, image scores).
fn score(det: &Detector, test: &[Prepared], size: usize) -> Result<Vec<Vec<f32>>> {
    let mut maps = vec![];
    for chunk in test.chunks(8) {
        let refs: Vec<&Prepared> = chunk.iter().collect();
        let (x, _) = batch_tensors(&refs, size, det.device())?;
        let p = det.predict(&x)?.to_dtype(defectforge_engine::DType::F32)?;
        for i in 0..chunk.len() {
            maps.push(p.get(i)?.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(maps)
}

fn metrics_of(maps: &[Vec<f32>], test: &[Prepared], pick: &[usize], size: usize) -> Metrics {
    let m: Vec<&[f32]> = pick.iter().map(|&i| maps[i].as_slice()).collect();
    let gts: Vec<Vec<bool>> = pick
        .iter()
        .map(|&i| test[i].mask.iter().map(|&v| v > 0.5).collect())
        .collect();
    let g: Vec<&[bool]> = gts.iter().map(|v| v.as_slice()).collect();
    Metrics::compute(&m, &g, size, size)
}

/// What one trained detector scored.
struct Scored {
    epoch: u32,
    category: Metrics,
    per_type: BTreeMap<String, Metrics>,
    maps: Vec<Vec<f32>>,
    loss: f64,
}

fn evaluate_once(
    det: &Detector,
    test: &[Prepared],
    info: &[TestImage],
    size: usize,
) -> Result<(Metrics, BTreeMap<String, Metrics>, Vec<Vec<f32>>)> {
    let maps = score(det, test, size)?;
    let all: Vec<usize> = (0..test.len()).collect();
    let cat = metrics_of(&maps, test, &all, size);
    let mut per_type = BTreeMap::new();
    let types: std::collections::BTreeSet<&str> = info
        .iter()
        .filter(|t| t.defect_type != "good")
        .map(|t| t.defect_type.as_str())
        .collect();
    for ty in types {
        let pick: Vec<usize> = (0..test.len())
            .filter(|&i| info[i].defect_type == ty || info[i].defect_type == "good")
            .collect();
        per_type.insert(ty.to_string(), metrics_of(&maps, test, &pick, size));
    }
    Ok((cat, per_type, maps))
}

/// Trains one detector (fixed schedule) and scores it; the official protocol scores after
/// every epoch and keeps the best on the test set.
#[allow(clippy::too_many_arguments)]
fn train_and_score(
    spec: &EvalSpec,
    data: &TrainData,
    test: &[Prepared],
    info: &[TestImage],
    seed: u64,
    dev: &Device,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Scored> {
    let d = &spec.detector;
    let size = d.image_size as usize;
    let det = Detector::new(d.base_channels, seed, dev)?;
    let mut opt = Adam::new(det.named_params(), AdamConfig::adam(d.lr))?;
    let mut rng = SplitMix64::new(seed ^ 0xD5AE_u64.rotate_left(40));
    let types: Vec<&Vec<Prepared>> = data.generated.iter().filter(|g| !g.is_empty()).collect();
    let mut best: Option<Scored> = None;
    for epoch in 0..d.epochs {
        opt.set_lr(d.lr_at(epoch));
        let mut loss_sum = 0.0;
        let steps = d.steps_per_epoch();
        for step in 0..steps {
            let n = d
                .batch
                .min((d.epoch_samples - step * d.batch as u32) as usize);
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                let pick = (rng.next_u64() % data.normals.len() as u64) as usize;
                if rng.next_open01() < d.normal_fraction || types.is_empty() {
                    items.push(&data.normals[pick]);
                } else {
                    let t = types[(rng.next_u64() % types.len() as u64) as usize];
                    items.push(&t[(rng.next_u64() % t.len() as u64) as usize]);
                }
            }
            let (x, m) = batch_tensors(&items, size, dev)?;
            let logits = det.forward(&x, true)?;
            let loss = focal_loss(&logits, &m)?;
            let grads = loss.backward()?;
            opt.step(&grads)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
        }
        let mean_loss = loss_sum / steps as f64;
        progress(&format!(
            "seed {seed}: epoch {}/{} loss {mean_loss:.5}",
            epoch + 1,
            d.epochs
        ));
        let last = epoch + 1 == d.epochs;
        if spec.protocol == Protocol::Official || last {
            let (cat, per_type, maps) = evaluate_once(&det, test, info, size)?;
            let better = best
                .as_ref()
                .is_none_or(|b| cat.selection_score() > b.category.selection_score());
            if spec.protocol == Protocol::Honest || better {
                best = Some(Scored {
                    epoch: epoch + 1,
                    category: cat,
                    per_type,
                    maps,
                    loss: mean_loss,
                });
            }
        }
    }
    Ok(best.expect("at least one epoch is scored"))
}

/// Runs the evaluation of `spec` on this machine and writes its results under
/// `<output>/evaluations/<name>/`: results.json, scores.parquet, and per category the ROC and
/// PR curves and a grid of the worst misses and false alarms (PNG).
pub async fn run(
    spec: &EvalSpec,
    s3: &S3Config,
    dev: &Device,
    progress: Arc<dyn Fn(&str) + Send + Sync>,
) -> Result<EvalReport> {
    spec.check().map_err(|e| anyhow!("evaluation spec: {e}"))?;
    let mut campaigns = vec![];
    for c in &spec.campaigns {
        campaigns.push(load_campaign(c, s3).await?);
    }
    let dataset = spec
        .dataset
        .clone()
        .unwrap_or_else(|| campaigns[0].rec.spec.dataset.source.clone());
    for c in &campaigns {
        let src = c.rec.spec.dataset.source.trim_end_matches('/');
        if src != dataset.trim_end_matches('/') {
            bail!(
                "campaign {} was generated from the dataset {src}, not {dataset}: a detector is scored on the real test defects of the dataset its campaign drew from (evaluate it separately, or set dataset to {src})",
                c.uri
            );
        }
    }
    let categories: Vec<String> = if spec.categories.is_empty() {
        let mut v: Vec<String> = campaigns
            .iter()
            .flat_map(|c| c.rec.spec.categories.keys().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    } else {
        spec.categories.clone()
    };
    let size = spec.detector.image_size;
    let mut test_sets = BTreeMap::new();
    let mut results = vec![];
    let mut scores = vec![];
    let out = store::open(
        &format!(
            "{}/evaluations/{}",
            spec.output.trim_end_matches('/'),
            spec.name
        ),
        s3,
    )
    .await
    .with_context(|| format!("cannot open the evaluation output {}", spec.output))?;
    for cat in &categories {
        // one test set for every campaign: the first campaign's, checked against the others'
        let test_info = test_set(&campaigns[0].rec, &dataset, cat, spec.protocol, s3).await?;
        for c in &campaigns[1..] {
            let other = test_set(&c.rec, &dataset, cat, spec.protocol, s3).await?;
            if other != test_info {
                bail!(
                    "campaigns {} and {} hold out different real test defects for {cat} (their few-shot splits differ): a comparison needs one test set",
                    campaigns[0].uri,
                    c.uri
                );
            }
        }
        progress(&format!(
            "{cat}: loading {} test images at {size}²",
            test_info.len()
        ));
        let mut test = vec![];
        for t in &test_info {
            test.push(load_pair(&t.image_uri, t.mask_uri.as_deref(), size, s3).await?);
        }
        for c in &campaigns {
            let normals_uris = c
                .rec
                .inputs
                .as_ref()
                .and_then(|i| i.categories.get(cat))
                .map(|ci| ci.normals.clone())
                .unwrap_or_default();
            if normals_uris.is_empty() {
                bail!(
                    "campaign {} has no normal images of {cat} in its record: evaluate a campaign planned by this version",
                    c.uri
                );
            }
            let mut normals = vec![];
            for u in &normals_uris {
                normals.push(load_pair(u, None, size, s3).await?);
            }
            let types: Vec<String> = c
                .rec
                .spec
                .categories
                .get(cat)
                .map(|cs| cs.defects.keys().cloned().collect())
                .unwrap_or_default();
            let mut generated = vec![];
            let mut total = 0;
            for ty in &types {
                let mut g = vec![];
                for r in c
                    .rows
                    .iter()
                    .filter(|r| &r.category == cat && &r.defect_type == ty)
                {
                    g.push(load_pair(&r.image_uri, Some(&r.mask_uri), size, s3).await?);
                }
                total += g.len();
                generated.push(g);
            }
            if total == 0 {
                bail!(
                    "campaign {} generated nothing for {cat}: its manifest has no rows of that category",
                    c.uri
                );
            }
            progress(&format!(
                "{cat} × {}: {} normals, {total} generated pairs",
                c.rec.campaign_id,
                normals.len()
            ));
            let data = Arc::new(TrainData { normals, generated });
            let test_arc = Arc::new(test.clone());
            for &seed in &spec.seeds {
                let (spec2, data2, test2, info2, dev2, prog2) = (
                    spec.clone(),
                    data.clone(),
                    test_arc.clone(),
                    test_info.clone(),
                    dev.clone(),
                    progress.clone(),
                );
                let label = format!("{cat} × {}", c.rec.campaign_id);
                let s = tokio::task::spawn_blocking(move || {
                    train_and_score(&spec2, &data2, &test2, &info2, seed, &dev2, &|m| {
                        prog2(&format!("{label}: {m}"))
                    })
                })
                .await
                .context("detector training panicked")??;
                for (i, t) in test_info.iter().enumerate() {
                    let map = &s.maps[i];
                    scores.push(ImageScore {
                        campaign: c.uri.clone(),
                        category: cat.clone(),
                        seed,
                        defect_type: t.defect_type.clone(),
                        image_uri: t.image_uri.clone(),
                        is_defect: t.mask_uri.is_some(),
                        image_score: defectforge::evaluation::metrics::image_score(
                            map,
                            size as usize,
                            size as usize,
                        ),
                        max_pixel_score: map.iter().copied().fold(0.0, f32::max),
                        defect_pixels: test[i].mask.iter().filter(|&&v| v > 0.5).count() as u64,
                    });
                }
                if seed == spec.seeds[0] {
                    crate::evaluation_pictures::write(
                        out.as_ref(),
                        cat,
                        &c.rec.campaign_id,
                        &test,
                        &test_info,
                        &s.maps,
                        size,
                    )
                    .await?;
                }
                info!(category = %cat, campaign = %c.rec.campaign_id, seed, pixel_auroc = ?s.category.pixel_auroc, image_auroc = ?s.category.image_auroc, "detector scored");
                results.push(SeedResult {
                    campaign: c.uri.clone(),
                    category: cat.clone(),
                    seed,
                    scored_epoch: s.epoch,
                    category_metrics: s.category,
                    per_type: s.per_type,
                    final_loss: s.loss,
                });
            }
        }
        test_sets.insert(cat.clone(), test_info);
    }
    let summaries = spec
        .campaigns
        .iter()
        .map(|c| (c.clone(), summarise(&results, c)))
        .collect();
    let table = comparison_table(&results, &spec.campaigns);
    let report = EvalReport {
        name: spec.name.clone(),
        protocol: spec.protocol,
        dataset,
        spec: spec.clone(),
        detector: format!(
            "DRAEM DiscriminativeSubNetwork(3→2, base {}), trained from scratch (weights_init: conv N(0, 0.02), BN weight N(1, 0.02))",
            spec.detector.base_channels
        ),
        test_sets,
        results,
        summaries,
        table,
        finished_at: chrono::Utc::now(),
    };
    out.put(
        "scores.parquet",
        Bytes::from(
            scores_parquet(&scores).map_err(|e| anyhow!("cannot encode scores.parquet: {e}"))?,
        ),
        "application/vnd.apache.parquet",
    )
    .await
    .context("cannot write scores.parquet")?;
    // results.json last: its presence means the evaluation is complete
    out.put(
        "results.json",
        Bytes::from(serde_json::to_vec_pretty(&report)?),
        "application/json",
    )
    .await
    .context("cannot write results.json")?;
    Ok(report)
}

/// The metrics table of one report, for the terminal.
pub fn print_table(r: &EvalReport) -> String {
    let mut s = format!(
        "evaluation {} ({:?} protocol, {} seed(s), categories: {})\n",
        r.name,
        r.protocol,
        r.spec.seeds.len(),
        r.test_sets.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    s.push_str(&r.table);
    s
}
