//! The object layout of a campaign inside the output store (ARCHITECTURE.md "Object layout").
//! Keys are built only from the key-safe campaign id, shard numbers, hex sample ids and attempt
//! ids, never from user-supplied names, so no category or defect name can escape the prefix.

pub fn campaign_record(cid: &str) -> String {
    format!("campaigns/{cid}/campaign.json")
}
pub fn cancelled_marker(cid: &str) -> String {
    format!("campaigns/{cid}/cancelled.json")
}
pub fn samples_prefix(cid: &str) -> String {
    format!("campaigns/{cid}/samples/")
}
pub fn sample_image(cid: &str, sample_id: &str, attempt: &str) -> String {
    format!("campaigns/{cid}/samples/{sample_id}/{attempt}.png")
}
pub fn sample_mask(cid: &str, sample_id: &str, attempt: &str) -> String {
    format!("campaigns/{cid}/samples/{sample_id}/{attempt}_mask.png")
}
pub fn shards_prefix(cid: &str) -> String {
    format!("campaigns/{cid}/shards/")
}
pub fn fragment(cid: &str, shard_id: &str, attempt: &str) -> String {
    format!("campaigns/{cid}/shards/{shard_id}/{attempt}.parquet")
}
pub fn failures_prefix(cid: &str) -> String {
    format!("campaigns/{cid}/failures/")
}
pub fn failure(cid: &str, shard_id: &str) -> String {
    format!("campaigns/{cid}/failures/{shard_id}.json")
}
pub fn manifest_prefix(cid: &str) -> String {
    format!("campaigns/{cid}/manifest/")
}
pub fn manifest_part(cid: &str, n: usize) -> String {
    format!("campaigns/{cid}/manifest/part-{n:05}.parquet")
}
pub fn manifest_index(cid: &str) -> String {
    format!("campaigns/{cid}/manifest/_manifest.json")
}

/// Parses `campaigns/<cid>/shards/<shard>/<attempt>.parquet` into (shard, attempt).
pub fn parse_fragment_key<'a>(cid: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(&format!("campaigns/{cid}/shards/"))?;
    let (shard, file) = rest.split_once('/')?;
    let attempt = file.strip_suffix(".parquet")?;
    if attempt.contains('/') {
        return None;
    }
    Some((shard, attempt))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn fragment_keys_round_trip() {
        let k = fragment("c-1", "0000003", "0190-ab");
        assert_eq!(parse_fragment_key("c-1", &k), Some(("0000003", "0190-ab")));
        assert_eq!(
            parse_fragment_key("c-1", "campaigns/c-1/shards/x.json"),
            None
        );
    }
}
