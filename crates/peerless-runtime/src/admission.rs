//! A run's admission on disk: `peerless run init` (the run file with its id and public key, the
//! private admission key), `peerless admit` (a certificate, recorded in `admitted.toml`), and the
//! owner the local launcher plays. The certificate itself is [`peerless_core::admission`]'s.
//!
//! ```text
//! <run dir>/
//!   run.toml        the run's configuration with [admission] run_id, public_key (shareable)
//!   admission.key   the private admission key (libp2p protobuf encoding, mode 0600; the owner's)
//!   admitted.toml   every certificate signed: peer id, role, index, expiry
//! ```

use std::io::Read as _;
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use peerless_core::admission::{AdmissionKey, Certificate, Claims, MAX_PEERS, Role, RunId};
use serde::{Deserialize, Serialize};

use crate::config::{AdmissionSection, ConfigError, RunConfig};
use crate::node::transport;

/// What went wrong with a run's admission files.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The run file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Something else about a file or a value is wrong; the message names it.
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AdmissionError + '_ {
    move |source| AdmissionError::Io { path: path.to_owned(), source }
}

/// A run's owner: its id and private admission key.
#[derive(Debug)]
pub struct Owner {
    /// The run.
    pub run: RunId,
    key: AdmissionKey,
}

impl Owner {
    /// A new run: a random id and a fresh admission key.
    pub fn fresh() -> Result<(Owner, Keypair), AdmissionError> {
        let keypair = transport::generate_keypair();
        let mut id = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut id))
            .map_err(io(Path::new("/dev/urandom")))?;
        Ok((Owner { run: RunId(id), key: admission_key(&keypair)? }, keypair))
    }

    /// The `[admission]` section of its run file.
    pub fn section(&self) -> AdmissionSection {
        AdmissionSection { run_id: self.run.to_string(), public_key: self.key.public().to_string() }
    }

    /// A certificate for `peer` as member `index` in `role`, valid until unix time `expires`.
    pub fn certify(&self, peer: &PeerId, role: Role, index: u32, expires: u64) -> Certificate {
        let claims = Claims { run: self.run, peer_id: peer.to_bytes(), role, index, expires };
        Certificate::sign(claims, &self.key)
    }
}

/// The admission key of an ed25519 libp2p keypair.
fn admission_key(k: &Keypair) -> Result<AdmissionKey, AdmissionError> {
    let ed =
        k.clone().try_into_ed25519().map_err(|e| AdmissionError::Invalid(format!("not ed25519: {e}")))?;
    let seed: [u8; 32] = ed
        .secret()
        .as_ref()
        .try_into()
        .map_err(|_| AdmissionError::Invalid("ed25519 secret is not 32 bytes".into()))?;
    Ok(AdmissionKey::from_seed(seed))
}

/// A run's directory with its owner's key: what `peerless run init` writes and `peerless admit`
/// signs with.
#[derive(Debug)]
pub struct Run {
    /// The directory.
    pub dir: PathBuf,
    /// Its `run.toml`.
    pub config: RunConfig,
    /// Its owner.
    pub owner: Owner,
}

impl Run {
    /// Writes a new run into `dir` (created; its `run.toml` and `admission.key` must not
    /// exist): `cfg` with a fresh `[admission]`.
    pub fn init(dir: &Path, mut cfg: RunConfig) -> Result<Run, AdmissionError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (run_file, key_file) = (dir.join("run.toml"), dir.join("admission.key"));
        for f in [&run_file, &key_file] {
            if f.exists() {
                return Err(AdmissionError::Invalid(format!(
                    "{} exists; refusing to overwrite it",
                    f.display()
                )));
            }
        }
        let (owner, keypair) = Owner::fresh()?;
        cfg.admission = owner.section();
        cfg.validate()?;
        transport::write_new_keypair(&key_file, &keypair).map_err(io(&key_file))?;
        std::fs::write(&run_file, cfg.to_toml()).map_err(io(&run_file))?;
        Ok(Run { dir: dir.to_owned(), config: cfg, owner })
    }

    /// The run in `dir` (its `run.toml` and `admission.key`, which must belong together).
    pub fn open(dir: &Path) -> Result<Run, AdmissionError> {
        let run_file = dir.join("run.toml");
        let config = RunConfig::load(&run_file)?;
        let key_file = dir.join("admission.key");
        let keypair = transport::read_keypair(&key_file).map_err(io(&key_file))?;
        let key = admission_key(&keypair)?;
        let Some((run, public)) = config.admission.parsed()? else {
            return Err(AdmissionError::Invalid(format!(
                "{} has no [admission] section (make the run with `peerless run init`)",
                run_file.display()
            )));
        };
        if key.public() != public {
            return Err(AdmissionError::Invalid(format!(
                "{} is not the key of {} (admission.public_key differs)",
                key_file.display(),
                run_file.display()
            )));
        }
        Ok(Run { dir: dir.to_owned(), config, owner: Owner { run, key } })
    }

    /// Signs a certificate for `peer` as member `index`, or the next free index of its role
    /// (the PS: `cluster.nodes`), valid until unix time `expires`; records it in
    /// `admitted.toml`. Returns the record and the certificate's bytes.
    pub fn admit(
        &self,
        peer: &PeerId,
        role: Role,
        index: Option<u32>,
        expires: u64,
    ) -> Result<(Admitted, Vec<u8>), AdmissionError> {
        let list_file = self.dir.join("admitted.toml");
        let mut list = read_admitted(&list_file)?;
        let n = self.config.cluster.nodes;
        let index = match (index, role) {
            (Some(i), _) => i,
            (None, Role::Ps) => n,
            // Peers past the starting members join the running run.
            (None, Role::Peer) => next_free(&list.member, role, MAX_PEERS, &self.dir.join("run.toml"))?,
            (None, _) => next_free(&list.member, role, n, &self.dir.join("run.toml"))?,
        };
        let cert = self.owner.certify(peer, role, index, expires);
        let record = Admitted { peer_id: peer.to_string(), role: role.name().into(), index, expires };
        list.member.retain(|m| !(m.index == index && m.role == record.role));
        list.member.push(record.clone());
        let text = toml::to_string_pretty(&list).expect("invariant: the admitted list serializes");
        std::fs::write(&list_file, text).map_err(io(&list_file))?;
        Ok((record, cert.encode()))
    }
}

/// One certificate signed, as `admitted.toml` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admitted {
    /// The member's peer id.
    pub peer_id: String,
    /// `peer`, `worker` or `ps`.
    pub role: String,
    /// Its node index.
    pub index: u32,
    /// Unix seconds it expires at.
    pub expires: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AdmittedFile {
    member: Vec<Admitted>,
}

fn read_admitted(path: &Path) -> Result<AdmittedFile, AdmissionError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| {
            ConfigError::Parse { origin: path.display().to_string(), message: e.to_string() }.into()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AdmittedFile::default()),
        Err(e) => Err(io(path)(e)),
    }
}

/// The lowest index below `n` no member of `role` holds.
fn next_free(members: &[Admitted], role: Role, n: u32, run_file: &Path) -> Result<u32, AdmissionError> {
    (0..n).find(|i| !members.iter().any(|m| m.index == *i && m.role == role.name())).ok_or_else(|| {
        AdmissionError::Invalid(format!(
            "every {role} index below cluster.nodes = {n} ({}) is admitted; pass --index",
            run_file.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerless_core::admission::{Expected, verify};

    #[test]
    fn a_run_admits_its_members_at_the_next_free_index_and_their_certificates_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = RunConfig::default();
        cfg.cluster.nodes = 2;
        let owner = Run::init(tmp.path(), cfg).unwrap().owner;
        let run_file = tmp.path().join("run.toml");
        assert!(Run::init(tmp.path(), RunConfig::default()).unwrap_err().to_string().contains("refusing"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(tmp.path().join("admission.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (run, key) = RunConfig::load(&run_file).unwrap().admission.parsed().unwrap().unwrap();
        assert_eq!(run, owner.run);
        let ids: Vec<PeerId> = (0..3).map(|_| transport::generate_keypair().public().to_peer_id()).collect();
        let r = Run::open(tmp.path()).unwrap();
        let (a, _) = r.admit(&ids[0], Role::Peer, None, 100).unwrap();
        let (b, cert) = r.admit(&ids[1], Role::Peer, None, 100).unwrap();
        assert_eq!((a.index, b.index), (0, 1));
        let (joiner, _) = r.admit(&ids[2], Role::Peer, None, 100).unwrap();
        assert_eq!(joiner.index, 2, "a third peer joins the running run");
        // Workers stay below cluster.nodes.
        for id in &ids[..2] {
            r.admit(id, Role::Worker, None, 100).unwrap();
        }
        let err = r.admit(&ids[2], Role::Worker, None, 100).unwrap_err();
        assert!(err.to_string().contains("pass --index"), "{err}");
        let (ps, _) = r.admit(&ids[2], Role::Ps, None, 100).unwrap();
        assert_eq!(ps.index, 2, "the PS is after the workers");
        let ok = verify(
            Some(&cert),
            &ids[1].to_bytes(),
            &Expected { run, key: &key, roles: &[Role::Peer], now: 99 },
        );
        assert_eq!(ok.unwrap().claims.index, 1);
        let listed = std::fs::read_to_string(tmp.path().join("admitted.toml")).unwrap();
        assert_eq!(listed.matches("[[member]]").count(), 6, "{listed}");
        std::fs::write(tmp.path().join("admission.key"), b"x").unwrap();
        assert!(Run::open(tmp.path()).unwrap_err().to_string().contains("admission.key"));
    }

    #[test]
    fn a_key_of_another_run_is_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        Run::init(a.path(), RunConfig::default()).unwrap();
        Run::init(b.path(), RunConfig::default()).unwrap();
        std::fs::copy(b.path().join("admission.key"), a.path().join("admission.key")).unwrap();
        let err = Run::open(a.path()).unwrap_err();
        assert!(err.to_string().contains("is not the key of"), "{err}");
    }
}
