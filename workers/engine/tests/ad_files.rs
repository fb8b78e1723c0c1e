//! Reading the official AnomalyDiffusion files: for every `anomalydiffusion-tiny*` fixture
//! under `DEFECTFORGE_FIXTURES` (default `../shared/fixtures` beside the workspace), the
//! `EmbeddingManager.save` pickles (`embeddings.pt`, `mask_embeddings.pt`) give exactly the
//! tensors and token ids of their flat safetensors copies, a write/read round trip is lossless,
//! and broken or foreign files are refused with an error naming the file. Without fixtures the
//! fixture tests say so and pass.

use std::io::Write;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use defectforge_engine::ad_files::{
    read_embeddings_pt, read_embeddings_safetensors, read_torch_state_dict,
    write_embeddings_safetensors, EmbeddingsFile,
};

mod common;

/// Every `anomalydiffusion-tiny*` fixture directory.
fn ad_dirs() -> Vec<PathBuf> {
    common::fixture_dirs("anomalydiffusion-tiny")
}

fn f32_bits(t: &Tensor) -> Vec<u32> {
    assert_eq!(t.dtype(), DType::F32);
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn assert_same(a: &EmbeddingsFile, b: &EmbeddingsFile, what: &str) {
    assert_eq!(a.placeholder_tokens, b.placeholder_tokens, "{what}: tokens");
    assert_eq!(
        a.params.keys().collect::<Vec<_>>(),
        b.params.keys().collect::<Vec<_>>(),
        "{what}: names"
    );
    for (name, t) in &a.params {
        let u = &b.params[name];
        assert_eq!(t.dims(), u.dims(), "{what}: {name} shape");
        assert_eq!(f32_bits(t), f32_bits(u), "{what}: {name} values");
    }
}

#[test]
fn embedding_pickles_match_their_safetensors_copies_bit_for_bit() {
    for dir in ad_dirs() {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let types: Vec<String> = config["defect_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let vectors = |model: &str| {
            config[model]["model"]["params"]["personalization_config"]["params"]
                ["num_vectors_per_token"]
                .as_u64()
                .unwrap() as usize
        };
        let dim = config["spatial_encoder"]["out_dim"].as_u64().unwrap() as usize;

        for (pt, st, model) in [
            (
                "embeddings.pt",
                "embeddings.safetensors",
                "anomaly_model_yaml_equivalent",
            ),
            (
                "mask_embeddings.pt",
                "mask_embeddings.safetensors",
                "mask_model_yaml_equivalent",
            ),
        ] {
            let a = read_embeddings_pt(&dir.join(pt)).unwrap();
            let b = read_embeddings_safetensors(&dir.join(st)).unwrap();
            assert_same(&a, &b, &format!("{}/{pt}", dir.display()));
            let names: Vec<&String> = a.params.keys().collect();
            if pt == "embeddings.pt" {
                let mut want: Vec<&String> = types.iter().collect();
                want.sort();
                assert_eq!(names, want, "one embedding per defect type");
            } else {
                assert_eq!(names, vec!["*"]);
            }
            for t in a.params.values() {
                assert_eq!(t.dims(), &[vectors(model), dim]);
            }
            let star = config["fixture_vocabulary"]["*"].as_i64().unwrap();
            assert_eq!(a.placeholder_tokens.get("*"), Some(&star));
            println!(
                "{}/{pt}: {} embedding(s) {:?}, tokens {:?}: identical to {st}",
                dir.display(),
                a.params.len(),
                a.params.values().next().unwrap().dims(),
                a.placeholder_tokens
            );
        }
    }
}

#[test]
fn embeddings_survive_a_safetensors_round_trip() {
    for dir in ad_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        for pt in ["embeddings.pt", "mask_embeddings.pt"] {
            let a = read_embeddings_pt(&dir.join(pt)).unwrap();
            let out = tmp.path().join(format!("{pt}.safetensors"));
            write_embeddings_safetensors(&a, &out).unwrap();
            let b = read_embeddings_safetensors(&out).unwrap();
            assert_same(&a, &b, pt);
        }
    }
}

#[test]
fn the_embeddings_pickle_is_not_a_state_dict() {
    // candle's state-dict reader finds nothing in it (the tensors sit inside a ParameterDict);
    // that must be an error, not an empty Ok.
    for dir in ad_dirs() {
        let err = read_torch_state_dict(&dir.join("embeddings.pt")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("embeddings.pt") && msg.contains("no tensors"),
            "{msg}"
        );
    }
}

#[test]
fn broken_files_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    };
    let expect_err =
        |r: Result<EmbeddingsFile, defectforge_engine::EngineError>, file: &str, needle: &str| {
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains(file) && msg.contains(needle), "{msg}");
        };

    let garbage = write("garbage.pt", b"this is not a zip archive at all");
    expect_err(read_embeddings_pt(&garbage), "garbage.pt", "zip");
    let err = read_torch_state_dict(&garbage).unwrap_err().to_string();
    assert!(err.contains("garbage.pt"), "{err}");
    expect_err(
        read_embeddings_safetensors(&garbage),
        "garbage.pt",
        "safetensors",
    );
    expect_err(
        read_embeddings_pt(&tmp.path().join("absent.pt")),
        "absent.pt",
        "",
    );

    if let Some(dir) = ad_dirs().first() {
        // A truncated archive (the central directory is at the end).
        let bytes = std::fs::read(dir.join("embeddings.pt")).unwrap();
        let cut = write("cut.pt", &bytes[..bytes.len() / 2]);
        expect_err(read_embeddings_pt(&cut), "cut.pt", "zip");
        // A torch file of another kind: a state dict has no string_to_param.
        expect_err(
            read_embeddings_pt(&dir.join("spatial_encoder.pt")),
            "spatial_encoder.pt",
            "string_to_token",
        );
        // A safetensors file with foreign keys.
        expect_err(
            read_embeddings_safetensors(&dir.join("spatial_encoder.safetensors")),
            "spatial_encoder.safetensors",
            "unexpected key",
        );
    }
}

#[test]
fn a_zip_without_a_pickle_is_not_a_torch_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("plain.zip");
    std::fs::write(&p, stored_zip("hello.txt", b"hello")).unwrap();
    let msg = read_embeddings_pt(&p).unwrap_err().to_string();
    assert!(
        msg.contains("plain.zip") && msg.contains("data.pkl"),
        "{msg}"
    );
    let msg = read_torch_state_dict(&p).unwrap_err().to_string();
    assert!(msg.contains("plain.zip"), "{msg}");
}

/// A one-entry zip archive with the entry stored uncompressed.
fn stored_zip(name: &str, data: &[u8]) -> Vec<u8> {
    let crc = crc32(data);
    let mut out = Vec::new();
    let le16 = |v: u16| v.to_le_bytes();
    let le32 = |v: u32| v.to_le_bytes();
    // Local file header.
    out.extend(le32(0x0403_4b50));
    out.extend(le16(20)); // version needed
    out.extend(le16(0)); // flags
    out.extend(le16(0)); // stored
    out.extend(le16(0)); // time
    out.extend(le16(0x21)); // date
    out.extend(le32(crc));
    out.extend(le32(data.len() as u32));
    out.extend(le32(data.len() as u32));
    out.extend(le16(name.len() as u16));
    out.extend(le16(0));
    out.extend(name.as_bytes());
    out.extend(data);
    let cd_start = out.len();
    // Central directory entry.
    out.extend(le32(0x0201_4b50));
    out.extend(le16(20)); // version made by
    out.extend(le16(20));
    out.extend(le16(0));
    out.extend(le16(0));
    out.extend(le16(0));
    out.extend(le16(0x21));
    out.extend(le32(crc));
    out.extend(le32(data.len() as u32));
    out.extend(le32(data.len() as u32));
    out.extend(le16(name.len() as u16));
    out.extend(le16(0)); // extra
    out.extend(le16(0)); // comment
    out.extend(le16(0)); // disk
    out.extend(le16(0)); // internal attrs
    out.extend(le32(0)); // external attrs
    out.extend(le32(0)); // local header offset
    out.extend(name.as_bytes());
    let cd_len = out.len() - cd_start;
    // End of central directory.
    out.extend(le32(0x0605_4b50));
    out.extend(le16(0));
    out.extend(le16(0));
    out.extend(le16(1));
    out.extend(le16(1));
    out.extend(le32(cd_len as u32));
    out.extend(le32(cd_start as u32));
    out.extend(le16(0));
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn string_to_token_is_read_from_its_storage_offset() {
    // The '*' id is a 0-d view at a non-zero offset into the saved prompt row; reading the
    // storage from its start would give [CLS] (101) instead.
    for dir in ad_dirs() {
        let e = read_embeddings_pt(&dir.join("embeddings.pt")).unwrap();
        assert_ne!(e.placeholder_tokens["*"], 101);
        let st = read_embeddings_safetensors(&dir.join("embeddings.safetensors")).unwrap();
        assert_eq!(e.placeholder_tokens["*"], st.placeholder_tokens["*"]);
        let t = Tensor::new(e.placeholder_tokens["*"], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[] as &[usize]);
    }
}
