//! TLS on both sides of the gateway: the per-install CA that signs a
//! certificate for each host a machine connects to (machines trust only
//! it), and the client config that verifies upstreams against the system's
//! roots plus any extra CA the operator names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// At most this many host certificates are kept; beyond it the cache
/// starts over (signing one costs about a millisecond).
const LEAF_CACHE: usize = 4096;

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Hangar");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

impl Ca {
    /// Loads the CA from `dir`, or makes one (key file mode 0600).
    pub fn load_or_create(dir: &Path) -> Result<Ca> {
        let (cert_path, key_path, name_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"), dir.join("ca-name"));
        if !key_path.exists() {
            let key = KeyPair::generate().context("generating the CA key")?;
            let name = format!("Hangar egress CA {}", hex::encode(rand::random::<[u8; 4]>()));
            let cert = ca_params(&name).self_signed(&key).context("signing the CA")?;
            // The key goes last: its presence marks a complete CA.
            crate::write_private(&name_path, name.as_bytes())?;
            crate::write_private(&cert_path, cert.pem().as_bytes())?;
            crate::write_private(&key_path, key.serialize_pem().as_bytes())?;
        }
        let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        let key = KeyPair::from_pem(&read(&key_path)?).context("parsing the CA key")?;
        let name = read(&name_path)?;
        Ok(Ca {
            // Leaves need only the CA's name and key; the certificate itself
            // is what machines trust.
            issuer: Issuer::new(ca_params(name.trim()), key),
            pem: read(&cert_path)?,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// A server config presenting a certificate for `host`, signed by the CA.
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>> {
        if let Some(c) = self.leaves.lock().expect("leaf cache").get(host) {
            return Ok(c.clone());
        }
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, host);
        params.subject_alt_names = vec![match host.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().context("host name for a certificate")?),
        }];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(90);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating a host key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a host certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).context("host key")?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .context("host certificate")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut leaves = self.leaves.lock().expect("leaf cache");
        if leaves.len() >= LEAF_CACHE {
            leaves.clear();
        }
        leaves.insert(host.to_owned(), config.clone());
        Ok(config)
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies upstreams against the system bundle (`SSL_CERT_FILE` or
/// Debian's) plus `extra_cas`.
pub fn client_config(extra_cas: &[PathBuf]) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
    let mut files = vec![(system, false)];
    files.extend(extra_cas.iter().map(|p| (p.clone(), true)));
    for (file, required) in files {
        match CertificateDer::pem_file_iter(&file) {
            Ok(certs) => {
                for cert in certs {
                    let cert = cert.with_context(|| format!("reading {}", file.display()))?;
                    // The system bundle may hold certificates rustls rejects;
                    // skip those rather than lose all roots.
                    if let Err(e) = roots.add(cert)
                        && required
                    {
                        anyhow::bail!("{}: {e}", file.display());
                    }
                }
            }
            Err(e) if required => anyhow::bail!("reading {}: {e}", file.display()),
            Err(e) => tracing::warn!("no system roots at {}: {e}", file.display()),
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
