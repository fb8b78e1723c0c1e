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
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DefectInputs {
    /// mask files the type draws from (real: the few-shot split; folder: every mask), sorted
    pub masks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CategoryInputs {
    /// normal images, sorted
    pub normals: Vec<String>,
    pub defects: BTreeMap<String, DefectInputs>,
}

/// Every input file a campaign draws from, by category.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
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
                    match list_images(&dir, s3).await {
                        Ok(m) if m.is_empty() => {
                            problems.push(format!(
                                "{path}.mask_bank: the bank {bank} has no masks for {cname}+{dname}; {fix}"
                            ));
                            vec![]
                        }
                        Ok(m) => m,
                        Err(e) => {
                            problems
                                .push(format!("{path}.mask_bank: cannot list {dir}: {e} ({fix})"));
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
            if let Err(e) = read_file(&f, s3).await {
                problems.push(format!(
                    "categories.{cname}.foreground_mask: cannot read {f}: {e} (give a binary object mask image, or set foreground = \"estimate\")"
                ));
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
