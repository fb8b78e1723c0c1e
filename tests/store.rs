//! The object-store contract on the real S3 server (Garage) and on a local directory: the same
//! behaviour behind the same trait, multipart uploads for large objects, paginated listings, and
//! keys that cannot escape the root.

mod common;

use bytes::Bytes;
use common::*;
use defectforge::store::{LocalStore, ObjectStore, StoreError};

async fn contract(st: &dyn ObjectStore) {
    st.put(
        "a/b/1.bin",
        Bytes::from_static(b"one"),
        "application/octet-stream",
    )
    .await
    .unwrap();
    st.put(
        "a/b/2.bin",
        Bytes::from_static(b"two!"),
        "application/octet-stream",
    )
    .await
    .unwrap();
    st.put(
        "a/c.bin",
        Bytes::from_static(b"c"),
        "application/octet-stream",
    )
    .await
    .unwrap();
    assert_eq!(&st.get("a/b/1.bin").await.unwrap()[..], b"one");
    let l = st.list("a/b/").await.unwrap();
    assert_eq!(
        l.iter()
            .map(|m| (m.key.as_str(), m.size))
            .collect::<Vec<_>>(),
        [("a/b/1.bin", 3), ("a/b/2.bin", 4)]
    );
    assert_eq!(st.list("a/").await.unwrap().len(), 3);
    assert!(st.list("nothing/").await.unwrap().is_empty());
    assert_eq!(st.head("a/c.bin").await.unwrap().unwrap().size, 1);
    assert!(st.head("a/missing").await.unwrap().is_none());
    assert!(matches!(
        st.get("a/missing").await,
        Err(StoreError::NotFound { .. })
    ));
    st.delete("a/c.bin").await.unwrap();
    st.delete("a/c.bin").await.unwrap(); // deleting twice is fine
    assert!(st.head("a/c.bin").await.unwrap().is_none());
    for k in ["../escape", "a/../../escape", "/abs"] {
        assert!(
            matches!(
                st.put(k, Bytes::new(), "x").await,
                Err(StoreError::BadKey { .. })
            ),
            "{k}"
        );
    }
    assert!(st.uri("a/b/1.bin").starts_with(&st.root_uri()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_and_local_stores_behave_the_same() {
    let sc = Scenario::new("store");
    let s3 = sc.store(&sc.s3_uri("contract")).await;
    s3.check().await.unwrap();
    contract(s3.as_ref()).await;
    let local = LocalStore::new(sc.dir.path().join("local"));
    local.check().await.unwrap();
    contract(&local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_and_long_listings() {
    let sc = Scenario::new("store-big");
    let st = sc.store(&sc.s3_uri("big")).await;
    // above the multipart threshold: uploaded in 8 MiB parts
    let big: Vec<u8> = (0..(20u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    st.put(
        "big.bin",
        Bytes::from(big.clone()),
        "application/octet-stream",
    )
    .await
    .unwrap();
    let back = st.get("big.bin").await.unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big, "multipart object differs");
    // more keys than one ListObjectsV2 page (1000)
    use futures_util::StreamExt;
    futures_util::stream::iter(0..1100)
        .map(|i| {
            let st = st.clone();
            async move {
                st.put(
                    &format!("many/{i:05}"),
                    Bytes::from_static(b"x"),
                    "text/plain",
                )
                .await
                .unwrap()
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let l = st.list("many/").await.unwrap();
    assert_eq!(l.len(), 1100);
    assert!(l.windows(2).all(|w| w[0].key < w[1].key));
}
