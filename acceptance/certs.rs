//! Test-only x509 credentials, made afresh in each test's directory: a CA,
//! certificates it signed for a server and a client, expired ones, and a
//! second CA that signed nothing of ours (for "wrong CA" cases). No private
//! key is ever committed.
//!
//! Certificates carry the usages qemu's and GnuTLS's checks insist on (CA:
//! basicConstraints and keyCertSign; server: serverAuth; client:
//! clientAuth). The server certificate names `localhost`, 127.0.0.1 and ::1.
//!
//! Besides single files, directories in the layout that qemu's
//! `tls-creds-x509,dir=` and libnbd's `tls-certificates=` read
//! (`ca-cert.pem`, `server-cert.pem`/`-key.pem`, `client-cert.pem`/`-key.pem`).

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// One certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything a TLS test needs, under `<dir>/pki`.
#[derive(Clone, Debug)]
pub struct Pki {
    /// The CA that signed `server`, `client` and the expired ones.
    pub ca: PathBuf,
    pub server: Pair,
    pub client: Pair,
    /// Signed by `ca`, but valid only in 2000 (the expired client
    /// certificate is in `expired_client_dir`).
    pub expired_server: Pair,
    /// A CA that signed `other_client` only.
    pub other_ca: PathBuf,
    pub other_client: Pair,
    /// `ca-cert.pem` alone: a client that verifies the server and has no
    /// certificate of its own (libnbd `tls-certificates=`, qemu client).
    pub client_dir: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    pub client_dir_with_cert: PathBuf,
    /// The other CA's `ca-cert.pem` (with our client certificate): verifying
    /// our server with it must fail.
    pub wrong_ca_dir: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`/`-key.pem` of the other CA: a client
    /// whose certificate our CA did not sign.
    pub foreign_client_dir: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`/`-key.pem` with the expired client
    /// certificate.
    pub expired_client_dir: PathBuf,
    /// Our `ca-cert.pem` with the other CA's client certificate: the client
    /// trusts our server, and only our server's check of the client can
    /// fail (qemu refuses to use such a pair before connecting; libnbd and
    /// rustls present it).
    pub untrusted_client_dir: PathBuf,
    /// The other CA's `ca-cert.pem` alone: a client that cannot verify our
    /// server and has no certificate a local check could reject first.
    pub other_ca_dir: PathBuf,
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`: a qemu-nbd or
    /// nbdkit server with the same credentials as ours.
    pub server_dir: PathBuf,
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

fn name(common: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        "flexnbd test suite (test-only key)",
    );
    dn.push(DnType::CommonName, common);
    dn
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn make_ca(common: &str) -> (Ca, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name = name(common);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-sign the CA");
    (Ca { params, key }, cert.pem())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Client,
}

fn issue(ca: &Ca, role: Role, expired: bool, dir: &Path, stem: &str) -> Pair {
    let sans: Vec<String> = match role {
        Role::Server => vec!["localhost".into()],
        Role::Client => vec![],
    };
    let mut params = CertificateParams::new(sans).expect("leaf params");
    params.distinguished_name = name(match role {
        Role::Server => "localhost",
        Role::Client => "flexnbd test client",
    });
    if role == Role::Server {
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    // GnuTLS (qemu) expects both for a key used in TLS key exchange.
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![match role {
        Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    let key = KeyPair::generate().expect("leaf key");
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).expect("sign the leaf");
    let pair = Pair {
        cert: dir.join(format!("{stem}-cert.pem")),
        key: dir.join(format!("{stem}-key.pem")),
    };
    write(&pair.cert, &cert.pem());
    write(&pair.key, &key.serialize_pem());
    pair
}

/// A directory holding `ca` as `ca-cert.pem` and `pair` under `role`'s
/// file names.
fn gnutls_dir(root: &Path, name: &str, ca: &Path, pair: Option<(&str, &Pair)>) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(&dir).expect("create a credentials directory");
    fs::copy(ca, dir.join("ca-cert.pem")).expect("copy the CA");
    if let Some((role, pair)) = pair {
        fs::copy(&pair.cert, dir.join(format!("{role}-cert.pem"))).expect("copy a certificate");
        fs::copy(&pair.key, dir.join(format!("{role}-key.pem"))).expect("copy a key");
    }
    dir
}

impl Pki {
    /// Makes every credential under `<dir>/pki`.
    pub fn new(dir: &Path) -> Pki {
        let root = dir.join("pki");
        fs::create_dir_all(&root).expect("create pki");
        let (ca, ca_pem) = make_ca("flexnbd test CA");
        let (other, other_pem) = make_ca("some other CA");
        let ca_path = root.join("ca-cert.pem");
        let other_ca = root.join("other-ca-cert.pem");
        write(&ca_path, &ca_pem);
        write(&other_ca, &other_pem);
        let server = issue(&ca, Role::Server, false, &root, "server");
        let client = issue(&ca, Role::Client, false, &root, "client");
        let expired_server = issue(&ca, Role::Server, true, &root, "expired-server");
        let expired_client = issue(&ca, Role::Client, true, &root, "expired-client");
        let other_client = issue(&other, Role::Client, false, &root, "other-client");
        Pki {
            client_dir: gnutls_dir(&root, "client", &ca_path, None),
            client_dir_with_cert: gnutls_dir(
                &root,
                "client-with-cert",
                &ca_path,
                Some(("client", &client)),
            ),
            wrong_ca_dir: gnutls_dir(&root, "wrong-ca", &other_ca, Some(("client", &client))),
            foreign_client_dir: gnutls_dir(
                &root,
                "foreign-client",
                &other_ca,
                Some(("client", &other_client)),
            ),
            expired_client_dir: gnutls_dir(
                &root,
                "expired-client",
                &ca_path,
                Some(("client", &expired_client)),
            ),
            untrusted_client_dir: gnutls_dir(
                &root,
                "untrusted-client",
                &ca_path,
                Some(("client", &other_client)),
            ),
            other_ca_dir: gnutls_dir(&root, "other-ca", &other_ca, None),
            server_dir: gnutls_dir(&root, "server", &ca_path, Some(("server", &server))),
            ca: ca_path,
            server,
            client,
            expired_server,
            other_ca,
            other_client,
        }
    }

    /// `serve`/`listen` arguments presenting `server` (TLS required).
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.server.cert.display().to_string(),
            "--tls-key".into(),
            self.server.key.display().to_string(),
        ]
    }

    /// `server_args` plus `--tls-ca` and `--tls-verify-peer`.
    pub fn verifying_server_args(&self) -> Vec<String> {
        let mut args = self.server_args();
        args.extend([
            "--tls-ca".into(),
            self.ca.display().to_string(),
            "--tls-verify-peer".into(),
        ]);
        args
    }

    /// `read`/`write`/`mirror` arguments verifying the server with `ca`.
    pub fn client_args(&self) -> Vec<String> {
        vec!["--tls-ca".into(), self.ca.display().to_string()]
    }

    /// `client_args` plus our client certificate.
    pub fn client_args_with_cert(&self) -> Vec<String> {
        let mut args = self.client_args();
        args.extend([
            "--tls-cert".into(),
            self.client.cert.display().to_string(),
            "--tls-key".into(),
            self.client.key.display().to_string(),
        ]);
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The credentials load where rustls will use them, and the expired
    /// ones really are expired (a test of the fixtures themselves).
    #[test]
    fn credentials_are_pem_and_the_expired_ones_ended_in_2001() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        for path in [&pki.ca, &pki.server.cert, &pki.client.cert] {
            let text = fs::read_to_string(path).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{text}");
        }
        let key = fs::read_to_string(&pki.server.key).unwrap();
        assert!(key.contains("PRIVATE KEY-----"), "{key}");
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-enddate", "-in"])
            .arg(&pki.expired_server.cert)
            .output();
        if let Ok(out) = out {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("2001"), "expired certificate ends {text}");
        }
        for dir in [&pki.client_dir, &pki.server_dir, &pki.client_dir_with_cert] {
            assert!(dir.join("ca-cert.pem").is_file(), "{}", dir.display());
        }
        assert!(pki.server_dir.join("server-key.pem").is_file());
        assert!(pki.client_dir_with_cert.join("client-key.pem").is_file());
    }
}
