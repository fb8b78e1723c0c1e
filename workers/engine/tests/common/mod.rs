//! Fixture discovery shared by the engine's fixture-driven tests (the parity harness keeps its
//! own stricter root resolution, which it tests).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `DEFECTFORGE_FIXTURES` (which must exist), else `../shared/fixtures` beside the workspace;
/// None (the test says so and passes) when neither is set up.
pub fn fixtures_root() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DEFECTFORGE_FIXTURES") {
        let p = PathBuf::from(p);
        assert!(
            p.is_dir(),
            "DEFECTFORGE_FIXTURES={} is not a directory",
            p.display()
        );
        return Some(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures");
    if p.is_dir() {
        Some(p)
    } else {
        println!("no fixtures at {}; skipping", p.display());
        None
    }
}

/// Every fixture directory whose name starts with `kind` (at least one when fixtures exist).
pub fn fixture_dirs(kind: &str) -> Vec<PathBuf> {
    let Some(root) = fixtures_root() else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(kind))
        })
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no {kind}* fixture under {}",
        root.display()
    );
    dirs
}

/// Writes a WordPiece `vocab.txt` (line number = id) of `size` lines from a fixture's
/// `fixture_vocabulary` word → id map, filling unused ids with `[unusedN]`.
pub fn write_fixture_vocab(
    words: &serde_json::Map<String, serde_json::Value>,
    size: usize,
    path: &Path,
) {
    let mut lines: Vec<String> = (0..size).map(|i| format!("[unused{i}]")).collect();
    for (w, id) in words {
        lines[id.as_u64().expect("vocabulary id") as usize] = w.clone();
    }
    std::fs::write(path, lines.join("\n") + "\n").expect("write vocab");
}
