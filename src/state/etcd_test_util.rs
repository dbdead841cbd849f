//! A real etcd for tests: [`EtcdCluster`] starts one or more etcd members
//! on loopback (free ports, a temp data directory, optionally TLS with
//! client certificates from [`TlsFiles::generate`]), waits until they
//! serve, and kills them when dropped, also when the test panics.
//!
//! Unit tests use it directly; tests in `tests/` get it with the
//! `test-util` feature (`cargo test --features test-util`).
//!
//! [`require_etcd`] follows the house rule of `tests/common/prereq.rs`:
//! without etcd a test prints "skipping: …" and passes, except under
//! `CI=true` or `INTRAGATE_E2E=1`, where it fails.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::etcd_store::EtcdOptions;

/// The etcd binary (`INTRAGATE_ETCD` overrides).
pub const ETCD: &str = "/usr/bin/etcd";
/// How long members may take to serve.
const START_BOUND: Duration = Duration::from_secs(30);

fn etcd_binary() -> String {
    std::env::var("INTRAGATE_ETCD").unwrap_or_else(|_| ETCD.to_string())
}

/// Under `CI=true` or `INTRAGATE_E2E=1` a missing prerequisite fails.
fn strict() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("INTRAGATE_E2E").is_ok_and(|v| v == "1")
}

/// Why etcd cannot run here (`None`: it can).
pub fn etcd_missing() -> Option<String> {
    let bin = etcd_binary();
    match Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("{bin} --version failed ({s})")),
        Err(e) => Some(format!(
            "{bin} cannot be run ({e}); install etcd (apt-get install etcd-server)"
        )),
    }
}

/// True when an etcd test may run. Without etcd: a failure under
/// `CI=true` / `INTRAGATE_E2E=1`, otherwise "skipping: why" and false.
pub fn require_etcd() -> bool {
    match etcd_missing() {
        None => true,
        Some(why) if strict() => panic!("test prerequisite missing (CI/INTRAGATE_E2E set): {why}"),
        Some(why) => {
            eprintln!("skipping: {why}");
            false
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "intragate-etcd-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as
/// PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate (signed both others).
    pub ca: PathBuf,
    /// Server certificate (SAN 127.0.0.1, localhost).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// Client certificate (CN `intragate`).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A second CA, which signed nothing etcd trusts (for negative tests).
    pub other_ca: PathBuf,
}

impl TlsFiles {
    /// Generate the files in `dir`.
    pub fn generate(dir: &Path) -> Self {
        let ca_params = |cn: &str| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p
        };
        let key = || rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ca_key = key();
        let ca_cert = ca_params("intragate test CA").self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params("intragate test CA"), &ca_key);
        let other_key = key();
        let other_ca = ca_params("another CA").self_signed(&other_key).unwrap();

        let server_key = key();
        let mut sp =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        sp.distinguished_name
            .push(rcgen::DnType::CommonName, "etcd test server");
        sp.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            // etcd also dials itself (the gateway) with it.
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server = sp.signed_by(&server_key, &issuer).unwrap();

        let client_key = key();
        let mut cp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        cp.distinguished_name
            .push(rcgen::DnType::CommonName, "intragate");
        cp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = cp.signed_by(&client_key, &issuer).unwrap();

        let write = |name: &str, pem: String| {
            let p = dir.join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        Self {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server.pem()),
            server_key: write("server-key.pem", server_key.serialize_pem()),
            client_cert: write("client.pem", client.pem()),
            client_key: write("client-key.pem", client_key.serialize_pem()),
            other_ca: write("other-ca.pem", other_ca.pem()),
        }
    }
}

/// One etcd process.
#[derive(Debug)]
struct Member {
    name: String,
    client_url: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn spawn(&mut self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("etcd log {}: {e}", self.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(etcd_binary())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", etcd_binary()))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(status)) => Some(format!("etcd {} exited ({status})", self.name)),
            _ => None,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// etcd members on loopback, killed (and their data removed) on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
    tls: Option<TlsFiles>,
}

impl EtcdCluster {
    /// One plain member.
    pub async fn start() -> Result<Self, String> {
        Self::start_members(1, false).await
    }

    /// `n` plain members forming one cluster.
    pub async fn start_cluster(n: usize) -> Result<Self, String> {
        Self::start_members(n, false).await
    }

    /// One member serving clients over TLS and requiring a client
    /// certificate signed by the CA (`--client-cert-auth`); the files are
    /// generated in the cluster's directory ([`tls`](Self::tls)).
    pub async fn start_tls() -> Result<Self, String> {
        Self::start_members(1, true).await
    }

    async fn start_members(n: usize, tls: bool) -> Result<Self, String> {
        let mut last = String::new();
        // A port taken between probing and binding: try again.
        for _ in 0..3 {
            match Self::try_start(n, tls).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn try_start(n: usize, tls: bool) -> Result<Self, String> {
        let dir = temp_dir("data");
        // etcd reads its certificate files at every handshake: they live
        // as long as the cluster, in its directory.
        let tls = tls.then(|| {
            let d = dir.join("tls");
            std::fs::create_dir_all(&d).expect("tls dir");
            TlsFiles::generate(&d)
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let urls: Vec<(String, String)> = (0..n)
            .map(|_| {
                (
                    format!("{scheme}://127.0.0.1:{}", free_port()),
                    format!("http://127.0.0.1:{}", free_port()),
                )
            })
            .collect();
        let initial: Vec<String> = urls
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}={peer}"))
            .collect();
        let token = format!("intragate-test-{:x}", rand::random::<u64>());
        let mut members = Vec::new();
        for (i, (client, peer)) in urls.iter().enumerate() {
            let name = format!("m{i}");
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.join(&name).display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={peer}"),
                format!("--initial-advertise-peer-urls={peer}"),
                format!("--initial-cluster={}", initial.join(",")),
                format!("--initial-cluster-token={token}"),
                "--initial-cluster-state=new".to_string(),
                "--logger=zap".to_string(),
                "--log-outputs=stderr".to_string(),
            ];
            if let Some(t) = &tls {
                args.extend([
                    format!("--cert-file={}", t.server_cert.display()),
                    format!("--key-file={}", t.server_key.display()),
                    format!("--trusted-ca-file={}", t.ca.display()),
                    "--client-cert-auth".to_string(),
                ]);
            }
            members.push(Member {
                log: dir.join(format!("{name}.log")),
                name,
                client_url: client.clone(),
                args,
                child: None,
            });
        }
        let mut cluster = Self { members, dir, tls };
        for m in &mut cluster.members {
            m.spawn()?;
        }
        for i in 0..n {
            cluster.wait_serving(i).await?;
        }
        Ok(cluster)
    }

    /// Wait until member `i` answers with a leader known.
    async fn wait_serving(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + START_BOUND;
        let url = self.members[i].client_url.clone();
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Some(why) = self.members[i].exited() {
                return Err(format!("{why}:\n{}", self.members[i].log_tail()));
            }
            let probe = async {
                let mut c = Client::connect([url.as_str()], Some(self.probe_options()))
                    .await
                    .map_err(|e| e.to_string())?;
                let s = c.status().await.map_err(|e| e.to_string())?;
                if s.leader() == 0 {
                    return Err("no leader yet".to_string());
                }
                Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(2), probe).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(_) => last = "status timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "etcd {} at {url} did not serve within {START_BOUND:?} ({last}):\n{}",
            self.members[i].name,
            self.members[i].log_tail()
        ))
    }

    fn probe_options(&self) -> ConnectOptions {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        if let Some(t) = &self.tls {
            o = o.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(std::fs::read(&t.ca).unwrap()))
                    .identity(Identity::from_pem(
                        std::fs::read(&t.client_cert).unwrap(),
                        std::fs::read(&t.client_key).unwrap(),
                    )),
            );
        }
        o
    }

    /// An etcd client connected to every running member (TLS as
    /// configured).
    pub async fn client(&self) -> Client {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.clone())
            .collect();
        Client::connect(running, Some(self.probe_options()))
            .await
            .expect("etcd client")
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The TLS files (for [`start_tls`](Self::start_tls)).
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Store options for all members under `prefix` (with the CA and the
    /// client certificate when TLS is on), short timeouts.
    pub fn options(&self, prefix: &str) -> EtcdOptions {
        let mut o = EtcdOptions::new(self.endpoints(), prefix);
        o.connect_timeout = Duration::from_secs(2);
        o.request_timeout = Duration::from_secs(3);
        if let Some(t) = &self.tls {
            o.ca = Some(t.ca.clone());
            o.cert = Some(t.client_cert.clone());
            o.key = Some(t.client_key.clone());
        }
        o
    }

    /// Kill member `i` (SIGKILL), keeping its data.
    pub fn stop_member(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Start member `i` again on its data and ports, and wait until it
    /// serves.
    pub async fn restart_member(&mut self, i: usize) -> Result<(), String> {
        self.members[i].kill();
        // An existing data dir: the initial-cluster flags are ignored.
        self.members[i].spawn()?;
        self.wait_serving(i).await
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
