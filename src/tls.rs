//! TLS with rustls (the `ring` provider), the sans-IO way: ciphertext in, plaintext out,
//! and the reverse, so the same code serves the blocking client, the reactor's server and
//! its hosted clients.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::protocol::error::{Error, TlsError};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An [`Error::Tls`] keeping `e` as its source.
fn tls_error(context: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Tls(TlsError::new(context, e))
}

/// How a client checks the server's certificate (the seed's `:verify` and `:ca-path`).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Verify {
    /// Against the operating system's roots.
    #[default]
    SystemRoots,
    /// Against the certificates in a PEM file (the seed's `:ca-path`).
    CaFile(PathBuf),
    /// Against a caller-built root store.
    Roots(Arc<RootCertStore>),
    /// Not at all (the seed's `:verify nil`). Anyone on the path can read and change the
    /// traffic; only for tests against throwaway certificates.
    DangerouslyDisabled,
}

/// A rustls client configuration for `verify`.
pub fn client_config(verify: &Verify) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("TLS versions", e))?;
    let roots = match verify {
        Verify::SystemRoots => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(Error::Tls(TlsError::msg(
                    "no system root certificates found",
                )));
            }
            roots
        }
        Verify::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| tls_error(&path.display().to_string(), e))?
            {
                roots
                    .add(cert.map_err(|e| tls_error(&path.display().to_string(), e))?)
                    .map_err(|e| tls_error(&path.display().to_string(), e))?;
            }
            roots
        }
        Verify::Roots(roots) => (**roots).clone(),
        Verify::DangerouslyDisabled => {
            let config = builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
                .with_no_client_auth();
            return Ok(Arc::new(config));
        }
    };
    Ok(Arc::new(
        builder.with_root_certificates(roots).with_no_client_auth(),
    ))
}

/// A rustls server configuration from a PEM certificate chain and a PEM private key.
pub fn server_config_from_pem(
    cert_chain: impl AsRef<Path>,
    private_key: impl AsRef<Path>,
) -> Result<Arc<ServerConfig>, Error> {
    let (cert_path, key_path) = (cert_chain.as_ref(), private_key.as_ref());
    let certs = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| tls_error(&cert_path.display().to_string(), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(&cert_path.display().to_string(), e))?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| tls_error(&key_path.display().to_string(), e))?;
    server_config(certs, key)
}

/// A rustls server configuration from DER certificates and key.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, Error> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("TLS versions", e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_error("certificate", e))?;
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One connection's TLS state: feed it ciphertext, take plaintext; give it plaintext,
/// take ciphertext.
pub(crate) struct TlsStream {
    conn: rustls::Connection,
    /// Ciphertext waiting for the socket; `sent` bytes of it are written.
    out: Vec<u8>,
    sent: usize,
    /// The peer's close_notify arrived: nothing more will be read from it.
    peer_closed: bool,
}

impl TlsStream {
    /// The server side of a connection.
    pub fn server(config: Arc<ServerConfig>) -> Result<TlsStream, Error> {
        let conn = rustls::ServerConnection::new(config).map_err(|e| tls_error("TLS setup", e))?;
        Ok(TlsStream::new(conn.into()))
    }

    /// The client side, for `host` (server name indication and certificate check).
    pub fn client(config: Arc<ClientConfig>, host: &str) -> Result<TlsStream, Error> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| tls_error(host, e))?;
        let conn =
            rustls::ClientConnection::new(config, name).map_err(|e| tls_error("TLS setup", e))?;
        let mut tls = TlsStream::new(conn.into());
        tls.pump_out();
        Ok(tls)
    }

    fn new(mut conn: rustls::Connection) -> TlsStream {
        // Limits on queued output are the connection's (backpressure counts these bytes);
        // rustls's own 64 KiB cap would only turn large messages into short writes.
        conn.set_buffer_limit(None);
        TlsStream {
            conn,
            out: Vec::new(),
            sent: 0,
            peer_closed: false,
        }
    }

    /// Whether the peer's close_notify arrived: it can send nothing more (not even a
    /// WebSocket Close), so for the connection it is the end of its input.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    fn pump_out(&mut self) {
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut self.out).is_err() {
                break;
            }
        }
    }

    /// Decrypts `ciphertext`, appending the plaintext to `plain`. Handshake replies are
    /// queued as output. Input after the peer's close_notify is dropped.
    pub fn decrypt(&mut self, mut ciphertext: &[u8], plain: &mut Vec<u8>) -> Result<(), Error> {
        while !ciphertext.is_empty() {
            let taken = self.conn.read_tls(&mut ciphertext)?;
            let state = self.conn.process_new_packets();
            // Alerts for the peer go out even when processing failed.
            self.pump_out();
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    // The records before the bad one decrypted: their plaintext is the
                    // peer's (a last message, its Close) and goes before the error.
                    let mut chunk = [0u8; 4096];
                    while let Ok(n @ 1..) = self.conn.reader().read(&mut chunk) {
                        plain.extend_from_slice(&chunk[..n]);
                    }
                    return Err(tls_error("TLS", e));
                }
            };
            if state.plaintext_bytes_to_read() > 0 {
                let start = plain.len();
                plain.resize(start + state.plaintext_bytes_to_read(), 0);
                let n = self.conn.reader().read(&mut plain[start..]).unwrap_or(0);
                plain.truncate(start + n);
            }
            if state.peer_has_closed() {
                // After the peer's close_notify rustls takes nothing more: what follows
                // it is ignored (RFC 8446 §6.1), not waited on.
                self.peer_closed = true;
                break;
            }
            if taken == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Encrypts `plain` (buffered inside rustls until the handshake is done).
    pub fn encrypt(&mut self, plain: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(plain)?;
        self.pump_out();
        Ok(())
    }

    /// Queues a close_notify alert.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
        self.pump_out();
    }

    /// Ciphertext ready for the socket.
    pub fn output(&self) -> &[u8] {
        &self.out[self.sent..]
    }

    /// `n` bytes of [`TlsStream::output`] were written.
    pub fn consume(&mut self, n: usize) {
        self.sent += n;
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
    }

    /// All pending ciphertext as an owned buffer (completion backends).
    pub fn take_output(&mut self, spare: Vec<u8>) -> Option<Vec<u8>> {
        if self.output().is_empty() {
            return None;
        }
        let mut taken = std::mem::replace(&mut self.out, spare);
        self.out.clear();
        taken.drain(..self.sent);
        self.sent = 0;
        Some(taken)
    }
}
