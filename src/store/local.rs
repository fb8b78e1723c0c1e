//! A directory as an object store. Writes go to a temporary file in the same directory and are
//! renamed into place, so a reader (or finalize) never sees a half-written object.

use super::{check_key, ObjectMeta, ObjectStore, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl AsRef<Path>) -> Self {
        Self {
            root: root.as_ref().to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn err(&self, key: &str, e: std::io::Error) -> StoreError {
        let uri = self.uri(key);
        match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound { uri },
            std::io::ErrorKind::PermissionDenied => StoreError::Auth {
                uri,
                message: e.to_string(),
            },
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                StoreError::Full {
                    uri,
                    message: e.to_string(),
                }
            }
            _ => StoreError::Other {
                uri,
                message: e.to_string(),
            },
        }
    }
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, std::fs::Metadata)>) -> std::io::Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") {
            continue;
        }
        let key = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let ft = entry.file_type()?;
        if ft.is_dir() {
            walk(&entry.path(), &key, out)?;
        } else if ft.is_file() {
            out.push((key, entry.metadata()?));
        }
    }
    Ok(())
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn root_uri(&self) -> String {
        self.root.to_string_lossy().into_owned()
    }

    async fn put(&self, key: &str, body: Bytes, _content_type: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let key2 = key.to_string();
        let this = self.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let dir = path.parent().expect("key has a parent");
            std::fs::create_dir_all(dir).map_err(|e| this.err(&key2, e))?;
            let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
            // a failed write (disk full) must not leave its partial temp file behind
            std::fs::write(&tmp, &body).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                this.err(&key2, e)
            })?;
            std::fs::rename(&tmp, &path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                this.err(&key2, e)
            })
        })
        .await
        .map_err(|e| StoreError::Other {
            uri: self.uri(key),
            message: e.to_string(),
        })?
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(key)?;
        tokio::fs::read(&path)
            .await
            .map(Bytes::from)
            .map_err(|e| self.err(key, e))
    }

    async fn get_limited(&self, key: &str, limit: u64) -> Result<Bytes, StoreError> {
        use tokio::io::AsyncReadExt;
        let path = self.path(key)?;
        // before opening: opening a FIFO would block until a writer comes
        let pre = tokio::fs::metadata(&path)
            .await
            .map_err(|e| self.err(key, e))?;
        if !pre.is_file() {
            return Err(StoreError::NotAFile { uri: self.uri(key) });
        }
        let f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| self.err(key, e))?;
        let m = f.metadata().await.map_err(|e| self.err(key, e))?;
        if !m.is_file() {
            return Err(StoreError::NotAFile { uri: self.uri(key) });
        }
        if m.len() > limit {
            return Err(StoreError::TooLarge {
                uri: self.uri(key),
                size: m.len(),
                limit,
            });
        }
        // the file may grow between the check and the read: never read past the limit
        let mut buf = Vec::with_capacity(m.len() as usize);
        f.take(limit + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| self.err(key, e))?;
        if buf.len() as u64 > limit {
            return Err(StoreError::TooLarge {
                uri: self.uri(key),
                size: buf.len() as u64,
                limit,
            });
        }
        Ok(Bytes::from(buf))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
                last_modified: m
                    .modified()
                    .map(Into::into)
                    .unwrap_or_else(|_| chrono::Utc::now()),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        if !prefix.is_empty() {
            check_key(prefix.trim_end_matches('/'))?;
        }
        // Walk the deepest directory the prefix names, then filter by the full prefix.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let root = self.root.join(dir_part);
        let prefix_owned = prefix.to_string();
        let dir_owned = dir_part.to_string();
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut items = vec![];
            walk(&root, &dir_owned, &mut items).map_err(|e| this.err(&prefix_owned, e))?;
            let mut out: Vec<ObjectMeta> = items
                .into_iter()
                .filter(|(k, _)| k.starts_with(&prefix_owned))
                .map(|(key, m)| ObjectMeta {
                    key,
                    size: m.len(),
                    last_modified: m
                        .modified()
                        .map(Into::into)
                        .unwrap_or_else(|_| chrono::Utc::now()),
                })
                .collect();
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Other {
            uri: self.uri(prefix),
            message: e.to_string(),
        })?
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err(key, e)),
        }
    }

    async fn check(&self) -> Result<(), StoreError> {
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(|e| StoreError::Other {
                uri: self.root_uri(),
                message: format!("cannot create the output directory: {e}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        s.put("a/b/1.txt", Bytes::from_static(b"one"), "text/plain")
            .await
            .unwrap();
        s.put("a/b/2.txt", Bytes::from_static(b"two!"), "text/plain")
            .await
            .unwrap();
        s.put("a/c.txt", Bytes::from_static(b"c"), "text/plain")
            .await
            .unwrap();
        assert_eq!(&s.get("a/b/1.txt").await.unwrap()[..], b"one");
        let l = s.list("a/b/").await.unwrap();
        assert_eq!(
            l.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
            ["a/b/1.txt", "a/b/2.txt"]
        );
        assert_eq!(l[1].size, 4);
        assert_eq!(s.list("a/").await.unwrap().len(), 3);
        assert_eq!(s.list("zzz/").await.unwrap().len(), 0);
        assert!(s.head("a/c.txt").await.unwrap().is_some());
        s.delete("a/c.txt").await.unwrap();
        assert!(s.head("a/c.txt").await.unwrap().is_none());
        assert!(matches!(
            s.get("a/c.txt").await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            s.put("../evil", Bytes::new(), "x").await,
            Err(StoreError::BadKey { .. })
        ));
    }

    #[tokio::test]
    async fn limited_reads_refuse_large_files_and_devices() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        s.put("big.bin", Bytes::from(vec![7u8; 1000]), "x")
            .await
            .unwrap();
        assert_eq!(s.get_limited("big.bin", 1000).await.unwrap().len(), 1000);
        let e = s.get_limited("big.bin", 999).await.unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::TooLarge {
                    size: 1000,
                    limit: 999,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("big.bin"), "{e}");
        // a device reads forever; a directory is no input
        let dev = LocalStore::new(std::path::Path::new("/dev"));
        let e = dev.get_limited("zero", 1 << 20).await.unwrap_err();
        assert!(matches!(e, StoreError::NotAFile { .. }), "{e}");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(matches!(
            s.get_limited("sub", 10).await,
            Err(StoreError::NotAFile { .. })
        ));
    }

    #[tokio::test]
    async fn a_failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        // the final rename fails: the key is a non-empty directory
        std::fs::create_dir_all(dir.path().join("a/taken/x")).unwrap();
        assert!(s
            .put("a/taken", Bytes::from_static(b"1"), "x")
            .await
            .is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["taken"]);
    }
}
