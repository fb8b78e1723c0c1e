//! The parity harness: every fixture directory under `DEFECTFORGE_FIXTURES` (default: the
//! `shared/fixtures` folder beside the repository, found from the workspace root) is checked
//! against the engine, following shared/fixtures/README.md:
//!
//! * every tensor of every reference file (`reference.safetensors`, `ref_*.safetensors`) is
//!   either checked (printed with its directory and largest error), consumed as an input of a
//!   check, or named in [`PENDING`] with the work that will check it;
//! * an unknown directory kind, a tensor in none of those lists, or a missing root fails;
//! * only when the variable is unset and the default root does not exist does it pass, saying so.
//!
//! Kinds are directory-name prefixes; configs and shapes come from each directory's own files,
//! so any directory of a known kind is checked without code changes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use defectforge_engine::clip::ClipTextModel;
use defectforge_engine::control::AttentionRecorder;
use defectforge_engine::ddim::{DdimConfig, DdimScheduler};
use defectforge_engine::noise::ReplayNoise;
use defectforge_engine::unet::UNet2DConditionModel;
use defectforge_engine::vae::AutoencoderKL;
use defectforge_engine::weights::read_json;

/// Tensors named here are not yet checked: (kind, reference file, tensor name or `prefix*`,
/// the work that will check it). Move entries out as later issues implement the checks.
const PENDING: &[(&str, &str, &str, &str)] = &[
    // tiny-ldm*: the paper's LDM base in its original checkpoint format.
    (
        "tiny-ldm",
        "reference.safetensors",
        "bert.*",
        "issue 4 (BERT text encoder)",
    ),
    (
        "tiny-ldm",
        "reference.safetensors",
        "ddim10.*",
        "issue 4 (LDM DDIM schedule)",
    ),
    (
        "tiny-ldm",
        "reference.safetensors",
        "ddim200.*",
        "issue 4 (LDM DDIM schedule)",
    ),
    (
        "tiny-ldm",
        "reference.safetensors",
        "schedule.*",
        "issue 4 (LDM DDPM schedule)",
    ),
    (
        "tiny-ldm",
        "reference.safetensors",
        "unet.*",
        "issue 4 (CompVis UNet mapping)",
    ),
    (
        "tiny-ldm",
        "reference.safetensors",
        "vae.*",
        "issue 4 (CompVis VAE mapping)",
    ),
    // anomalydiffusion-tiny*: the method itself.
    (
        "anomalydiffusion-tiny",
        "ref_aar.safetensors",
        "*",
        "issue 5 (AAR, mask dilation)",
    ),
    (
        "anomalydiffusion-tiny",
        "ref_generation.safetensors",
        "*",
        "issue 5 (generation loop)",
    ),
    (
        "anomalydiffusion-tiny",
        "ref_loss.safetensors",
        "grad.*",
        "training issue (gradients; not yet filed)",
    ),
    (
        "anomalydiffusion-tiny",
        "ref_loss.safetensors",
        "*",
        "issue 5 (inference path of the loss)",
    ),
    (
        "anomalydiffusion-tiny",
        "ref_maskgen.safetensors",
        "*",
        "issue 6 (mask generation)",
    ),
    (
        "anomalydiffusion-tiny",
        "ref_spatial_encoder.safetensors",
        "*",
        "issue 5 (spatial encoder)",
    ),
    (
        "anomalydiffusion-tiny",
        "ref_splice.safetensors",
        "*",
        "issue 5 (embedding splice)",
    ),
];

/// Known kinds, longest prefix first.
const KINDS: &[&str] = &["anomalydiffusion-tiny", "tiny-ldm", "tiny-sd"];

/// Element-wise tolerance |got − ref| ≤ atol + rtol·|ref|.
#[derive(Debug, Clone, Copy)]
struct Tol {
    atol: f64,
    rtol: f64,
}

/// tiny-sd README: single components (UNet, VAE, CLIP, attention, scheduler steps).
const SINGLE: Tol = Tol {
    atol: 1e-5,
    rtol: 1e-4,
};
/// tiny-sd README: the 10-step loop and the decoded image (magnitudes grow).
const LOOP: Tol = Tol {
    atol: 1e-4,
    rtol: 1e-4,
};

#[derive(Debug)]
enum Outcome {
    /// Compared: largest absolute error, and whether every element was within tolerance.
    Checked {
        max_abs: f64,
        pass: bool,
        tol: Option<Tol>,
    },
    /// Consumed as an input of the checks.
    Input,
}

fn compare(got: &Tensor, want: &Tensor, tol: Tol) -> Outcome {
    let got = got
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>());
    let want = want
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>());
    match (got, want) {
        (Ok(g), Ok(w)) if g.len() == w.len() => {
            let mut max_abs = 0f64;
            let mut pass = true;
            for (a, b) in g.iter().zip(&w) {
                let d = (a - b).abs();
                if !d.is_finite() {
                    pass = false;
                    max_abs = f64::INFINITY;
                    continue;
                }
                max_abs = max_abs.max(d);
                if d > tol.atol + tol.rtol * b.abs() {
                    pass = false;
                }
            }
            Outcome::Checked {
                max_abs,
                pass,
                tol: Some(tol),
            }
        }
        _ => Outcome::Checked {
            max_abs: f64::INFINITY,
            pass: false,
            tol: Some(tol),
        },
    }
}

fn exact(got: &[i64], want: &Tensor) -> Outcome {
    let w: Vec<i64> = want
        .to_dtype(DType::I64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .unwrap_or_default();
    let pass = w == got;
    let max_abs = if w.len() == got.len() {
        w.iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max)
    } else {
        f64::INFINITY
    };
    Outcome::Checked {
        max_abs,
        pass,
        tol: None,
    }
}

fn workspace_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    loop {
        let toml = dir.join("Cargo.toml");
        if std::fs::read_to_string(&toml).is_ok_and(|s| s.contains("[workspace]")) {
            return dir;
        }
        if !dir.pop() {
            panic!("no workspace root above {}", env!("CARGO_MANIFEST_DIR"));
        }
    }
}

/// The fixtures root, or None when the variable is unset and the default does not exist.
fn fixtures_root() -> Option<PathBuf> {
    resolve_root(std::env::var_os("DEFECTFORGE_FIXTURES"), &workspace_root())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `DEFECTFORGE_FIXTURES` if set (it must exist), else `<workspace>/../shared/fixtures` if it
/// exists, else None (a clone used outside this workspace: nothing to check).
fn resolve_root(
    var: Option<std::ffi::OsString>,
    workspace: &Path,
) -> Result<Option<PathBuf>, String> {
    match var {
        Some(p) => {
            let p = PathBuf::from(p);
            if p.is_dir() {
                Ok(Some(p))
            } else {
                Err(format!(
                    "DEFECTFORGE_FIXTURES={} is not a directory",
                    p.display()
                ))
            }
        }
        None => {
            let p = workspace.join("../shared/fixtures");
            if p.is_dir() {
                Ok(Some(p))
            } else {
                println!(
                    "parity: DEFECTFORGE_FIXTURES is unset and the default root {} does not exist; nothing to check",
                    p.display()
                );
                Ok(None)
            }
        }
    }
}

fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

fn pending_reason(kind: &str, file: &str, tensor: &str) -> Option<&'static str> {
    PENDING
        .iter()
        .find(|(k, f, p, _)| *k == kind && *f == file && pattern_matches(p, tensor))
        .map(|(_, _, _, why)| *why)
}

/// The tensor names in a safetensors file's header (any dtype, BOOL included).
fn header_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
}

fn reference_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n == "reference.safetensors" || (n.starts_with("ref_") && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    files
}

type Results = BTreeMap<(String, String), Outcome>;

#[test]
fn parity_all_fixtures() {
    let Some(root) = fixtures_root() else { return };
    let failures = run_harness(&root);
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}

/// Walks `root` and returns the failures (empty when everything is checked or pending).
fn run_harness(root: &Path) -> Vec<String> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no fixture directories under {}",
        root.display()
    );
    let mut failures = Vec::new();
    let (mut n_checked, mut n_input, mut n_pending) = (0, 0, 0);
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let Some(kind) = KINDS.iter().find(|k| name.starts_with(**k)) else {
            failures.push(format!("{name}: unknown fixture kind"));
            continue;
        };
        let files = reference_files(dir);
        if files.is_empty() {
            failures.push(format!("{name}: no reference safetensors file"));
            continue;
        }
        let results: Results = match *kind {
            "tiny-sd" => match check_tiny_sd(dir) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{name}: checks failed to run: {e}"));
                    Results::new()
                }
            },
            _ => Results::new(),
        };
        let mut listed = Vec::new();
        for file in &files {
            let fname = file.file_name().unwrap().to_string_lossy().to_string();
            for tensor in header_names(file) {
                let key = (fname.clone(), tensor.clone());
                listed.push(key.clone());
                match results.get(&key) {
                    Some(Outcome::Checked { max_abs, pass, tol }) => {
                        n_checked += 1;
                        let tol = tol.map_or("exact".to_string(), |t| {
                            format!("atol {:e} + rtol {:e}", t.atol, t.rtol)
                        });
                        println!(
                            "{name}/{fname} {tensor}: max |err| {max_abs:.3e} ({tol}) {}",
                            if *pass { "ok" } else { "FAIL" }
                        );
                        if !pass {
                            failures.push(format!(
                                "{name}/{fname} {tensor}: max |err| {max_abs:.3e} beyond tolerance"
                            ));
                        }
                    }
                    Some(Outcome::Input) => {
                        n_input += 1;
                        println!("{name}/{fname} {tensor}: input of the checks");
                    }
                    None => match pending_reason(kind, &fname, &tensor) {
                        Some(why) => {
                            n_pending += 1;
                            println!("{name}/{fname} {tensor}: pending — {why}");
                        }
                        None => failures.push(format!(
                            "{name}/{fname} {tensor}: neither checked nor pending"
                        )),
                    },
                }
            }
        }
        for key in results.keys() {
            if !listed.contains(key) {
                failures.push(format!(
                    "{name}: checked {key:?} which no reference file lists"
                ));
            }
        }
    }
    println!(
        "parity: {n_checked} checked, {n_input} inputs, {n_pending} pending, {} failures",
        failures.len()
    );
    failures
}

#[test]
fn harness_fails_on_unknown_kinds_unlisted_tensors_and_missing_roots() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("mystery-x")).unwrap();
    let ldm = root.path().join("tiny-ldm-z");
    std::fs::create_dir(&ldm).unwrap();
    let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = [
        ("bert.output".to_string(), t.clone()),
        ("surprise".to_string(), t),
    ]
    .into();
    candle_core::safetensors::save(&tensors, ldm.join("reference.safetensors")).unwrap();
    let failures = run_harness(root.path());
    assert!(
        failures
            .iter()
            .any(|f| f.contains("mystery-x: unknown fixture kind")),
        "{failures:?}"
    );
    assert!(
        failures
            .iter()
            .any(|f| f.contains("surprise: neither checked nor pending")),
        "{failures:?}"
    );
    assert!(
        !failures.iter().any(|f| f.contains("bert.output")),
        "{failures:?}"
    );
    assert_eq!(failures.len(), 2, "{failures:?}");
    // A root named by the variable must exist; an absent default root is a skip.
    let missing = root.path().join("nowhere");
    assert!(resolve_root(Some(missing.clone().into()), root.path()).is_err());
    assert_eq!(resolve_root(None, &missing).unwrap(), None);
}

/// Checks a `tiny-sd*` directory (diffusers pipeline layout, see its README).
fn check_tiny_sd(dir: &Path) -> Result<Results, Box<dyn std::error::Error>> {
    const FILE: &str = "reference.safetensors";
    // The step tests are specified with 10 inference steps set (tiny-sd README).
    const STEP_TEST_STEPS: usize = 10;
    let dev = Device::Cpu;
    let r: HashMap<String, Tensor> = candle_core::safetensors::load(dir.join(FILE), &dev)?;
    let get = |n: &str| -> Result<&Tensor, String> {
        r.get(n).ok_or_else(|| format!("{FILE} has no {n}"))
    };
    let mut out = Results::new();
    let mut put = |n: &str, o: Outcome| {
        out.insert((FILE.to_string(), n.to_string()), o);
    };

    // DDIM.
    let sched_cfg: DdimConfig = read_json(&dir.join("scheduler/scheduler_config.json"))?;
    let sched = DdimScheduler::new(sched_cfg.clone(), STEP_TEST_STEPS, 0.0)?;
    let ac = Tensor::new(sched.alphas_cumprod(), &dev)?;
    put(
        "ddim_alphas_cumprod",
        compare(&ac, get("ddim_alphas_cumprod")?, SINGLE),
    );
    for (name, t) in &r {
        if let Some(n) = name.strip_prefix("ddim_timesteps_") {
            let n: usize = n.parse()?;
            let s = DdimScheduler::new(sched_cfg.clone(), n, 0.0)?;
            let got: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
            put(name, exact(&got, t));
        }
    }
    let eps = get("ddim_step_model_output")?;
    let x = get("ddim_step_sample")?;
    put("ddim_step_model_output", Outcome::Input);
    put("ddim_step_sample", Outcome::Input);
    for (name, want) in &r {
        let Some(rest) = name.strip_prefix("ddim_step_t") else {
            continue;
        };
        let (t, what) = rest.split_once('_').ok_or("bad step tensor name")?;
        if what != "prev_sample" && what != "pred_original_sample" {
            continue;
        }
        let t: usize = t.parse()?;
        let step = sched.step(eps, t, x, &mut ReplayNoise::default())?;
        let got = if what == "prev_sample" {
            step.prev_sample
        } else {
            step.pred_original_sample
        };
        put(name, compare(&got, want, SINGLE));
    }

    // CLIP.
    let clip = ClipTextModel::load(&dir.join("text_encoder"), DType::F32, &dev)?;
    let ids = get("clip_input_ids")?;
    put("clip_input_ids", Outcome::Input);
    let hidden = clip.forward(ids)?;
    put(
        "clip_last_hidden_state",
        compare(&hidden, get("clip_last_hidden_state")?, SINGLE),
    );
    put(
        "clip_pooler_output",
        compare(
            &clip.pooled(&hidden, ids)?,
            get("clip_pooler_output")?,
            SINGLE,
        ),
    );
    put(
        "ddim_loop_encoder_hidden_states",
        compare(&hidden, get("ddim_loop_encoder_hidden_states")?, SINGLE),
    );

    // VAE.
    let vae = AutoencoderKL::load(&dir.join("vae"), DType::F32, &dev)?;
    put("vae_image", Outcome::Input);
    let post = vae.encode(get("vae_image")?)?;
    put(
        "vae_encode_mean",
        compare(&post.mean, get("vae_encode_mean")?, SINGLE),
    );
    put(
        "vae_encode_logvar",
        compare(&post.logvar, get("vae_encode_logvar")?, SINGLE),
    );
    put("vae_decode_latent", Outcome::Input);
    let img = vae.decode(get("vae_decode_latent")?)?;
    put(
        "vae_decode_image",
        compare(&img, get("vae_decode_image")?, SINGLE),
    );

    // UNet.
    let unet = UNet2DConditionModel::load(&dir.join("unet"), DType::F32, &dev)?;
    let lat = get("unet_latents")?;
    let ehs = get("unet_encoder_hidden_states")?;
    put("unet_latents", Outcome::Input);
    put("unet_encoder_hidden_states", Outcome::Input);
    let mut rec = AttentionRecorder::new(|s| s.is_cross && s.index == 0);
    let o500 = unet.forward_t(lat, 500.0, ehs, Some(&mut rec))?;
    put(
        "unet_out_t500",
        compare(&o500, get("unet_out_t500")?, SINGLE),
    );
    let o10 = unet.forward_t(lat, 10.0, ehs, None)?;
    put("unet_out_t10", compare(&o10, get("unet_out_t10")?, SINGLE));
    let tm = get("unet_timesteps_mixed")?;
    put("unet_timesteps_mixed", Outcome::Input);
    let om = unet.forward(lat, tm, ehs, None)?;
    put(
        "unet_out_tmixed",
        compare(&om, get("unet_out_tmixed")?, SINGLE),
    );
    let first = rec
        .records
        .first()
        .ok_or("no cross-attention layer recorded")?;
    if first.name != "down_blocks.0.attentions.0.transformer_blocks.0.attn2" {
        return Err(format!("first cross-attention is {}", first.name).into());
    }
    put(
        "unet_xattn0_hidden_states",
        compare(&first.input, get("unet_xattn0_hidden_states")?, SINGLE),
    );
    put(
        "unet_xattn0_probs_t500",
        compare(&first.probs, get("unet_xattn0_probs_t500")?, SINGLE),
    );
    put(
        "unet_xattn0_out",
        compare(&first.output, get("unet_xattn0_out")?, SINGLE),
    );

    // The DDIM loop, free-running from the initial noise, decoded by the VAE.
    let preds_ref = get("ddim_loop_noise_preds")?;
    let lat_ref = get("ddim_loop_latents")?;
    let steps = preds_ref.dim(0)?;
    let loop_sched = DdimScheduler::new(sched_cfg, steps, 0.0)?;
    let ctx = get("ddim_loop_encoder_hidden_states")?;
    put("ddim_loop_init_noise", Outcome::Input);
    let mut x = (get("ddim_loop_init_noise")? * loop_sched.init_noise_sigma())?;
    let (mut preds, mut lats) = (Vec::new(), Vec::new());
    let mut noise = ReplayNoise::default();
    for &t in loop_sched.timesteps() {
        let e = unet.forward_t(&x, t as f64, ctx, None)?;
        x = loop_sched.step(&e, t, &x, &mut noise)?.prev_sample;
        preds.push(e);
        lats.push(x.clone());
    }
    put(
        "ddim_loop_noise_preds",
        compare(&Tensor::stack(&preds, 0)?, preds_ref, LOOP),
    );
    put(
        "ddim_loop_latents",
        compare(&Tensor::stack(&lats, 0)?, lat_ref, LOOP),
    );
    put(
        "ddim_loop_final_latent",
        compare(&x, get("ddim_loop_final_latent")?, LOOP),
    );
    let decoded = vae.decode(&(x / vae.config().scaling_factor)?)?;
    put(
        "ddim_loop_decoded_image",
        compare(&decoded, get("ddim_loop_decoded_image")?, LOOP),
    );
    Ok(out)
}
