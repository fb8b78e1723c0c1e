//! Dataset layouts: finds the normal images and the few-shot real masks a campaign draws from,
//! in a local directory or under an s3:// prefix. MVTec AD layout (also MPDD, VisA after its
//! 1cls preparation): <category>/train/good/*, <category>/test/<defect>/*,
//! <category>/ground_truth/<defect>/<stem>_mask.png. Folder layout: a folder of normal images
//! per category and, per defect type, a folder of masks.

use crate::campaign::{Campaign, Layout, MaskSource};
use crate::store::{self, S3Config};
use std::collections::BTreeMap;

const IMAGE_EXTS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

pub fn is_image(name: &str) -> bool {
    name.rsplit_once('.')
        .map(|(_, e)| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Resolved inputs of one defect type.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DefectInputs {
    /// mask files the type draws from (real: the few-shot split; folder: every mask), sorted
    pub masks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CategoryInputs {
    /// normal images, sorted
    pub normals: Vec<String>,
    pub defects: BTreeMap<String, DefectInputs>,
}

/// Every input file a campaign draws from, by category.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetInputs {
    pub categories: BTreeMap<String, CategoryInputs>,
}

#[derive(Debug, thiserror::Error)]
#[error("dataset problems:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct DatasetError {
    pub problems: Vec<String>,
}

fn join_loc(base: &str, rel: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), rel)
}

/// The masks of one type in a bank, from its `provenance.json` (written by `defectforge masks
/// generate`): every listed file, in index order; stray images in the folder are not used.
pub async fn bank_masks(dir: &str, s3: &S3Config) -> Result<Vec<String>, String> {
    let prov = format!("{}/provenance.json", dir.trim_end_matches('/'));
    let st = store::open(dir, s3)
        .await
        .map_err(|e| format!("cannot open {dir}: {e}"))?;
    let b = match st.get("provenance.json").await {
        Ok(b) => b,
        // no provenance: no masks for this type yet (the caller names the fix)
        Err(store::StoreError::NotFound { .. }) => return Ok(vec![]),
        Err(e) => return Err(format!("cannot read {prov}: {e}")),
    };
    let v: serde_json::Value = serde_json::from_slice(&b)
        .map_err(|e| format!("{prov} is not a bank provenance file: {e}"))?;
    let files: Vec<String> = v
        .get("masks")
        .and_then(|m| m.as_array())
        .ok_or_else(|| format!("{prov} lists no masks"))?
        .iter()
        .filter_map(|m| m.get("file").and_then(|f| f.as_str()))
        .map(|f| f.to_string())
        .collect();
    let present: std::collections::HashSet<String> = list_images(dir, s3)
        .await
        .map_err(|e| format!("cannot list {dir}: {e}"))?
        .into_iter()
        .collect();
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        if f.contains('/') || !is_image(&f) {
            return Err(format!(
                "{prov} names {f:?}, which is not a mask file of the bank"
            ));
        }
        let uri = join_loc(dir, &f);
        if !present.contains(&uri) {
            return Err(format!(
                "{prov} lists {f} but the bank has no such file (run `defectforge masks generate` again to restore it)"
            ));
        }
        out.push(uri);
    }
    Ok(out)
}

/// Reads one file (local path or s3:// URI).
pub async fn read_file(uri: &str, s3: &S3Config) -> Result<bytes::Bytes, String> {
    let (dir, name) = uri
        .trim_end_matches('/')
        .rsplit_once('/')
        .ok_or_else(|| format!("{uri}: not a file location"))?;
    let st = store::open(dir, s3).await.map_err(|e| e.to_string())?;
    st.get(name).await.map_err(|e| e.to_string())
}

/// Lists the image files directly inside a folder (local or s3://), as URIs, sorted.
pub async fn list_images(location: &str, s3: &S3Config) -> Result<Vec<String>, String> {
    let st = store::open(location, s3).await.map_err(|e| e.to_string())?;
    let items = st.list("").await.map_err(|e| e.to_string())?;
    let mut out: Vec<String> = items
        .into_iter()
        .filter(|m| !m.key.contains('/') && is_image(&m.key))
        .map(|m| st.uri(&m.key))
        .collect();
    out.sort();
    Ok(out)
}

fn stem(uri: &str) -> &str {
    let name = uri.rsplit('/').next().unwrap_or(uri);
    name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name)
}

/// Resolves a campaign's inputs, reporting every missing folder or file at once.
pub async fn resolve(c: &Campaign, s3: &S3Config) -> Result<DatasetInputs, DatasetError> {
    let mut problems = vec![];
    let mut out = DatasetInputs::default();
    let root = &c.dataset.source;
    for (cname, cat) in &c.categories {
        let normal_dir = match (c.dataset.layout, &cat.normal_dir) {
            (Layout::Mvtec, _) => join_loc(root, &format!("{cname}/train/good")),
            (Layout::Folder, Some(d)) => d.clone(),
            (Layout::Folder, None) => continue, // reported by campaign validation
        };
        let normals = match list_images(&normal_dir, s3).await {
            Ok(n) if n.is_empty() => {
                problems.push(format!(
                    "categories.{cname}: no normal images in {normal_dir} (expected .png/.jpg/.bmp/.tif files)"
                ));
                vec![]
            }
            Ok(n) => n,
            Err(e) => {
                problems.push(format!("categories.{cname}: cannot list {normal_dir}: {e}"));
                vec![]
            }
        };
        let mut ci = CategoryInputs {
            normals,
            defects: BTreeMap::new(),
        };
        for (dname, d) in &cat.defects {
            let path = format!("categories.{cname}.defects.{dname}");
            let masks = match d.mask {
                MaskSource::Real => {
                    let test_dir = join_loc(root, &format!("{cname}/test/{dname}"));
                    let gt_dir = join_loc(root, &format!("{cname}/ground_truth/{dname}"));
                    match (
                        list_images(&test_dir, s3).await,
                        list_images(&gt_dir, s3).await,
                    ) {
                        (Ok(imgs), Ok(gts)) => {
                            if imgs.is_empty() {
                                problems.push(format!(
                                    "{path}: no defect images in {test_dir}, so there are no real masks to draw from (use mask = \"perlin\", \"cutpaste\", \"scar\" or \"folder\")"
                                ));
                            }
                            let take = d.few_shot_split.take(imgs.len());
                            let mut masks = vec![];
                            for img in &imgs[..take] {
                                let want = format!("{}_mask", stem(img));
                                match gts.iter().find(|g| stem(g) == want) {
                                    Some(g) => masks.push(g.clone()),
                                    None => problems.push(format!(
                                        "{path}: defect image {img} has no mask {want}.png in {gt_dir}"
                                    )),
                                }
                            }
                            masks
                        }
                        (Err(e), _) | (_, Err(e)) => {
                            problems.push(format!("{path}: cannot list real masks: {e}"));
                            vec![]
                        }
                    }
                }
                MaskSource::Bank => {
                    let dir = d.mask_dir.clone().unwrap_or_default();
                    let bank = d.mask_bank.clone().unwrap_or_default();
                    let fix = format!(
                        "generate them with `defectforge masks generate --model <model> --types {cname}+{dname} --count <n> --to {bank}`"
                    );
                    match bank_masks(&dir, s3).await {
                        Ok(m) if m.is_empty() => {
                            problems.push(format!(
                                "{path}.mask_bank: the bank {bank} has no masks for {cname}+{dname}; {fix}"
                            ));
                            vec![]
                        }
                        Ok(m) => m,
                        Err(e) => {
                            problems.push(format!("{path}.mask_bank: {e} ({fix})"));
                            vec![]
                        }
                    }
                }
                MaskSource::Folder => {
                    let dir = d.mask_dir.clone().unwrap_or_default();
                    match list_images(&dir, s3).await {
                        Ok(m) if m.is_empty() => {
                            problems.push(format!("{path}.mask_dir: no mask images in {dir}"));
                            vec![]
                        }
                        Ok(m) => m,
                        Err(e) => {
                            problems.push(format!("{path}.mask_dir: cannot list {dir}: {e}"));
                            vec![]
                        }
                    }
                }
                _ => vec![],
            };
            if let Some(t) = &d.settings.perlin.texture_dir {
                match list_images(t, s3).await {
                    Ok(x) if x.is_empty() => problems.push(format!(
                        "{path}.perlin.texture_dir: no texture images in {t}"
                    )),
                    Ok(_) => {}
                    Err(e) => {
                        problems.push(format!("{path}.perlin.texture_dir: cannot list {t}: {e}"))
                    }
                }
            }
            ci.defects.insert(dname.clone(), DefectInputs { masks });
        }
        if let Some(f) = cat
            .defects
            .values()
            .find_map(|d| d.settings.placement.mask_file.clone())
        {
            let fix = "give a binary object mask image (white = object), or set foreground = \"estimate\"";
            match read_file(&f, s3).await {
                Err(e) => problems.push(format!(
                    "categories.{cname}.foreground_mask: cannot read {f}: {e} ({fix})"
                )),
                Ok(b) => match crate::imaging::decode_mask(&b, &f) {
                    Err(e) => problems.push(format!(
                        "categories.{cname}.foreground_mask: {e} ({fix})"
                    )),
                    Ok(m) if crate::imaging::mask_stats(&m).area == 0 => problems.push(format!(
                        "categories.{cname}.foreground_mask: {f} is empty: no pixel would count as the object ({fix})"
                    )),
                    Ok(_) => {}
                },
            }
        }
        // Learned masks sampled on the fly need the type's mask model in the model.
        for (dname, d) in &cat.defects {
            if d.mask != MaskSource::Generated {
                continue;
            }
            let Some(model) = &d.settings.mask_model.model else {
                continue; // reported by campaign validation
            };
            let name = d
                .settings
                .mask_model
                .embedding
                .clone()
                .unwrap_or_else(|| format!("{cname}+{dname}"));
            let path = format!("categories.{cname}.defects.{dname}.mask_model");
            let uri = format!("{}/model.json", model.trim_end_matches('/'));
            match read_file(&uri, s3).await {
                Err(e) => problems.push(format!(
                    "{path}.model: cannot read {uri}: {e} (name a model printed by `defectforge models import`)"
                )),
                Ok(b) => {
                    let types: Vec<String> = serde_json::from_slice::<serde_json::Value>(&b)
                        .ok()
                        .and_then(|v| v.get("mask_types").cloned())
                        .and_then(|v| serde_json::from_value(v).ok())
                        .unwrap_or_default();
                    if !types.contains(&name) {
                        problems.push(format!(
                            "{path}: the model {model} has no mask model {name:?} (it has: {}); import it with `defectforge models import … --mask-embeddings {name}=<train_mask.py embeddings.pt>` or pick one with mask_model.embedding",
                            if types.is_empty() { "none".to_string() } else { types.join(", ") }
                        ));
                    }
                }
            }
        }
        out.categories.insert(cname.clone(), ci);
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(DatasetError { problems })
    }
}
