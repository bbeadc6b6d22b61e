//! Exports in S3-compatible object storage (`s3://BUCKET/KEY`), through
//! the `object_store` crate. Credentials, region and endpoint come from the
//! usual AWS environment variables (AWS_ACCESS_KEY_ID,
//! AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or
//! AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for another S3-compatible service,
//! AWS_ALLOW_HTTP=true for a plain-http one). Uploads are multipart: an
//! upload that does not finish is never completed, so no object appears.

use std::io::{Read, Write};
use std::sync::Arc;

use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

use super::Error;

/// Bytes per uploaded part (S3 wants at least 5 MiB but the last).
const PART: usize = 8 << 20;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Bytes read to decode an object's header.
const HEADER_READ: u64 = 64 << 10;

/// An `s3://BUCKET/KEY` address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub key: String,
}

impl S3Url {
    /// Parses `s3://BUCKET[/KEY]`; None if `s` is not an s3:// address.
    pub fn parse(s: &str) -> Option<Result<S3Url, Error>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || key.contains("//") || key.starts_with('/') {
            return Some(Err(Error::Usage(format!(
                "{s} is not an object address; write s3://BUCKET/PREFIX or s3://BUCKET/KEY"
            ))));
        }
        Some(Ok(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        }))
    }

    /// A key naming one export (`….lsx`), rather than a prefix.
    pub fn is_object(&self) -> bool {
        self.key.ends_with(".lsx")
    }

    /// The object for snapshot `name` under this prefix (or this object).
    pub fn object_for(&self, name: &str) -> S3Url {
        if self.is_object() {
            return self.clone();
        }
        let prefix = self.key.trim_end_matches('/');
        S3Url {
            bucket: self.bucket.clone(),
            key: if prefix.is_empty() {
                format!("{name}.lsx")
            } else {
                format!("{prefix}/{name}.lsx")
            },
        }
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// A bucket, and the runtime its requests run on.
pub struct Bucket {
    rt: Arc<tokio::runtime::Runtime>,
    store: Arc<AmazonS3>,
    name: String,
}

fn failed(what: impl std::fmt::Display, e: object_store::Error) -> Error {
    let hint = match &e {
        object_store::Error::NotFound { .. } => "",
        _ => {
            "; check AWS_ENDPOINT_URL, AWS_REGION and the credentials (AWS_ACCESS_KEY_ID, \
             AWS_SECRET_ACCESS_KEY)"
        }
    };
    Error::io(
        format!("{what}{hint}"),
        std::io::Error::other(e.to_string()),
    )
}

impl Bucket {
    pub fn open(name: &str) -> Result<Bucket, Error> {
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(name)
            .build()
            .map_err(|e| {
                Error::Usage(format!(
                    "object storage for bucket {name}: {e}; set AWS_REGION (and AWS_ENDPOINT_URL \
                     for a service other than AWS)"
                ))
            })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lsvfs-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the object storage client", e))?;
        Ok(Bucket {
            rt: Arc::new(rt),
            store: Arc::new(store),
            name: name.to_string(),
        })
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.name)
    }

    /// Whether an object exists at `key`.
    pub fn exists(&self, key: &str) -> Result<bool, Error> {
        match self.rt.block_on(self.store.head(&ObjectPath::from(key))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(failed(format!("looking up {}", self.url(key)), e)),
        }
    }

    /// Keys of the exports (`*.lsx`) directly under `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let p = prefix.trim_end_matches('/');
        let prefix_path = (!p.is_empty()).then(|| ObjectPath::from(p));
        let mut keys = self.rt.block_on(async {
            let mut out = Vec::new();
            let mut s = self.store.list(prefix_path.as_ref());
            while let Some(m) = s.next().await {
                let m = m.map_err(|e| failed(format!("listing {}", self.url(p)), e))?;
                let k = m.location.to_string();
                // Directly under the prefix: deeper ones are other chains.
                let rest = if p.is_empty() {
                    &k[..]
                } else {
                    k[p.len()..].trim_start_matches('/')
                };
                if k.ends_with(".lsx") && !rest.contains('/') {
                    out.push(k);
                }
            }
            Ok::<_, Error>(out)
        })?;
        keys.sort();
        Ok(keys)
    }

    /// The first bytes of an object (its header).
    pub fn head_bytes(&self, key: &str) -> Result<Vec<u8>, Error> {
        let path = ObjectPath::from(key);
        self.rt.block_on(async {
            let size = self
                .store
                .head(&path)
                .await
                .map_err(|e| failed(format!("reading {}", self.url(key)), e))?
                .size;
            let b = self
                .store
                .get_range(&path, 0..size.min(HEADER_READ))
                .await
                .map_err(|e| failed(format!("reading {}", self.url(key)), e))?;
            Ok(b.to_vec())
        })
    }

    /// A reader of the whole object.
    pub fn reader(&self, key: &str) -> Result<ObjectReader, Error> {
        let got = self
            .rt
            .block_on(self.store.get(&ObjectPath::from(key)))
            .map_err(|e| failed(format!("reading {}", self.url(key)), e))?;
        Ok(ObjectReader {
            rt: self.rt.clone(),
            stream: got.into_stream(),
            buf: bytes::Bytes::new(),
        })
    }

    /// A multipart upload to `key`; the object appears at `finish`.
    pub fn writer(&self, key: &str) -> Result<ObjectWriter, Error> {
        let upload = self
            .rt
            .block_on(self.store.put_multipart(&ObjectPath::from(key)))
            .map_err(|e| failed(format!("starting the upload of {}", self.url(key)), e))?;
        Ok(ObjectWriter {
            rt: self.rt.clone(),
            w: Some(WriteMultipart::new_with_chunk_size(upload, PART)),
            url: self.url(key),
        })
    }
}

/// Reads an object as it downloads.
pub struct ObjectReader {
    rt: Arc<tokio::runtime::Runtime>,
    stream: futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
    buf: bytes::Bytes,
}

impl Read for ObjectReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        // An empty piece is not the end: only the stream's end is.
        while self.buf.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

/// Uploads what is written in parts, a few at once.
pub struct ObjectWriter {
    rt: Arc<tokio::runtime::Runtime>,
    w: Option<WriteMultipart>,
    url: String,
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let w = self
            .w
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the upload has ended"))?;
        let _in_runtime = self.rt.enter();
        self.rt
            .block_on(w.wait_for_capacity(PARTS_IN_FLIGHT))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        w.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter {
    /// Completes the upload: only now does the object exist.
    pub fn finish(mut self) -> Result<(), Error> {
        let w = self
            .w
            .take()
            .ok_or_else(|| Error::Usage("upload ended".into()))?;
        let _in_runtime = self.rt.enter();
        self.rt
            .block_on(w.finish())
            .map(|_| ())
            .map_err(|e| failed(format!("completing the upload of {}", self.url), e))
    }

    /// Abandons the upload (its parts are deleted).
    pub fn abort(mut self) {
        if let Some(w) = self.w.take() {
            let _in_runtime = self.rt.enter();
            let _ = self.rt.block_on(w.abort());
        }
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(w) = self.w.take() {
            let _in_runtime = self.rt.enter();
            let _ = self.rt.block_on(w.abort());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_name_objects() {
        let u = S3Url::parse("s3://b/backups/").unwrap().unwrap();
        assert_eq!((u.bucket.as_str(), u.key.as_str()), ("b", "backups/"));
        assert!(!u.is_object());
        assert_eq!(u.object_for("mon").to_string(), "s3://b/backups/mon.lsx");
        let o = S3Url::parse("s3://b/x/mon.lsx").unwrap().unwrap();
        assert!(o.is_object());
        assert_eq!(o.object_for("tue"), o);
        let root = S3Url::parse("s3://b").unwrap().unwrap();
        assert_eq!(root.object_for("a").to_string(), "s3://b/a.lsx");
        assert!(S3Url::parse("/tmp/x").is_none());
        assert!(S3Url::parse("s3:///k").unwrap().is_err());
        assert!(S3Url::parse("s3://b//k").unwrap().is_err());
    }
}
