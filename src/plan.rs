//! Deterministic planning. Sample `i` of a campaign gets its id, seed, normal image and mask
//! purely from (campaign seed, i) and the sorted dataset listing, so the plan is identical on
//! every machine and samples are computed on demand, shard by shard: planning a million samples
//! holds only the dataset listing in memory.

use crate::campaign::Campaign;
use crate::dataset::DatasetInputs;
use crate::ids;
use crate::job::GenerateJob;
use crate::messages::{SampleSpec, ShardMessage, TypeSpec};
use sha2::{Digest, Sha256};

/// Bumped whenever planning would assign different inputs to a sample.
pub const PLAN_VERSION: u32 = 1;

#[derive(Debug, Clone)]
struct TypeEntry {
    spec: TypeSpec,
    start: u64,
    count: u64,
    normals: Vec<String>,
    masks: Vec<String>,
}

/// A campaign's plan: counts, shard boundaries, digest, and samples on demand.
#[derive(Debug, Clone)]
pub struct Plan {
    pub campaign_id: String,
    pub campaign: Campaign,
    pub digest: String,
    pub total_samples: u64,
    pub shard_count: u64,
    types: Vec<TypeEntry>,
}

fn pick(seed: u64, index: u64, salt: &[u8], n: usize) -> usize {
    let mut h = Sha256::new();
    h.update(b"defectforge/pick/v1");
    h.update(salt);
    h.update(seed.to_le_bytes());
    h.update(index.to_le_bytes());
    let d = h.finalize();
    (u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % n as u64) as usize
}

impl Plan {
    /// Builds the plan of a validated campaign over its resolved inputs.
    pub fn new(campaign: Campaign, inputs: &DatasetInputs) -> Plan {
        let mut types = vec![];
        let mut start = 0;
        for (cname, cat) in &campaign.categories {
            let ci = inputs.categories.get(cname).cloned().unwrap_or_default();
            for (dname, d) in &cat.defects {
                let masks = ci
                    .defects
                    .get(dname)
                    .map(|x| x.masks.clone())
                    .unwrap_or_default();
                types.push(TypeEntry {
                    spec: TypeSpec {
                        category: cname.clone(),
                        defect_type: dname.clone(),
                        generator: d.generator,
                        mask_source: d.mask,
                        settings: d.settings.clone(),
                    },
                    start,
                    count: d.count,
                    normals: ci.normals.clone(),
                    masks,
                });
                start += d.count;
            }
        }
        let total = start;
        let mut h = Sha256::new();
        h.update(format!("defectforge/plan/v{PLAN_VERSION}\n"));
        h.update(serde_json::to_vec(&campaign).expect("campaign serializes"));
        h.update(serde_json::to_vec(inputs).expect("inputs serialize"));
        let digest = hex::encode(h.finalize());
        let campaign_id = format!("{}-{}", ids::slug(&campaign.name), &digest[..12]);
        let shard_count = total.div_ceil(campaign.shard_size as u64);
        Plan {
            campaign_id,
            campaign,
            digest,
            total_samples: total,
            shard_count,
            types,
        }
    }

    /// (category, defect type, count) in plan order.
    pub fn counts(&self) -> Vec<(String, String, u64)> {
        self.types
            .iter()
            .map(|t| (t.spec.category.clone(), t.spec.defect_type.clone(), t.count))
            .collect()
    }

    /// Global sample indices of a shard.
    pub fn shard_range(&self, shard: u64) -> std::ops::Range<u64> {
        let s = self.campaign.shard_size as u64;
        (shard * s).min(self.total_samples)..((shard + 1) * s).min(self.total_samples)
    }

    fn type_of(&self, index: u64) -> usize {
        self.types.partition_point(|t| t.start + t.count <= index)
    }

    /// The sample with a global index.
    pub fn sample(&self, index: u64, type_idx_in_shard: u32) -> SampleSpec {
        let t = &self.types[self.type_of(index)];
        let seed = self.campaign.seed;
        let normal_uri = t.normals[pick(seed, index, b"normal", t.normals.len())].clone();
        let mask_uri = match t.spec.mask_source {
            _ if t.spec.mask_source.from_files() && !t.masks.is_empty() => {
                Some(t.masks[pick(seed, index, b"mask", t.masks.len())].clone())
            }
            _ => None,
        };
        SampleSpec {
            sample_id: ids::sample_id(seed, index),
            index,
            type_idx: type_idx_in_shard,
            normal_uri,
            mask_uri,
            seed: ids::sample_seed(seed, index),
        }
    }

    /// The sample ids of a shard, in order.
    pub fn shard_sample_ids(&self, shard: u64) -> Vec<String> {
        self.shard_range(shard)
            .map(|i| ids::sample_id(self.campaign.seed, i))
            .collect()
    }

    /// The queue message of one shard: identities only.
    pub fn job(&self, shard: u64) -> GenerateJob {
        GenerateJob {
            campaign_id: self.campaign_id.clone(),
            shard,
            output: self.campaign.output.clone(),
            plan_digest: self.digest.clone(),
        }
    }

    /// The inputs this plan reads, for checking them against the campaign's input roots.
    pub fn input_uris(&self) -> impl Iterator<Item = &str> {
        self.types
            .iter()
            .flat_map(|t| t.normals.iter().chain(t.masks.iter()))
            .map(String::as_str)
    }

    /// The work of one shard (what a worker derives from the record for a `generate` job).
    pub fn shard(&self, shard: u64) -> ShardMessage {
        let mut types: Vec<TypeSpec> = vec![];
        let mut type_map: Vec<(usize, u32)> = vec![];
        let mut samples = vec![];
        for i in self.shard_range(shard) {
            let ti = self.type_of(i);
            let local = match type_map.iter().find(|(g, _)| *g == ti) {
                Some((_, l)) => *l,
                None => {
                    types.push(self.types[ti].spec.clone());
                    let l = (types.len() - 1) as u32;
                    type_map.push((ti, l));
                    l
                }
            };
            samples.push(self.sample(i, local));
        }
        ShardMessage {
            campaign_id: self.campaign_id.clone(),
            shard_id: ids::shard_id(shard),
            shard_index: shard,
            output: self.campaign.output.clone(),
            shard_time_limit_s: self.campaign.shard_time_limit_s,
            types,
            samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::MaskSource;
    use crate::dataset::{CategoryInputs, DefectInputs};
    use std::path::Path;

    fn plan(seed: u64) -> Plan {
        let text = format!(
            r#"
name = "t"
seed = {seed}
shard_size = 4
output = "/o"
[dataset]
source = "/d"
[categories.carpet.defects.color]
count = 6
[categories.carpet.defects.cut]
count = 3
mask = "perlin"
"#
        );
        let c = Campaign::parse(&text, Path::new("/"), "t.toml").unwrap();
        let mut inputs = DatasetInputs::default();
        let mut ci = CategoryInputs {
            normals: (0..5)
                .map(|i| format!("/d/carpet/train/good/{i:03}.png"))
                .collect(),
            ..Default::default()
        };
        ci.defects.insert(
            "color".into(),
            DefectInputs {
                masks: vec!["/d/m0.png".into(), "/d/m1.png".into()],
            },
        );
        ci.defects.insert("cut".into(), DefectInputs::default());
        inputs.categories.insert("carpet".into(), ci);
        Plan::new(c, &inputs)
    }

    #[test]
    fn plans_are_deterministic_and_cover_every_sample_once() {
        let a = plan(3);
        let b = plan(3);
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.campaign_id, b.campaign_id);
        assert_ne!(a.digest, plan(4).digest);
        assert_eq!((a.total_samples, a.shard_count), (9, 3));
        let mut seen = std::collections::BTreeSet::new();
        for s in 0..a.shard_count {
            let m = a.shard(s);
            assert_eq!(m, b.shard(s));
            for smp in &m.samples {
                assert!(seen.insert(smp.sample_id.clone()));
                let t = &m.types[smp.type_idx as usize];
                if t.defect_type == "color" {
                    assert!(smp.mask_uri.is_some());
                } else {
                    assert_eq!(t.mask_source, MaskSource::Perlin);
                    assert!(smp.mask_uri.is_none());
                }
            }
            assert_eq!(
                m.samples
                    .iter()
                    .map(|s| s.sample_id.clone())
                    .collect::<Vec<_>>(),
                a.shard_sample_ids(s)
            );
        }
        assert_eq!(seen.len(), 9);
        // shard 1 mixes the two types
        assert_eq!(a.shard(1).types.len(), 2);
    }
}
