//! The known datasets: names, file layout, pinned checksums, and loading a train/test split.
//!
//! MNIST and Fashion-MNIST live in `<data_dir>/mnist/` and `<data_dir>/fashion-mnist/` under
//! the standard file names, each raw or gzipped (`.gz`); a `data_dir` that holds one dataset's
//! four files directly (e.g. Debian's `/usr/share/datasets/fashion-mnist`) works too. `digits`
//! is compiled in. Every file
//! is verified against the SHA-256 of its *decompressed* IDX bytes, so a raw file and its
//! `.gz` verify the same.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::cache;
use super::dataset::{Dataset, Split};
use super::error::{DataError, Result};
use super::idx;

/// A dataset peerless knows how to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// 8×8 optical digits (UCI, via scikit-learn), 1,797 samples, embedded in the binary.
    Digits,
    /// MNIST handwritten digits, 28×28, 60k train / 10k test.
    Mnist,
    /// Zalando's Fashion-MNIST, 28×28, 60k train / 10k test.
    #[serde(alias = "fashion_mnist")]
    FashionMnist,
}

/// Which of a dataset's four files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileRole {
    /// Training images.
    TrainImages,
    /// Training labels.
    TrainLabels,
    /// Test images.
    TestImages,
    /// Test labels.
    TestLabels,
}

/// One file of a dataset: its standard name (without `.gz`) and pinned checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSpec {
    /// Which file this is.
    pub role: FileRole,
    /// Standard base name, e.g. `train-images-idx3-ubyte`.
    pub name: &'static str,
    /// SHA-256 of the decompressed IDX bytes, lowercase hex.
    pub sha256: &'static str,
}

const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

const fn specs(sha: [&'static str; 4]) -> [FileSpec; 4] {
    [
        FileSpec { role: FileRole::TrainImages, name: TRAIN_IMAGES, sha256: sha[0] },
        FileSpec { role: FileRole::TrainLabels, name: TRAIN_LABELS, sha256: sha[1] },
        FileSpec { role: FileRole::TestImages, name: TEST_IMAGES, sha256: sha[2] },
        FileSpec { role: FileRole::TestLabels, name: TEST_LABELS, sha256: sha[3] },
    ]
}

const DIGITS_FILES: [FileSpec; 4] = specs([
    "eaf17707f0d845100c830bc915a68a85ab9818144380bec6fa076cdb9dc6a056",
    "997d8237ea59870b42f811eaad3e13914b38ab6a9a5e9ad6affdff0f34e7cfdc",
    "07793d9a7050109fa7c6f4377563288ee4ca1a55c4d485a6eaaa89f430176e0b",
    "6ff66f7ef309c514bc431118f706c8249a50930d6256e9191340a2d710351535",
]);

const MNIST_FILES: [FileSpec; 4] = specs([
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
]);

const FASHION_MNIST_FILES: [FileSpec; 4] = specs([
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
]);

/// The embedded digits files (gzipped IDX), in [`FileRole`] order.
const DIGITS_BYTES: [&[u8]; 4] = [
    include_bytes!("../../data/digits/train-images-idx3-ubyte.gz"),
    include_bytes!("../../data/digits/train-labels-idx1-ubyte.gz"),
    include_bytes!("../../data/digits/t10k-images-idx3-ubyte.gz"),
    include_bytes!("../../data/digits/t10k-labels-idx1-ubyte.gz"),
];

impl DatasetName {
    /// Every dataset, in a fixed order.
    pub const ALL: [DatasetName; 3] = [DatasetName::Digits, DatasetName::Mnist, DatasetName::FashionMnist];

    /// The canonical name: `digits`, `mnist`, `fashion-mnist` (also its directory name).
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::Digits => "digits",
            DatasetName::Mnist => "mnist",
            DatasetName::FashionMnist => "fashion-mnist",
        }
    }

    /// The name people write: `digits`, `MNIST`, `Fashion-MNIST`.
    pub fn title(self) -> &'static str {
        match self {
            DatasetName::Digits => "digits",
            DatasetName::Mnist => "MNIST",
            DatasetName::FashionMnist => "Fashion-MNIST",
        }
    }

    /// Number of classes (10 for all three).
    pub fn classes(self) -> usize {
        10
    }

    /// Whether the files are compiled in (no fetch needed).
    pub fn is_embedded(self) -> bool {
        self == DatasetName::Digits
    }

    /// The four files with their pinned checksums.
    pub fn files(self) -> [FileSpec; 4] {
        match self {
            DatasetName::Digits => DIGITS_FILES,
            DatasetName::Mnist => MNIST_FILES,
            DatasetName::FashionMnist => FASHION_MNIST_FILES,
        }
    }

    /// Where this dataset's files live: `<data_dir>/<name>`.
    pub fn dir(self, data_dir: &Path) -> PathBuf {
        data_dir.join(self.as_str())
    }

    /// The command that puts this dataset into `data_dir`.
    pub fn fetch_command(self, data_dir: &Path) -> String {
        format!("peerless data fetch {self} --data-dir {}", data_dir.display())
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetName {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "digits" => Ok(DatasetName::Digits),
            "mnist" => Ok(DatasetName::Mnist),
            "fashion-mnist" | "fashion_mnist" => Ok(DatasetName::FashionMnist),
            _ => Err(DataError::UnknownDataset(s.to_owned())),
        }
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The file present in `dir` for `spec`: the raw name if it exists, else `<name>.gz`.
pub fn locate(dir: &Path, spec: &FileSpec) -> Option<PathBuf> {
    [dir.join(spec.name), dir.join(format!("{}.gz", spec.name))].into_iter().find(|p| p.is_file())
}

/// Read `path` (raw or gzip), check its decompressed bytes against `spec`, return them.
/// `fix` is what a checksum error tells the user to do.
pub fn read_verified(path: &Path, spec: &FileSpec, fix: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_owned(), source })?;
    let raw = idx::decompress_vec(bytes, &path.display().to_string())?;
    verify(raw, spec, path.to_owned(), fix)
}

fn verify(raw: Vec<u8>, spec: &FileSpec, path: PathBuf, fix: &str) -> Result<Vec<u8>> {
    let actual = sha256_hex(&raw);
    if actual != spec.sha256 {
        return Err(DataError::Checksum { path, expected: spec.sha256, actual, fix: fix.to_owned() });
    }
    Ok(raw)
}

/// The folder holding `name`'s files: `<data_dir>/<name>/` if it holds any of them, else
/// `data_dir` itself if it does; with every folder that was tried, for the error.
fn dataset_dir(name: DatasetName, data_dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let candidates = [name.dir(data_dir), data_dir.to_owned()];
    let holds_any = |dir: &Path| name.files().iter().any(|s| locate(dir, s).is_some());
    match candidates.iter().find(|d| holds_any(d)) {
        Some(dir) => (dir.clone(), vec![dir.clone()]),
        None => (candidates[0].clone(), candidates.to_vec()),
    }
}

/// A checksum error for a file that is another dataset's (the two 28×28 sets share file
/// names) says which one it is.
fn name_other_dataset(err: DataError, name: DatasetName, spec: &FileSpec) -> DataError {
    let DataError::Checksum { actual, .. } = &err else { return err };
    let other = DatasetName::ALL
        .into_iter()
        .find(|o| *o != name && o.files().iter().any(|f| f.role == spec.role && f.sha256 == *actual));
    match (other, err) {
        (Some(o), DataError::Checksum { path, expected, actual, .. }) => {
            let fix = format!("this is {}'s file, not {}'s: pass --dataset {o}", o.title(), name.title());
            DataError::Checksum { path, expected, actual, fix }
        }
        (_, err) => err,
    }
}

/// Load a dataset's train/test split.
///
/// `data_dir` is the root holding `mnist/` and `fashion-mnist/`; it is ignored for `digits`,
/// which is decompressed from the binary and held in memory. The others come from the raw
/// cache file in the dataset's folder (see `cache.rs`), built once from the IDX files, every
/// one verified against its pinned checksum, and read by every process of the machine.
pub fn load(name: DatasetName, data_dir: &Path) -> Result<Split> {
    if name.is_embedded() {
        return build(name, embedded()?);
    }
    let (dir, tried) = dataset_dir(name, data_dir);
    let located: Vec<Option<PathBuf>> = name.files().iter().map(|spec| locate(&dir, spec)).collect();
    let read = || read_sources(name, data_dir, &located, &tried);
    let Some(sources) = located.iter().cloned().collect::<Option<Vec<PathBuf>>>() else {
        // A file is missing: the error names the first problem, in file order.
        return build(name, read()?);
    };
    let identity = cache::identity(name, &sources)?;
    let split = cache::load(name, &dir, identity, || build(name, read()?))?;
    let norm = split.train.norm();
    tracing::debug!(dataset = %name, train = split.train.len(), test = split.test.len(), mean = norm.mean, inv_std = norm.inv_std, shared = split.train.is_shared(), "loaded dataset");
    Ok(split)
}

/// Verifies every file of `name` against its pinned checksum, reading the IDX files
/// themselves (not the cache file, which [`load`] does not re-hash).
pub fn verify_files(name: DatasetName, data_dir: &Path) -> Result<()> {
    if name.is_embedded() {
        return embedded().map(drop);
    }
    let (dir, tried) = dataset_dir(name, data_dir);
    let located: Vec<Option<PathBuf>> = name.files().iter().map(|spec| locate(&dir, spec)).collect();
    read_sources(name, data_dir, &located, &tried).map(drop)
}

/// The four files' decompressed bytes, each verified, with their paths; the first missing or
/// corrupt one, in file order, is the error.
fn read_sources(
    name: DatasetName,
    data_dir: &Path,
    located: &[Option<PathBuf>],
    tried: &[PathBuf],
) -> Result<Vec<(Vec<u8>, String)>> {
    let fix = format!("re-run: {}", name.fetch_command(data_dir));
    let mut raw = Vec::with_capacity(4);
    for (spec, path) in name.files().iter().zip(located) {
        let path = path.as_ref().ok_or_else(|| DataError::Missing {
            dataset: name,
            title: name.title(),
            tried: tried.to_vec(),
            data_dir: data_dir.to_owned(),
            file: spec.name,
        })?;
        let bytes = read_verified(path, spec, &fix).map_err(|e| name_other_dataset(e, name, spec))?;
        raw.push((bytes, path.display().to_string()));
    }
    Ok(raw)
}

/// The embedded digits files, decompressed and verified, with their origins.
fn embedded() -> Result<Vec<(Vec<u8>, String)>> {
    let fix = "rebuild peerless: its embedded digits files are damaged";
    let mut raw = Vec::with_capacity(4);
    for (spec, bytes) in DIGITS_FILES.iter().zip(DIGITS_BYTES) {
        let origin = format!("embedded digits/{}.gz", spec.name);
        let decoded = idx::decompress(bytes, &origin)?.into_owned();
        raw.push((verify(decoded, spec, PathBuf::from(&origin), fix)?, origin));
    }
    Ok(raw)
}

/// The split held in memory from the four files' decompressed bytes (in [`FileRole`] order),
/// standardized with the training set's statistics.
fn build(name: DatasetName, raw: Vec<(Vec<u8>, String)>) -> Result<Split> {
    let classes = name.classes();
    let part = |part: &str, (img, img_origin): &(Vec<u8>, String), (lab, lab_origin): &(Vec<u8>, String)| {
        let images = idx::images_view(img, img_origin)?;
        let labels = idx::parse_labels(lab, classes, lab_origin)?;
        Dataset::from_idx(format!("{name}/{part}"), images, labels, classes, img_origin, lab_origin)
    };
    let mut split = Split { train: part("train", &raw[0], &raw[1])?, test: part("test", &raw[2], &raw[3])? };
    let (mean, std) = split.standardize()?;
    tracing::debug!(dataset = %name, mean, std, "standardized");
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_display_and_serialize_as_kebab_case() {
        for n in DatasetName::ALL {
            assert_eq!(n.to_string().parse::<DatasetName>().unwrap(), n);
        }
        assert_eq!("fashion_mnist".parse::<DatasetName>().unwrap(), DatasetName::FashionMnist);
        assert_eq!("MNIST".parse::<DatasetName>().unwrap(), DatasetName::Mnist);
        assert!(matches!("cifar".parse::<DatasetName>(), Err(DataError::UnknownDataset(_))));
        #[derive(Deserialize)]
        struct W {
            d: DatasetName,
        }
        let w: W = serde_test_json(r#"fashion_mnist"#);
        assert_eq!(w.d, DatasetName::FashionMnist);
        let w: W = serde_test_json(r#"fashion-mnist"#);
        assert_eq!(w.d, DatasetName::FashionMnist);
    }

    /// Deserialize `{d: <value>}` through serde's value-deserializer (no JSON crate needed).
    fn serde_test_json<T: for<'de> Deserialize<'de>>(value: &str) -> T {
        use serde::de::IntoDeserializer;
        use serde::de::value::{Error, MapDeserializer};
        let map = MapDeserializer::<_, Error>::new(std::iter::once(("d", value)));
        T::deserialize(map.into_deserializer()).unwrap()
    }

    /// Training inputs have zero mean and unit variance after loading.
    fn assert_standardized(v: &[f32]) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 1e-3 && (var - 1.0).abs() < 1e-3, "mean {mean}, var {var}");
    }

    #[test]
    fn digits_loads_embedded_with_expected_sizes() {
        let split = load(DatasetName::Digits, Path::new("/nonexistent")).unwrap();
        let (train, test) = (&split.train, &split.test);
        assert_eq!(train.len() + test.len(), 1797);
        assert_eq!((train.len(), test.len()), (1442, 355));
        assert_eq!((train.features(), train.shape, train.classes), (64, [1, 8, 8], 10));
        assert_standardized(&train.range(0, train.len()).unwrap().x);
        // Stratified: every class is in both sets, at roughly 20% test.
        for (tr, te) in train.class_counts().into_iter().zip(test.class_counts()) {
            assert!(tr > 100 && te > 25, "{tr} {te}");
        }
    }

    /// The root holding real MNIST / Fashion-MNIST, from `PEERLESS_DATA_DIR` (CI sets it).
    fn data_dir_or_skip(test: &str) -> Option<PathBuf> {
        let dir = std::env::var_os("PEERLESS_DATA_DIR").map(PathBuf::from);
        if dir.is_none() {
            eprintln!("skipping {test}: PEERLESS_DATA_DIR is not set");
        }
        dir
    }

    fn check_real(name: DatasetName) {
        let Some(root) = data_dir_or_skip(name.as_str()) else { return };
        let start = std::time::Instant::now();
        let split = load(name, &root).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{name} loaded in {:?}", start.elapsed());
        let (train, test) = (&split.train, &split.test);
        assert_eq!((train.len(), test.len()), (60_000, 10_000));
        assert_eq!((train.shape, train.features(), train.classes), ([1, 28, 28], 784, 10));
        assert!(train.class_counts().iter().all(|&c| c > 5000));
        let all = train.range(0, train.len()).unwrap().x;
        assert_eq!(all.len(), 60_000 * 784);
        assert_standardized(&all);
        assert!(train.is_shared(), "read from the cache file");
        let again = load(name, &root).unwrap();
        assert!(again.train.is_shared() && again.train.norm() == train.norm());
        let raw = [&name.files()[0], &name.files()[2]].map(|spec| {
            let path = locate(&name.dir(&root), spec).or_else(|| locate(&root, spec)).unwrap();
            let bytes = read_verified(&path, spec, "").unwrap();
            idx::images_view(&bytes, "x").unwrap().pixels.to_vec()
        });
        assert_matches_old_form(&split, &raw[0], &raw[1]);
    }

    /// `split`'s batches equal, bit for bit, those of the float copy standardized at load that
    /// the u8 pixels replaced.
    fn assert_matches_old_form(split: &Split, train_px: &[u8], test_px: &[u8]) {
        use crate::data::dataset::tests::{bits, old_gather, old_standardized};
        let (old_train, old_test) = old_standardized(train_px, test_px);
        let f = split.train.features();
        let idx: Vec<usize> = (0..500).map(|i| (i * 7919) % split.train.len()).collect();
        let new = split.train.gather(&idx).unwrap();
        assert_eq!(bits(&new.x), bits(&old_gather(&old_train, f, &idx)));
        assert_eq!(bits(&split.test.range(0, split.test.len()).unwrap().x), bits(&old_test));
    }

    #[test]
    fn digits_batches_equal_the_old_standardized_float_batches_bit_for_bit() {
        let split = load(DatasetName::Digits, Path::new("/unused")).unwrap();
        let raw = embedded().unwrap();
        let px = |i: usize| idx::images_view(&raw[i].0, "x").unwrap().pixels.to_vec();
        assert_matches_old_form(&split, &px(0), &px(2));
    }

    #[test]
    fn mnist_loads_from_peerless_data_dir_when_present() {
        check_real(DatasetName::Mnist);
    }

    #[test]
    fn fashion_mnist_loads_from_peerless_data_dir_when_present() {
        check_real(DatasetName::FashionMnist);
    }

    #[test]
    fn corrupt_file_is_reported_with_the_fetch_command() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("mnist");
        std::fs::create_dir_all(&dir).unwrap();
        // A well-formed IDX file, but not the pinned one.
        let fake = idx::gzip(&idx::write_idx_images(1, 28, 28, &[0; 784]));
        std::fs::write(dir.join("train-images-idx3-ubyte.gz"), fake).unwrap();
        let err = load(DatasetName::Mnist, root.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::Checksum { .. }), "{msg}");
        assert!(msg.contains("train-images-idx3-ubyte.gz is corrupt"), "{msg}");
        assert!(
            msg.ends_with(&format!("re-run: peerless data fetch mnist --data-dir {}", root.path().display()))
        );
    }

    #[test]
    fn raw_and_gzip_copies_have_the_same_checksum() {
        let raw = idx::write_idx_labels(&[3, 1, 4]);
        let from_gz = idx::decompress(&idx::gzip(&raw), "x").unwrap().into_owned();
        assert_eq!(sha256_hex(&raw), sha256_hex(&from_gz));
    }

    #[test]
    fn missing_files_name_every_folder_tried_and_what_to_run() {
        let dir = Path::new("/x/y");
        let err = load(DatasetName::Mnist, dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MNIST not found: no train-images-idx3-ubyte[.gz] in /x/y/mnist or /x/y; \
             run: peerless data fetch mnist --data-dir /x/y"
        );
    }

    /// Writes `name`'s four files, as the embedded digits' IDX bytes under `name`'s file names.
    fn fake_dataset(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (spec, bytes) in DIGITS_FILES.iter().zip(DIGITS_BYTES) {
            std::fs::write(dir.join(format!("{}.gz", spec.name)), bytes).unwrap();
        }
    }

    #[test]
    fn a_folder_holding_the_files_directly_is_searched_after_the_dataset_folder() {
        let root = tempfile::tempdir().unwrap();
        fake_dataset(root.path());
        // Found directly in the folder: the digits bytes are not MNIST's, so the checksum
        // error names the files in `root` (not a "not found").
        let err = load(DatasetName::Mnist, root.path()).unwrap_err();
        let msg = err.to_string();
        let direct = root.path().join("train-images-idx3-ubyte.gz");
        assert!(msg.starts_with(&format!("{} is corrupt", direct.display())), "{msg}");
        assert!(msg.ends_with("this is digits's file, not MNIST's: pass --dataset digits"), "{msg}");
        // A `mnist/` folder, when complete, wins over files lying directly in the folder.
        fake_dataset(&root.path().join("mnist"));
        let msg = load(DatasetName::Mnist, root.path()).unwrap_err().to_string();
        assert!(msg.contains("/mnist/train-images-idx3-ubyte.gz is corrupt"), "{msg}");
    }
}
