//! `Campaign::parse`: the campaign file walked section by section (dataset, categories,
//! defect types and their generator, mask and placement settings), every problem reported with
//! its key path; each settings struct's own `validate()` adds its rules.

use super::walk::{check_location, Walker};
use super::*;

impl Campaign {
    /// Reads and validates a campaign file. Relative paths inside resolve against its folder.
    pub fn load(path: &Path) -> Result<Campaign, CampaignError> {
        let text = std::fs::read_to_string(path).map_err(|source| CampaignError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        Campaign::parse(&text, &base, &path.display().to_string())
    }

    /// Parses and validates campaign TOML; `base` resolves relative paths, `origin` names the
    /// file in errors.
    pub fn parse(text: &str, base: &Path, origin: &str) -> Result<Campaign, CampaignError> {
        let root: toml::Table = toml::from_str(text).map_err(|e| CampaignError::Syntax {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let mut w = Walker { problems: vec![] };
        w.unknown(
            &root,
            "",
            &[
                "name",
                "seed",
                "shard_size",
                "shard_time_limit_s",
                "dataset",
                "output",
                "categories",
            ],
        );
        let name = w.str_opt(&root, "", "name");
        if name.is_none() && !root.contains_key("name") {
            w.problems
                .push("name: missing (a human-readable campaign name)".into());
        }
        let seed = w.int_opt(&root, "", "seed", 0);
        if !root.contains_key("seed") {
            w.problems
                .push("seed: missing (any non-negative integer)".into());
        }
        let shard_size = w.int_opt(&root, "", "shard_size", 1);
        if let Some(s) = shard_size {
            if s > 4096 {
                w.problems
                    .push(format!("shard_size must be <= 4096 (got {s})"));
            }
        }
        let shard_time_limit_s = w.int_opt(&root, "", "shard_time_limit_s", 10);
        if let Some(s) = shard_time_limit_s {
            if s > MAX_SHARD_TIME_LIMIT_S as i64 {
                w.problems.push(format!(
                    "shard_time_limit_s must be <= {MAX_SHARD_TIME_LIMIT_S} (a week; got {s})"
                ));
            }
        }

        // [dataset]
        let mut dataset = None;
        match w.table(&root, "", "dataset") {
            None if !root.contains_key("dataset") => w
                .problems
                .push("dataset: missing table [dataset] with source = \"<dir or s3://…>\"".into()),
            None => {}
            Some(d) => {
                w.unknown(d, "dataset", &["source", "layout", "demo"]);
                let source = w.str_opt(d, "dataset", "source");
                if source.is_none() && !d.contains_key("source") {
                    w.problems.push(
                        "dataset.source: missing (a local directory or s3://bucket/prefix)".into(),
                    );
                }
                let layout = match w.str_opt(d, "dataset", "layout").as_deref() {
                    None | Some("mvtec") => Some(Layout::Mvtec),
                    Some("folder") => Some(Layout::Folder),
                    Some(other) => {
                        w.problems.push(format!(
                            "dataset.layout: unknown layout {other:?} (expected \"mvtec\" or \"folder\")"
                        ));
                        None
                    }
                };
                let demo = w.bool_opt(d, "dataset", "demo").unwrap_or(false);
                if let Some(s) = &source {
                    check_location(&mut w, "dataset.source", s);
                    if demo && s.starts_with("s3://") {
                        w.problems.push(
                            "dataset.demo: the demo dataset can only be materialised in a local directory".into(),
                        );
                    }
                }
                if let (Some(source), Some(layout)) = (source, layout) {
                    dataset = Some(DatasetSpec {
                        source: resolve_location(base, &source),
                        layout,
                        demo,
                    });
                }
            }
        }

        // output
        let output = match root.get("output") {
            None => {
                w.problems.push(
                    "output: missing (a local directory or s3://bucket/prefix for results)".into(),
                );
                None
            }
            Some(toml::Value::String(s)) => {
                check_location(&mut w, "output", s);
                Some(resolve_location(base, s))
            }
            Some(v) => {
                w.problems
                    .push(format!("output: expected a string, got {}", v.type_str()));
                None
            }
        };

        // [categories.<name>.defects.<type>]
        let mut categories = BTreeMap::new();
        let layout = dataset.as_ref().map(|d: &DatasetSpec| d.layout);
        match w.table(&root, "", "categories") {
            None if !root.contains_key("categories") => w.problems.push(
                "categories: missing (at least one [categories.<name>.defects.<type>] table)"
                    .into(),
            ),
            None => {}
            Some(cats) => {
                if cats.is_empty() {
                    w.problems
                        .push("categories: at least one category is needed".into());
                }
                for (cname, cv) in cats {
                    let cpath = format!("categories.{}", quote_key(cname));
                    if !is_safe_name(cname) {
                        w.problems.push(format!(
                            "{cpath}: category name {cname:?} is not allowed (use 1-64 of A-Z a-z 0-9 _ - ., not starting with a dot)"
                        ));
                    }
                    let Some(ct) = cv.as_table() else {
                        w.problems.push(format!("{cpath}: expected a table"));
                        continue;
                    };
                    w.unknown(
                        ct,
                        &cpath,
                        &[
                            "normal_dir",
                            "defects",
                            "foreground",
                            "foreground_mask",
                            "foreground_min_coverage",
                        ],
                    );
                    let fg = parse_foreground(&mut w, ct, &cpath, base);
                    let normal_dir = w
                        .str_opt(ct, &cpath, "normal_dir")
                        .map(|s| resolve_location(base, &s));
                    if layout == Some(Layout::Folder) && normal_dir.is_none() {
                        w.problems.push(format!(
                            "{cpath}.normal_dir: missing (the folder layout needs a folder of normal images per category)"
                        ));
                    }
                    let mut defects = BTreeMap::new();
                    match w.table(ct, &cpath, "defects") {
                        None => w.problems.push(format!(
                            "{cpath}.defects: missing (at least one [{cpath}.defects.<type>] with a count)"
                        )),
                        Some(dt) => {
                            if dt.is_empty() {
                                w.problems.push(format!("{cpath}.defects: at least one defect type is needed"));
                            }
                            for (dname, dv) in dt {
                                let dpath = format!("{cpath}.defects.{}", quote_key(dname));
                                if !is_safe_name(dname) {
                                    w.problems.push(format!(
                                        "{dpath}: defect type name {dname:?} is not allowed (use 1-64 of A-Z a-z 0-9 _ - ., not starting with a dot)"
                                    ));
                                }
                                let Some(d) = dv.as_table() else {
                                    w.problems.push(format!("{dpath}: expected a table"));
                                    continue;
                                };
                                if let Some(spec) =
                                    parse_defect(&mut w, d, &dpath, base, layout, (cname, dname), &fg)
                                {
                                    defects.insert(dname.clone(), spec);
                                }
                            }
                        }
                    }
                    categories.insert(
                        cname.clone(),
                        CategorySpec {
                            normal_dir,
                            foreground: fg.mode,
                            defects,
                        },
                    );
                }
            }
        }

        let total = categories
            .values()
            .flat_map(|c: &CategorySpec| c.defects.values())
            .try_fold(0u64, |t, d| t.checked_add(d.count));
        if total.is_none_or(|t| t > MAX_SAMPLES) {
            w.problems.push(format!(
                "the campaign asks for more than {MAX_SAMPLES} samples in total; split it into several campaigns"
            ));
        }
        if !w.problems.is_empty() {
            return Err(CampaignError::Invalid {
                path: origin.to_string(),
                problems: w.problems,
            });
        }
        Ok(Campaign {
            name: name.expect("checked"),
            seed: seed.expect("checked") as u64,
            shard_size: shard_size.map(|s| s as u32).unwrap_or(DEFAULT_SHARD_SIZE),
            shard_time_limit_s: shard_time_limit_s
                .map(|s| s as u64)
                .unwrap_or(DEFAULT_SHARD_TIME_LIMIT_S),
            dataset: dataset.expect("checked"),
            output: output.expect("checked"),
            categories,
        })
    }
}

fn quote_key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

/// A category's foreground keys as written (resolved per defect type by [`resolve_placement`]).
struct CategoryForeground {
    mode: Foreground,
    mask_file: Option<String>,
    min_coverage: f32,
}

fn parse_foreground(
    w: &mut Walker,
    ct: &toml::Table,
    cpath: &str,
    base: &Path,
) -> CategoryForeground {
    let mut fg = CategoryForeground {
        mode: Foreground::Auto,
        mask_file: None,
        min_coverage: PlacementSettings::default().min_coverage,
    };
    if ct.contains_key("foreground") {
        match w.choice(ct, cpath, "foreground") {
            Some(m) => fg.mode = m,
            None => {
                if let Some(last) = w.problems.last_mut() {
                    last.push_str(" — for a fixed object mask set foreground_mask");
                }
            }
        }
    }
    if let Some(f) = w.str_opt(ct, cpath, "foreground_mask") {
        check_location(w, &format!("{cpath}.foreground_mask"), &f);
        if fg.mode == Foreground::Off {
            w.problems.push(format!(
                "{cpath}.foreground_mask: given while foreground = \"off\"; remove one of them"
            ));
        }
        fg.mask_file = Some(resolve_location(base, &f));
    }
    if let Some(c) = w.f32_opt(ct, cpath, "foreground_min_coverage", 0.05, 1.0) {
        fg.min_coverage = c;
    }
    fg
}

/// The placement a defect type gets: a `foreground_mask` constrains every synthetic mask
/// source; "estimate" likewise with the estimated object; "auto" constrains learned masks
/// (generated, bank) on object categories only (textures have no background); "off" never.
/// Real masks are never moved.
fn resolve_placement(
    fg: &CategoryForeground,
    category: &str,
    mask: MaskSource,
) -> PlacementSettings {
    let synthetic = mask != MaskSource::Real;
    let learned = matches!(mask, MaskSource::Generated | MaskSource::Bank);
    let mode = match (fg.mask_file.is_some(), fg.mode) {
        _ if !synthetic => PlacementMode::Off,
        (true, _) => PlacementMode::File,
        (false, Foreground::Estimate) => PlacementMode::Estimate,
        (false, Foreground::Auto) if learned && !TEXTURE_CATEGORIES.contains(&category) => {
            PlacementMode::Estimate
        }
        _ => PlacementMode::Off,
    };
    PlacementSettings {
        mode,
        mask_file: if mode == PlacementMode::File {
            fg.mask_file.clone()
        } else {
            None
        },
        min_coverage: fg.min_coverage,
    }
}

fn parse_defect(
    w: &mut Walker,
    d: &toml::Table,
    dpath: &str,
    base: &Path,
    layout: Option<Layout>,
    (category, defect): (&str, &str),
    fg: &CategoryForeground,
) -> Option<DefectSpec> {
    w.unknown(
        d,
        dpath,
        &[
            "count",
            "generator",
            "mask",
            "mask_dir",
            "mask_bank",
            "mask_model",
            "few_shot_split",
            "perlin",
            "cutpaste",
            "anomalydiffusion",
        ],
    );
    let count = w.int_opt(d, dpath, "count", 1);
    let count = match count {
        Some(n) if n as u64 > MAX_SAMPLES => {
            w.problems.push(format!(
                "{dpath}.count must be <= {MAX_SAMPLES} (got {n}); split the work into several campaigns"
            ));
            None
        }
        c => c,
    };
    if !d.contains_key("count") {
        w.problems.push(format!(
            "{dpath}.count: missing (how many samples of this type to generate)"
        ));
    }
    let generator = if d.contains_key("generator") {
        w.choice(d, dpath, "generator")
    } else {
        Some(GeneratorKind::Perlin)
    };
    let default_mask = if layout == Some(Layout::Folder) {
        "perlin"
    } else {
        "real"
    };
    let mask_s = w
        .str_opt(d, dpath, "mask")
        .unwrap_or_else(|| default_mask.into());
    let mask = MaskSource::parse(&mask_s);
    if mask.is_none() {
        w.problems.push(format!(
            "{dpath}.mask: unknown mask source {mask_s:?} (expected real, perlin, cutpaste, scar, folder, generated or bank)"
        ));
    }
    let mut mask_dir = w.str_opt(d, dpath, "mask_dir");
    if let Some(md) = &mask_dir {
        check_location(w, &format!("{dpath}.mask_dir"), md);
    }
    let mask_bank = w.str_opt(d, dpath, "mask_bank");
    if let Some(b) = &mask_bank {
        check_location(w, &format!("{dpath}.mask_bank"), b);
        if mask != Some(MaskSource::Bank) {
            w.problems.push(format!(
                "{dpath}.mask_bank: only used with mask = \"bank\" (this type has mask = {mask_s:?})"
            ));
        }
    }
    let mask_bank = mask_bank.map(|b| resolve_location(base, &b));
    match (mask, &mask_bank) {
        (Some(MaskSource::Bank), None) => w.problems.push(format!(
            "{dpath}.mask_bank: missing (mask = \"bank\" needs the bank written by `defectforge masks generate --to <bank>`)"
        )),
        (Some(MaskSource::Bank), Some(b)) => {
            if mask_dir.is_some() {
                w.problems.push(format!(
                    "{dpath}.mask_dir: not used with mask = \"bank\" (the bank's folder of this type is used)"
                ));
            }
            mask_dir = Some(format!("{}/{category}/{defect}", b.trim_end_matches('/')));
        }
        _ => {}
    }
    match mask {
        Some(MaskSource::Folder) if mask_dir.is_none() => w.problems.push(format!(
            "{dpath}.mask_dir: missing (mask = \"folder\" needs a folder of binary masks)"
        )),
        Some(MaskSource::Real) if layout == Some(Layout::Folder) => w.problems.push(format!(
            "{dpath}.mask: \"real\" needs the mvtec layout; with the folder layout use mask = \"folder\" and mask_dir"
        )),
        _ => {}
    }
    let split = match w.str_opt(d, dpath, "few_shot_split").as_deref() {
        None | Some("disjoint") => FewShotSplit::Disjoint,
        Some("official") => FewShotSplit::Official,
        Some(o) => {
            w.problems.push(format!(
                "{dpath}.few_shot_split: unknown split {o:?} (expected \"disjoint\" or \"official\")"
            ));
            FewShotSplit::Disjoint
        }
    };
    let mut settings = GeneratorSettings::default();
    if let Some(p) = w.table(d, dpath, "perlin") {
        let pp = format!("{dpath}.perlin");
        w.unknown(
            p,
            &pp,
            &["opacity", "threshold", "scale_exp", "texture_dir"],
        );
        if let Some(o) = w.range_f32(p, &pp, "opacity", 0.0, 1.0) {
            if o[1] <= 0.0 {
                w.problems.push(format!(
                    "{pp}.opacity: max must be > 0 so the anomaly is visible"
                ));
            }
            settings.perlin.opacity = o;
        }
        if let Some(t) = w.f32_opt(p, &pp, "threshold", -0.9, 0.9) {
            settings.perlin.threshold = t;
        }
        if let Some(s) = w.range_u32(p, &pp, "scale_exp", 0, 6) {
            settings.perlin.scale_exp = s;
        }
        if let Some(t) = w.str_opt(p, &pp, "texture_dir") {
            check_location(w, &format!("{pp}.texture_dir"), &t);
            settings.perlin.texture_dir = Some(resolve_location(base, &t));
        }
    }
    if let Some(c) = w.table(d, dpath, "cutpaste") {
        let cp = format!("{dpath}.cutpaste");
        w.unknown(
            c,
            &cp,
            &["area", "aspect", "jitter", "scar_width", "scar_length"],
        );
        if let Some(a) = w.range_f32(c, &cp, "area", 0.0005, 0.9) {
            settings.cutpaste.area = a;
        }
        if let Some(a) = w.range_f32(c, &cp, "aspect", 0.05, 20.0) {
            settings.cutpaste.aspect = a;
        }
        if let Some(j) = w.f32_opt(c, &cp, "jitter", 0.0, 0.5) {
            settings.cutpaste.jitter = j;
        }
        if let Some(s) = w.range_u32(c, &cp, "scar_width", 1, 256) {
            settings.cutpaste.scar_width = s;
        }
        if let Some(s) = w.range_u32(c, &cp, "scar_length", 2, 1024) {
            settings.cutpaste.scar_length = s;
        }
    }
    parse_anomalydiffusion(w, d, dpath, base, category, generator, &mut settings);
    parse_mask_model(w, d, dpath, base, mask, &mut settings);
    if let Some(m) = mask {
        settings.placement = resolve_placement(fg, category, m);
    }
    Some(DefectSpec {
        count: count? as u64,
        generator: generator?,
        mask: mask?,
        mask_dir: mask_dir.map(|m| resolve_location(base, &m)),
        mask_bank,
        few_shot_split: split,
        settings,
    })
}

fn parse_anomalydiffusion(
    w: &mut Walker,
    d: &toml::Table,
    dpath: &str,
    base: &Path,
    category: &str,
    generator: Option<GeneratorKind>,
    settings: &mut GeneratorSettings,
) {
    let ap = format!("{dpath}.anomalydiffusion");
    let s = &mut settings.anomalydiffusion;
    s.reweighting = Reweighting::default_for(category);
    if let Some(a) = w.table(d, dpath, "anomalydiffusion") {
        w.unknown(
            a,
            &ap,
            &[
                "model",
                "embedding",
                "steps",
                "eta",
                "reweighting",
                "spatial_bn",
                "prompt",
                "background_paste",
                "feather_px",
                "full_resolution",
                "thin_defects",
            ],
        );
        if let Some(m) = w.str_opt(a, &ap, "model") {
            check_location(w, &format!("{ap}.model"), &m);
            s.model = Some(resolve_location(base, &m));
        }
        if let Some(e) = w.str_opt(a, &ap, "embedding") {
            s.embedding = Some(e);
        }
        if let Some(n) = w.u32_opt(a, &ap, "steps") {
            s.steps = n;
        }
        if let Some(e) = w.num_opt(a, &ap, "eta") {
            s.eta = e;
        }
        // "auto" (the default) is the category's default
        if a.get("reweighting").and_then(|v| v.as_str()) != Some("auto") {
            if let Some(r) = w.choice(a, &ap, "reweighting") {
                s.reweighting = r;
            }
        }
        if let Some(b) = w.choice(a, &ap, "spatial_bn") {
            s.spatial_bn = b;
        }
        if let Some(p) = w.choice(a, &ap, "prompt") {
            s.prompt = p;
        }
        if let Some(b) = w.bool_opt(a, &ap, "background_paste") {
            s.background_paste = b;
        }
        if let Some(f) = w.num_opt(a, &ap, "feather_px") {
            s.feather_px = f;
        }
        if let Some(b) = w.bool_opt(a, &ap, "full_resolution") {
            s.full_resolution = b;
        }
        if let Some(t) = w.choice(a, &ap, "thin_defects") {
            s.thin_defects = t;
        }
    }
    w.problems.extend(s.validate(&ap));
    if generator == Some(GeneratorKind::AnomalyDiffusion) && s.model.is_none() {
        w.problems.push(format!(
            "{ap}.model: missing (generator \"anomalydiffusion\" needs the model directory printed by `defectforge models import`, e.g. \"s3://bucket/models/ad-…\")"
        ));
    }
}

fn parse_mask_model(
    w: &mut Walker,
    d: &toml::Table,
    dpath: &str,
    base: &Path,
    mask: Option<MaskSource>,
    settings: &mut GeneratorSettings,
) {
    let mp = format!("{dpath}.mask_model");
    let s = &mut settings.mask_model;
    if let Some(a) = w.table(d, dpath, "mask_model") {
        if mask != Some(MaskSource::Generated) {
            w.problems.push(format!(
                "{mp}: only used with mask = \"generated\" (a bank records its own sampling settings)"
            ));
        }
        w.unknown(
            a,
            &mp,
            &[
                "model",
                "embedding",
                "steps",
                "eta",
                "guidance",
                "threshold",
                "max_attempts",
                "prompt",
                "batch",
                "reject_thin",
            ],
        );
        if let Some(b) = w.bool_opt(a, &mp, "reject_thin") {
            s.reject_thin = b;
        }
        if let Some(m) = w.str_opt(a, &mp, "model") {
            check_location(w, &format!("{mp}.model"), &m);
            s.model = Some(resolve_location(base, &m));
        }
        if let Some(e) = w.str_opt(a, &mp, "embedding") {
            s.embedding = Some(e);
        }
        if let Some(n) = w.u32_opt(a, &mp, "steps") {
            s.steps = n;
        }
        if let Some(e) = w.num_opt(a, &mp, "eta") {
            s.eta = e;
        }
        if let Some(g) = w.num_opt(a, &mp, "guidance") {
            s.guidance = g;
        }
        if let Some(t) = w.num_opt(a, &mp, "threshold") {
            s.threshold = t;
        }
        if let Some(n) = w.u32_opt(a, &mp, "max_attempts") {
            s.max_attempts = n;
        }
        if let Some(p) = w.choice(a, &mp, "prompt") {
            s.prompt = p;
        }
        if let Some(n) = w.u32_opt(a, &mp, "batch") {
            s.batch = n;
        }
        w.problems.extend(s.validate(&mp));
    }
    if mask == Some(MaskSource::Generated) && s.model.is_none() {
        match &settings.anomalydiffusion.model {
            Some(m) => s.model = Some(m.clone()),
            None => w.problems.push(format!(
                "{mp}.model: missing (mask = \"generated\" needs a model imported with --mask-embeddings; set mask_model.model or anomalydiffusion.model)"
            )),
        }
    }
}
