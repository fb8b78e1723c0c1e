//! The manifest: one row per generated sample, as Arrow record batches in Parquet (zstd). Shard
//! fragments (one per committed attempt) and the finalized `manifest/part-*.parquet` files share
//! this schema; docs/manifest.md documents every column for data scientists.

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::sync::{Arc, OnceLock};

/// Bumped when columns change meaning; written as Parquet key-value metadata.
pub const MANIFEST_VERSION: &str = "3";

#[derive(Debug, Clone, PartialEq)]
pub struct ManifestRow {
    pub sample_id: String,
    pub shard_id: String,
    pub campaign_id: String,
    pub sample_index: u64,
    pub category: String,
    pub defect_type: String,
    pub image_uri: String,
    pub mask_uri: String,
    pub normal_uri: String,
    pub mask_source: String,
    /// the mask file used, for real and folder mask sources
    pub source_mask_uri: Option<String>,
    pub generator: String,
    pub generator_version: String,
    pub model_digest: Option<String>,
    pub seed: u64,
    /// JSON of the generator settings used
    pub generator_settings: String,
    pub width: u32,
    pub height: u32,
    pub mask_area: u64,
    pub bbox_x: u32,
    pub bbox_y: u32,
    pub bbox_w: u32,
    pub bbox_h: u32,
    pub image_sha256: String,
    pub image_size: u64,
    pub mask_sha256: String,
    pub mask_size: u64,
    pub mean_abs_change_inside: f32,
    pub mean_abs_change_outside: f32,
    /// PSNR (dB, peak 255) of the output against the normal image outside the mask; infinite
    /// when the background is exact
    pub background_psnr: f32,
    /// the normal image's own size; differs from width/height when a generator working at a
    /// fixed resolution (AnomalyDiffusion: 256×256) resized it
    pub normal_width: u32,
    pub normal_height: u32,
    /// diffusion generators: DDIM steps and adaptive attention re-weighting mode
    pub diffusion_steps: Option<u32>,
    pub reweighting: Option<String>,
    /// the foreground constraint's action on the mask: kept, moved, scaled, clipped,
    /// unplaceable, or off (not constrained)
    pub mask_placement: String,
    /// fraction of the mask on the estimated (or given) object after placement; null when off
    pub foreground_coverage: Option<f32>,
    /// learned masks sampled on the fly: draws until one was accepted
    pub mask_attempts: Option<u32>,
    /// mask cells set at the 32×32 latent grid of a 256×256 working image (bilinear, ≥ 0.5,
    /// as AnomalyDiffusion computes it)
    pub latent_mask_area: u32,
    /// the mask vanishes at the 32×32 latent grid (latent_mask_area = 0): AnomalyDiffusion
    /// cannot paint it (the official pipeline silently loses such defects) unless the type
    /// samples dilated regions (`thin_defects = "dilate"`)
    pub thin_defect: bool,
    pub worker_id: String,
    pub attempt: String,
    pub duration_ms: f32,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// Per-campaign totals of the mask columns (recorded in `_manifest.json` by finalize).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MaskSummary {
    /// rows per `mask_placement` value
    pub placement: std::collections::BTreeMap<String, u64>,
    /// rows whose mask vanishes at the 32×32 latent grid
    pub thin_defects: u64,
    /// rows with an on-the-fly learned mask, and the draws they took
    pub generated_masks: u64,
    pub generated_draws: u64,
}

impl MaskSummary {
    /// Adds a manifest batch (batches without the version-3 columns add nothing).
    pub fn add_batch(&mut self, b: &RecordBatch) {
        let get = |n: &str| b.column_by_name(n);
        if let Some(a) =
            get("mask_placement").and_then(|c| c.as_any().downcast_ref::<StringArray>())
        {
            for v in a.iter().flatten() {
                *self.placement.entry(v.to_string()).or_default() += 1;
            }
        }
        if let Some(a) = get("thin_defect").and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
        {
            self.thin_defects += a.true_count() as u64;
        }
        if let Some(a) = get("mask_attempts").and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
        {
            for v in a.iter().flatten() {
                self.generated_masks += 1;
                self.generated_draws += v as u64;
            }
        }
    }

    /// Rows whose mask the foreground constraint changed (moved, scaled, clipped) or could not
    /// place, and rows it checked at all.
    pub fn interventions(&self) -> (u64, u64) {
        let checked: u64 = self
            .placement
            .iter()
            .filter(|(k, _)| k.as_str() != "off")
            .map(|(_, v)| v)
            .sum();
        let kept = self.placement.get("kept").copied().unwrap_or(0);
        (checked - kept, checked)
    }

    /// Fraction of learned-mask draws rejected by the post-processing (on-the-fly masks).
    pub fn rejection_rate(&self) -> f64 {
        if self.generated_draws == 0 {
            0.0
        } else {
            1.0 - self.generated_masks as f64 / self.generated_draws as f64
        }
    }
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The manifest's Arrow schema.
pub fn schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        use DataType::*;
        let f = |n: &str, t: DataType| Field::new(n, t, false);
        Arc::new(Schema::new(vec![
            f("sample_id", Utf8),
            f("shard_id", Utf8),
            f("campaign_id", Utf8),
            f("sample_index", UInt64),
            f("category", Utf8),
            f("defect_type", Utf8),
            f("image_uri", Utf8),
            f("mask_uri", Utf8),
            f("normal_uri", Utf8),
            f("mask_source", Utf8),
            Field::new("source_mask_uri", Utf8, true),
            f("generator", Utf8),
            f("generator_version", Utf8),
            Field::new("model_digest", Utf8, true),
            f("seed", UInt64),
            f("generator_settings", Utf8),
            f("width", UInt32),
            f("height", UInt32),
            f("mask_area", UInt64),
            f("bbox_x", UInt32),
            f("bbox_y", UInt32),
            f("bbox_w", UInt32),
            f("bbox_h", UInt32),
            f("image_sha256", Utf8),
            f("image_size", UInt64),
            f("mask_sha256", Utf8),
            f("mask_size", UInt64),
            f("mean_abs_change_inside", Float32),
            f("mean_abs_change_outside", Float32),
            f("background_psnr", Float32),
            f("normal_width", UInt32),
            f("normal_height", UInt32),
            Field::new("diffusion_steps", UInt32, true),
            Field::new("reweighting", Utf8, true),
            f("mask_placement", Utf8),
            Field::new("foreground_coverage", Float32, true),
            Field::new("mask_attempts", UInt32, true),
            f("latent_mask_area", UInt32),
            f("thin_defect", Boolean),
            f("worker_id", Utf8),
            f("attempt", Utf8),
            f("duration_ms", Float32),
            f("started_at", ts()),
            f("finished_at", ts()),
        ]))
    })
    .clone()
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("writing Parquet failed: {0}")]
    Write(String),
    #[error("{uri} is not a readable manifest file: {reason}")]
    Read { uri: String, reason: String },
}

pub fn to_batch(rows: &[ManifestRow]) -> Result<RecordBatch, ManifestError> {
    fn s<'a>(rows: &'a [ManifestRow], f: impl Fn(&'a ManifestRow) -> &'a str) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    }
    fn so<'a>(rows: &'a [ManifestRow], f: impl Fn(&'a ManifestRow) -> Option<&'a str>) -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    }
    fn u64s(rows: &[ManifestRow], f: impl Fn(&ManifestRow) -> u64) -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(f)))
    }
    fn u32s(rows: &[ManifestRow], f: impl Fn(&ManifestRow) -> u32) -> ArrayRef {
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(f)))
    }
    fn f32s(rows: &[ManifestRow], f: impl Fn(&ManifestRow) -> f32) -> ArrayRef {
        Arc::new(Float32Array::from_iter_values(rows.iter().map(f)))
    }
    fn t(rows: &[ManifestRow], f: impl Fn(&ManifestRow) -> DateTime<Utc>) -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                rows.iter().map(|r| f(r).timestamp_micros()),
            )
            .with_timezone("UTC"),
        )
    }
    let cols: Vec<ArrayRef> = vec![
        s(rows, |r| &r.sample_id),
        s(rows, |r| &r.shard_id),
        s(rows, |r| &r.campaign_id),
        u64s(rows, |r| r.sample_index),
        s(rows, |r| &r.category),
        s(rows, |r| &r.defect_type),
        s(rows, |r| &r.image_uri),
        s(rows, |r| &r.mask_uri),
        s(rows, |r| &r.normal_uri),
        s(rows, |r| &r.mask_source),
        so(rows, |r| r.source_mask_uri.as_deref()),
        s(rows, |r| &r.generator),
        s(rows, |r| &r.generator_version),
        so(rows, |r| r.model_digest.as_deref()),
        u64s(rows, |r| r.seed),
        s(rows, |r| &r.generator_settings),
        u32s(rows, |r| r.width),
        u32s(rows, |r| r.height),
        u64s(rows, |r| r.mask_area),
        u32s(rows, |r| r.bbox_x),
        u32s(rows, |r| r.bbox_y),
        u32s(rows, |r| r.bbox_w),
        u32s(rows, |r| r.bbox_h),
        s(rows, |r| &r.image_sha256),
        u64s(rows, |r| r.image_size),
        s(rows, |r| &r.mask_sha256),
        u64s(rows, |r| r.mask_size),
        f32s(rows, |r| r.mean_abs_change_inside),
        f32s(rows, |r| r.mean_abs_change_outside),
        f32s(rows, |r| r.background_psnr),
        u32s(rows, |r| r.normal_width),
        u32s(rows, |r| r.normal_height),
        Arc::new(
            rows.iter()
                .map(|r| r.diffusion_steps)
                .collect::<UInt32Array>(),
        ),
        so(rows, |r| r.reweighting.as_deref()),
        s(rows, |r| &r.mask_placement),
        Arc::new(
            rows.iter()
                .map(|r| r.foreground_coverage)
                .collect::<Float32Array>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| r.mask_attempts)
                .collect::<UInt32Array>(),
        ),
        u32s(rows, |r| r.latent_mask_area),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.thin_defect))
                .collect::<BooleanArray>(),
        ),
        s(rows, |r| &r.worker_id),
        s(rows, |r| &r.attempt),
        f32s(rows, |r| r.duration_ms),
        t(rows, |r| r.started_at),
        t(rows, |r| r.finished_at),
    ];
    RecordBatch::try_new(schema(), cols).map_err(|e| ManifestError::Write(e.to_string()))
}

fn props(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("level 3")))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "defectforge.manifest_version".into(),
            MANIFEST_VERSION.to_string(),
        )]))
        .build()
}

/// Writes rows as one Parquet file in memory.
pub fn write_parquet(rows: &[ManifestRow]) -> Result<Vec<u8>, ManifestError> {
    write_batches(&[to_batch(rows)?])
}

/// Writes record batches of the manifest schema as one Parquet file (row groups of ≤ 128 Ki rows).
pub fn write_batches(batches: &[RecordBatch]) -> Result<Vec<u8>, ManifestError> {
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema(), Some(props(128 * 1024)))
        .map_err(|e| ManifestError::Write(e.to_string()))?;
    for b in batches {
        w.write(b)
            .map_err(|e| ManifestError::Write(e.to_string()))?;
    }
    w.close().map_err(|e| ManifestError::Write(e.to_string()))?;
    Ok(buf)
}

/// Writes manifest batches into one Parquet file incrementally: only the open row group is held
/// in memory.
pub struct PartWriter {
    w: ArrowWriter<Vec<u8>>,
    rows: usize,
}

impl PartWriter {
    pub fn new() -> Result<Self, ManifestError> {
        Ok(Self {
            w: ArrowWriter::try_new(Vec::new(), schema(), Some(props(128 * 1024)))
                .map_err(|e| ManifestError::Write(e.to_string()))?,
            rows: 0,
        })
    }
    pub fn write(&mut self, b: &RecordBatch) -> Result<(), ManifestError> {
        self.rows += b.num_rows();
        self.w
            .write(b)
            .map_err(|e| ManifestError::Write(e.to_string()))
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn finish(self) -> Result<Vec<u8>, ManifestError> {
        self.w
            .into_inner()
            .map_err(|e| ManifestError::Write(e.to_string()))
    }
}

/// Reads a Parquet file of the manifest schema into record batches.
pub fn read_batches(bytes: Bytes, uri: &str) -> Result<Vec<RecordBatch>, ManifestError> {
    let rerr = |e: String| ManifestError::Read {
        uri: uri.to_string(),
        reason: e,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| rerr(e.to_string()))?
        .with_batch_size(64 * 1024)
        .build()
        .map_err(|e| rerr(e.to_string()))?;
    let mut out = vec![];
    for b in reader {
        let b = b.map_err(|e| rerr(e.to_string()))?;
        if b.schema().fields() != schema().fields() {
            return Err(rerr("its columns differ from the manifest schema".into()));
        }
        out.push(b);
    }
    Ok(out)
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .unwrap_or_else(|| panic!("manifest column {name} has the wrong type"))
}

/// Converts record batches (already checked against the schema) back into rows.
pub fn rows_from_batches(batches: &[RecordBatch]) -> Vec<ManifestRow> {
    let mut out = vec![];
    for b in batches {
        let s = |n: &str| col::<StringArray>(b, n);
        let u64c = |n: &str| col::<UInt64Array>(b, n);
        let u32c = |n: &str| col::<UInt32Array>(b, n);
        let f32c = |n: &str| col::<Float32Array>(b, n);
        let tc = |n: &str| col::<TimestampMicrosecondArray>(b, n);
        let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
        let dt = |v: i64| DateTime::from_timestamp_micros(v).unwrap_or_default();
        for i in 0..b.num_rows() {
            out.push(ManifestRow {
                sample_id: s("sample_id").value(i).into(),
                shard_id: s("shard_id").value(i).into(),
                campaign_id: s("campaign_id").value(i).into(),
                sample_index: u64c("sample_index").value(i),
                category: s("category").value(i).into(),
                defect_type: s("defect_type").value(i).into(),
                image_uri: s("image_uri").value(i).into(),
                mask_uri: s("mask_uri").value(i).into(),
                normal_uri: s("normal_uri").value(i).into(),
                mask_source: s("mask_source").value(i).into(),
                source_mask_uri: opt(s("source_mask_uri"), i),
                generator: s("generator").value(i).into(),
                generator_version: s("generator_version").value(i).into(),
                model_digest: opt(s("model_digest"), i),
                seed: u64c("seed").value(i),
                generator_settings: s("generator_settings").value(i).into(),
                width: u32c("width").value(i),
                height: u32c("height").value(i),
                mask_area: u64c("mask_area").value(i),
                bbox_x: u32c("bbox_x").value(i),
                bbox_y: u32c("bbox_y").value(i),
                bbox_w: u32c("bbox_w").value(i),
                bbox_h: u32c("bbox_h").value(i),
                image_sha256: s("image_sha256").value(i).into(),
                image_size: u64c("image_size").value(i),
                mask_sha256: s("mask_sha256").value(i).into(),
                mask_size: u64c("mask_size").value(i),
                mean_abs_change_inside: f32c("mean_abs_change_inside").value(i),
                mean_abs_change_outside: f32c("mean_abs_change_outside").value(i),
                background_psnr: f32c("background_psnr").value(i),
                normal_width: u32c("normal_width").value(i),
                normal_height: u32c("normal_height").value(i),
                diffusion_steps: {
                    let a = u32c("diffusion_steps");
                    (!a.is_null(i)).then(|| a.value(i))
                },
                reweighting: opt(s("reweighting"), i),
                mask_placement: s("mask_placement").value(i).into(),
                foreground_coverage: {
                    let a = f32c("foreground_coverage");
                    (!a.is_null(i)).then(|| a.value(i))
                },
                mask_attempts: {
                    let a = u32c("mask_attempts");
                    (!a.is_null(i)).then(|| a.value(i))
                },
                latent_mask_area: u32c("latent_mask_area").value(i),
                thin_defect: col::<BooleanArray>(b, "thin_defect").value(i),
                worker_id: s("worker_id").value(i).into(),
                attempt: s("attempt").value(i).into(),
                duration_ms: f32c("duration_ms").value(i),
                started_at: dt(tc("started_at").value(i)),
                finished_at: dt(tc("finished_at").value(i)),
            });
        }
    }
    out
}

/// Reads a Parquet manifest file into rows.
pub fn read_rows(bytes: Bytes, uri: &str) -> Result<Vec<ManifestRow>, ManifestError> {
    Ok(rows_from_batches(&read_batches(bytes, uri)?))
}

/// The (image_uri, mask_uri) columns of batches, for reference checks without full rows.
pub fn object_refs(b: &RecordBatch) -> impl Iterator<Item = (&str, u64, &str, u64)> + '_ {
    let iu = col::<StringArray>(b, "image_uri");
    let is = col::<UInt64Array>(b, "image_size");
    let mu = col::<StringArray>(b, "mask_uri");
    let ms = col::<UInt64Array>(b, "mask_size");
    (0..b.num_rows()).map(move |i| (iu.value(i), is.value(i), mu.value(i), ms.value(i)))
}

#[cfg(test)]
pub(crate) fn example_row(i: u64) -> ManifestRow {
    let now = DateTime::from_timestamp_micros(1_700_000_000_000_000 + i as i64).unwrap();
    ManifestRow {
        sample_id: crate::ids::sample_id(1, i),
        shard_id: crate::ids::shard_id(i / 4),
        campaign_id: "c-1".into(),
        sample_index: i,
        category: "carpet".into(),
        defect_type: "color".into(),
        image_uri: format!("/o/campaigns/c-1/samples/{i}/a.png"),
        mask_uri: format!("/o/campaigns/c-1/samples/{i}/a_mask.png"),
        normal_uri: "/d/carpet/train/good/000.png".into(),
        mask_source: "perlin".into(),
        source_mask_uri: if i.is_multiple_of(2) {
            None
        } else {
            Some("/m.png".into())
        },
        generator: "perlin".into(),
        generator_version: "1".into(),
        model_digest: None,
        seed: u64::MAX - i,
        generator_settings: "{}".into(),
        width: 256,
        height: 256,
        mask_area: 100 + i,
        bbox_x: 1,
        bbox_y: 2,
        bbox_w: 3,
        bbox_h: 4,
        image_sha256: "ab".repeat(32),
        image_size: 1000 + i,
        mask_sha256: "cd".repeat(32),
        mask_size: 200,
        mean_abs_change_inside: 12.5,
        mean_abs_change_outside: 0.0,
        background_psnr: f32::INFINITY,
        normal_width: 256,
        normal_height: 256,
        diffusion_steps: None,
        reweighting: None,
        mask_placement: "off".into(),
        foreground_coverage: None,
        mask_attempts: None,
        latent_mask_area: 12,
        thin_defect: false,
        worker_id: "w1".into(),
        attempt: "0190-aa".into(),
        duration_ms: 3.5,
        started_at: now,
        finished_at: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parquet_round_trip() {
        let rows: Vec<_> = (0..10).map(example_row).collect();
        let bytes = write_parquet(&rows).unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        let back = read_rows(Bytes::from(bytes), "mem").unwrap();
        assert_eq!(back, rows);
        assert!(read_rows(Bytes::from_static(b"nope"), "x.parquet").is_err());
    }
}
