//! TLS for the listeners: the server's identity from PEM files, and the handshake that turns an
//! accepted TCP connection into a TLS one.
//!
//! rustls with the ring provider: no OpenSSL, and the same code path for HTTP and gRPC.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Why the TLS identity cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{key} {}: {source}", path.display())]
    Read {
        /// The configuration key that names it.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("certificate_file {}: no PEM certificate in it ({source})", .path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The key file holds no PEM private key.
    #[error("private_key_file {}: no PEM private key in it ({source})", .path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the pair (the key does not match, or a kind it does not support).
    #[error("certificate_file and private_key_file: {0}")]
    Identity(#[from] rustls::Error),
    /// The key does not belong to the certificate, or is of a kind rustls cannot use.
    #[error(
        "private_key_file {} does not belong to certificate_file {}, or is not a key TLS can \
         use here ({source})",
        key.display(),
        cert.display()
    )]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The key is RSA of a size refused for TLS (below 2048 bits, or past 8192).
    #[error(
        "private_key_file {}: an RSA key of {bits} bits; TLS here takes 2048 to 8192 bits \
         (make a new pair with `openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem \
         -out cert.pem`)",
        .path.display()
    )]
    RsaKeySize {
        /// The file.
        path: PathBuf,
        /// The modulus's size.
        bits: usize,
    },
    /// The gRPC listeners' TLS could not be set up.
    #[error("gRPC TLS: {0}")]
    Grpc(String),
}

/// The server's certificate chain and key, read once at start.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The chain, PEM text as read (gRPC's TLS takes it this way).
    pub cert_pem: Vec<u8>,
    /// The key, PEM text as read.
    pub key_pem: Vec<u8>,
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl Identity {
    /// Reads and checks `certificate_file` and `private_key_file`.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let read = |key, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                key,
                path: path.to_path_buf(),
                source,
            })
        };
        let (cert_pem, key_pem) = (
            read("certificate_file", cert_file)?,
            read("private_key_file", key_file)?,
        );
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .and_then(|c| {
                if c.is_empty() {
                    Err(rustls::pki_types::pem::Error::NoItemsFound)
                } else {
                    Ok(c)
                }
            })
            .map_err(|source| TlsError::NoCertificate {
                path: cert_file.to_path_buf(),
                source,
            })?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::NoKey {
            path: key_file.to_path_buf(),
            source,
        })?;
        let identity = Identity {
            cert_pem,
            key_pem,
            certs,
            key: Arc::new(key),
        };
        // Fails here, at start, when the key does not belong to the certificate.
        if let Err(e) = identity.server_config(&[]) {
            // rustls says only that it cannot parse a key that is too small: say what is wrong.
            return Err(match rsa_bits(&identity.key) {
                Some(bits) if !(2048..=8192).contains(&bits) => TlsError::RsaKeySize {
                    path: key_file.to_path_buf(),
                    bits,
                },
                _ => match e {
                    TlsError::Identity(source) => TlsError::Mismatch {
                        cert: cert_file.to_path_buf(),
                        key: key_file.to_path_buf(),
                        source,
                    },
                    other => other,
                },
            });
        }
        Ok(identity)
    }

    /// A rustls server configuration offering `alpn` protocols.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The acceptor for an HTTP/1.1 listener.
    pub fn http_acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        Ok(TlsAcceptor::from(self.server_config(&[b"http/1.1"])?))
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Runs the TLS handshake on an accepted connection within `timeout`. A client that speaks
/// plain HTTP to the TLS port is told so in JSON and closed; any other failure just closes.
pub async fn accept(
    acceptor: &TlsAcceptor,
    mut tcp: TcpStream,
    timeout: Duration,
) -> Option<TlsStream<TcpStream>> {
    let handshake = async {
        let mut first = [0u8; 1];
        let n = tcp.peek(&mut first).await.ok()?;
        if n == 1 && first[0] != TLS_HANDSHAKE_RECORD && first[0].is_ascii_alphabetic() {
            // The client learns what to fix instead of reading a TLS alert as garbage.
            crate::listener::answer_and_close(
                &mut tcp,
                "400 Bad Request",
                "BadRequestException",
                "this port speaks TLS: use https://",
            )
            .await;
            return None;
        }
        match acceptor.accept(tcp).await {
            Ok(tls) => Some(tls),
            Err(e) => {
                tracing::debug!("TLS handshake failed: {e}");
                None
            }
        }
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .ok()
        .flatten()
}

/// The modulus size of an RSA key, read from its DER without checking the key.
fn rsa_bits(key: &PrivateKeyDer<'_>) -> Option<usize> {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const OCTET_STRING: u8 = 0x04;
    // rsaEncryption, 1.2.840.113549.1.1.1, as an encoded OBJECT IDENTIFIER.
    const RSA_OID: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    let pkcs1 = match key {
        PrivateKeyDer::Pkcs1(k) => k.secret_pkcs1_der(),
        // PrivateKeyInfo: version, algorithm, then the PKCS#1 key in an OCTET STRING.
        PrivateKeyDer::Pkcs8(k) => {
            let (info, _) = der_take(k.secret_pkcs8_der(), SEQUENCE)?;
            let (_, rest) = der_take(info, INTEGER)?;
            let (algorithm, rest) = der_take(rest, SEQUENCE)?;
            if !algorithm.starts_with(RSA_OID) {
                return None;
            }
            der_take(rest, OCTET_STRING)?.0
        }
        _ => return None,
    };
    // RSAPrivateKey: version, then the modulus.
    let (fields, _) = der_take(pkcs1, SEQUENCE)?;
    let (_, rest) = der_take(fields, INTEGER)?;
    let (n, _) = der_take(rest, INTEGER)?;
    // A leading zero byte only keeps the integer positive.
    let n = n.strip_prefix(&[0]).unwrap_or(n);
    let top = *n.first()?;
    Some(n.len() * 8 - top.leading_zeros() as usize)
}

/// Splits one DER element of type `tag` off `der`: (its content, what follows it).
fn der_take(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = der.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |n, &b| (n << 8) | b as usize);
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_are_not_pem_are_named() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, "not a certificate").expect("write");
        std::fs::write(&key, "not a key").expect("write");
        let e = Identity::load(&cert, &key)
            .expect_err("not PEM")
            .to_string();
        assert!(e.starts_with("certificate_file"), "{e}");
        assert!(e.contains("cert.pem"), "{e}");
        let e = Identity::load(&dir.join("missing.pem"), &key)
            .expect_err("missing")
            .to_string();
        assert!(
            e.starts_with("certificate_file ") && e.contains("missing.pem"),
            "{e}"
        );
    }

    #[test]
    fn a_small_rsa_key_is_named_as_such() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        for (bits, traditional) in [(1024, true), (1024, false), (2048, false)] {
            // openssl writes PKCS#8 by default, PKCS#1 with -traditional.
            let run = |args: &[&str]| {
                let out = std::process::Command::new("openssl")
                    .args(args)
                    .output()
                    .expect("openssl");
                assert!(out.status.success(), "{args:?}");
            };
            let (c, k) = (cert.to_str().expect("path"), key.to_str().expect("path"));
            let size = bits.to_string();
            let mut genrsa = vec!["genrsa", "-out", k];
            if traditional {
                genrsa.push("-traditional");
            }
            genrsa.push(&size);
            run(&genrsa);
            run(&[
                "req",
                "-x509",
                "-new",
                "-key",
                k,
                "-out",
                c,
                "-subj",
                "/CN=localhost",
                "-days",
                "1",
            ]);
            match Identity::load(&cert, &key) {
                Ok(_) => assert_eq!(bits, 2048),
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        bits == 1024
                            && e.contains("an RSA key of 1024 bits")
                            && e.contains("k.pem"),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_key_must_match_its_certificate() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let other = rcgen::KeyPair::generate().expect("key");
        let (cert, key, wrong) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("w.pem"));
        std::fs::write(&cert, made.cert.pem()).expect("write");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write");
        std::fs::write(&wrong, other.serialize_pem()).expect("write");
        assert!(Identity::load(&cert, &key).is_ok());
        let e = Identity::load(&cert, &wrong)
            .expect_err("mismatch")
            .to_string();
        assert!(
            e.starts_with(&format!(
                "private_key_file {} does not belong to certificate_file {}",
                wrong.display(),
                cert.display()
            )),
            "{e}"
        );
        let e = Identity::load(&key, &key)
            .expect_err("a key is no certificate")
            .to_string();
        assert!(e.starts_with("certificate_file"), "{e}");
    }
}
