//! Flat `f32` parameter/gradient vectors: their layout, arithmetic, bytes and digests.
//!
//! Parameters and gradients travel as one contiguous `Vec<f32>` plus a [`Layout`] that names
//! the tensors inside it. Everything here is deterministic: the same inputs in the same order
//! give bit-identical outputs on every machine.
//!
//! # Errors versus panics
//! Functions whose input can come from outside the process (another peer, a checkpoint) return
//! [`FlatError`]: [`Layout::check`], [`check_finite`], [`mean_of`], [`from_le_bytes`]. The pure
//! arithmetic helpers [`add_assign`], [`axpy`] and [`max_abs_diff`] `assert!` equal lengths,
//! because a mismatch there is a programmer error: check lengths at the boundary first.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// Errors about flat vectors that came from outside (a peer, a checkpoint, a payload).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlatError {
    /// A vector does not have the number of elements it should.
    #[error("{what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        /// What was being checked, e.g. `"gradient"`.
        what: String,
        /// The length required.
        expected: usize,
        /// The length found.
        got: usize,
    },
    /// A vector holds a NaN or an infinity.
    #[error("{what}: non-finite value {value} at index {index}")]
    NonFinite {
        /// What was being checked, e.g. `"gradient"`.
        what: String,
        /// Index of the first non-finite element.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// A byte buffer is not a whole number of little-endian `f32`s.
    #[error("byte length {len} is not a multiple of 4, so it is not a vector of little-endian f32")]
    BadBytes {
        /// The byte length found.
        len: usize,
    },
    /// An operation that needs at least one input got none.
    #[error("{what}: no inputs")]
    Empty {
        /// What was being computed, e.g. `"mean_of"`.
        what: String,
    },
}

/// One named tensor inside a flat vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutEntry {
    /// Parameter name, e.g. `"fc1.weight"`. Unique within a [`Layout`].
    pub name: String,
    /// Tensor shape; the entry holds the product of the dimensions elements (1 for `[]`).
    pub shape: Vec<usize>,
    /// Index of the entry's first element in the flat vector.
    pub offset: usize,
}

impl LayoutEntry {
    /// Number of elements: the product of the shape.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when some dimension is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Names, shapes and offsets of the tensors packed, in order and without gaps, into a flat
/// vector.
///
/// Serialized as its entries; deserializing re-checks that the offsets are the packed ones and
/// that names are unique, so a corrupt checkpoint cannot produce an inconsistent layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "LayoutRepr", try_from = "LayoutRepr")]
pub struct Layout {
    entries: Vec<LayoutEntry>,
    len: usize,
}

/// The serialized form of a [`Layout`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayoutRepr {
    entries: Vec<LayoutEntry>,
}

impl From<Layout> for LayoutRepr {
    fn from(l: Layout) -> Self {
        LayoutRepr { entries: l.entries }
    }
}

impl TryFrom<LayoutRepr> for Layout {
    type Error = String;

    fn try_from(r: LayoutRepr) -> Result<Self, String> {
        let layout = Layout::try_build(r.entries.iter().map(|e| (e.name.clone(), e.shape.clone())))?;
        for (got, want) in r.entries.iter().zip(&layout.entries) {
            if got.offset != want.offset {
                return Err(format!(
                    "layout entry {:?} has offset {}, but packing gives {}",
                    got.name, got.offset, want.offset
                ));
            }
        }
        Ok(layout)
    }
}

impl Layout {
    /// Packs the tensors in the given order, computing each offset.
    ///
    /// # Panics
    /// If a name repeats or the total element count overflows `usize`: both are bugs in the
    /// code describing the model, not input errors.
    pub fn new(entries: impl IntoIterator<Item = (String, Vec<usize>)>) -> Layout {
        match Layout::try_build(entries) {
            Ok(l) => l,
            Err(e) => panic!("invalid layout: {e}"),
        }
    }

    /// [`Layout::new`] for shapes that come from input (a model id, say): a repeated name or
    /// an element count that overflows `usize` is an error instead of a panic.
    pub fn try_new(entries: impl IntoIterator<Item = (String, Vec<usize>)>) -> Result<Layout, String> {
        Layout::try_build(entries)
    }

    fn try_build(entries: impl IntoIterator<Item = (String, Vec<usize>)>) -> Result<Layout, String> {
        let mut out: Vec<LayoutEntry> = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        let mut offset = 0usize;
        for (name, shape) in entries {
            if !names.insert(name.clone()) {
                return Err(format!("duplicate layout entry name {name:?}"));
            }
            let n = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| format!("layout entry {name:?} with shape {shape:?} overflows usize"))?;
            let next =
                offset.checked_add(n).ok_or_else(|| format!("layout overflows usize at entry {name:?}"))?;
            out.push(LayoutEntry { name, shape, offset });
            offset = next;
        }
        Ok(Layout { entries: out, len: offset })
    }

    /// Total number of elements in a flat vector with this layout.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the layout has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries, in packing order.
    pub fn entries(&self) -> &[LayoutEntry] {
        &self.entries
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&LayoutEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The elements of tensor `name` inside `flat`; `None` if there is no such tensor or `flat`
    /// is too short to hold it.
    pub fn slice<'a>(&self, name: &str, flat: &'a [f32]) -> Option<&'a [f32]> {
        let e = self.get(name)?;
        flat.get(e.offset..e.offset + e.len())
    }

    /// Checks that `flat` has exactly [`Layout::len`] elements.
    pub fn check(&self, flat: &[f32]) -> Result<(), FlatError> {
        if flat.len() == self.len {
            Ok(())
        } else {
            Err(FlatError::LengthMismatch {
                what: format!("flat vector for layout {}", self.fingerprint()),
                expected: self.len,
                got: flat.len(),
            })
        }
    }

    /// A short (16 hex chars), stable hash of the names and shapes in order. Two layouts with
    /// the same fingerprint pack the same tensors the same way; used to refuse a checkpoint or
    /// payload from a different model.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"peerless.layout.v1");
        h.update((self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            // Length-prefixed so that no two different layouts encode to the same bytes.
            h.update((e.name.len() as u64).to_le_bytes());
            h.update(e.name.as_bytes());
            h.update((e.shape.len() as u64).to_le_bytes());
            for &d in &e.shape {
                h.update((d as u64).to_le_bytes());
            }
        }
        let full = Digest(h.finalize().into());
        full.short()
    }
}

/// Checks that every element of `v` is finite; the error names `what`, the first offending
/// index and its value.
pub fn check_finite(what: &str, v: &[f32]) -> Result<(), FlatError> {
    // Branch-free scan per block so the common all-finite case vectorizes; locate the exact
    // index only once a block is known to be bad.
    const BLOCK: usize = 256;
    for (b, block) in v.chunks(BLOCK).enumerate() {
        // Non-finite means all exponent bits set: |bits| > f32::MAX's bits.
        let bad = block.iter().fold(0u32, |acc, x| acc | u32::from(x.to_bits() & 0x7fff_ffff > 0x7f7f_ffff));
        if bad != 0 {
            let i = block.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Err(FlatError::NonFinite {
                what: what.to_string(),
                index: b * BLOCK + i,
                value: block[i],
            });
        }
    }
    Ok(())
}

/// `dst += src`, element-wise.
///
/// # Panics
/// If the lengths differ (a programmer error; check lengths at the boundary).
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// `y += a * x`, element-wise.
///
/// # Panics
/// If the lengths differ (a programmer error; check lengths at the boundary).
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: length mismatch");
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * *xi;
    }
}

/// `v *= a`, element-wise.
pub fn scale(v: &mut [f32], a: f32) {
    for x in v {
        *x *= a;
    }
}

/// The element-wise mean of `inputs`, which must all have the same length.
///
/// Computed as a running mean in `f32`, in input order (`m += (x - m) * (1/k)` for the k-th
/// input), so the result is bit-reproducible for a given input order, the mean of n copies
/// of `v` is exactly `v`, and large values do not overflow. Non-finite inputs give
/// non-finite outputs; use [`check_finite`] first.
///
/// # Errors
/// [`FlatError::Empty`] for no inputs; [`FlatError::LengthMismatch`] naming the first input
/// whose length differs from the first input's.
pub fn mean_of(inputs: &[&[f32]]) -> Result<Vec<f32>, FlatError> {
    let Some((first, rest)) = inputs.split_first() else {
        return Err(FlatError::Empty { what: "mean_of".to_string() });
    };
    if let Some((i, x)) = rest.iter().enumerate().find(|(_, x)| x.len() != first.len()) {
        return Err(FlatError::LengthMismatch {
            what: format!("mean_of input {}", i + 1),
            expected: first.len(),
            got: x.len(),
        });
    }
    let mut m = first.to_vec();
    for (i, x) in rest.iter().enumerate() {
        // Multiply by 1/k rather than divide: division would make aggregation over many
        // inputs throughput-bound; exactness for equal inputs is kept since (x - m) is 0.
        let inv_k = 1.0 / (i + 2) as f32;
        for (mi, xi) in m.iter_mut().zip(x.iter()) {
            *mi += (*xi - *mi) * inv_k;
        }
    }
    Ok(m)
}

/// The Euclidean norm, accumulated in `f64` in index order.
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// The largest `|a[i] - b[i]|`; NaN if any difference is NaN (so a NaN never looks "close");
/// 0 for empty inputs.
///
/// # Panics
/// If the lengths differ (a programmer error; check lengths at the boundary).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "max_abs_diff: length mismatch");
    let mut m = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        if d.is_nan() {
            return f32::NAN;
        }
        m = m.max(d);
    }
    m
}

/// The little-endian bytes of `v`, 4 per element.
pub fn to_le_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    extend_le_bytes(&mut out, v);
    out
}

/// Appends the little-endian bytes of `v` to `out`: appended, not zeroed and then
/// overwritten, a third less time for the MLP's 0.94 MB.
pub fn extend_le_bytes(out: &mut Vec<u8>, v: &[f32]) {
    out.reserve(v.len() * 4);
    out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
}

/// Writes the little-endian bytes of `v` into the first `4 * v.len()` bytes of `out`.
///
/// Not inlined on purpose: on its own the loop compiles to vector moves, while inlined into
/// some callers (the hasher's update loop in [`digest`]) it was left a scalar 4-byte loop,
/// several times slower.
///
/// # Panics
/// If `out` holds fewer than `4 * v.len()` bytes.
#[inline(never)]
pub fn le_bytes_into(v: &[f32], out: &mut [u8]) {
    let (out, _) = out[..v.len() * 4].as_chunks_mut::<4>();
    for (o, x) in out.iter_mut().zip(v) {
        *o = x.to_le_bytes();
    }
}

/// Parses little-endian `f32`s; the inverse of [`to_le_bytes`], bit for bit (NaN payloads
/// included).
///
/// # Errors
/// [`FlatError::BadBytes`] if the length is not a multiple of 4.
pub fn from_le_bytes(bytes: &[u8]) -> Result<Vec<f32>, FlatError> {
    let mut v = Vec::new();
    from_le_bytes_into(bytes, &mut v)?;
    Ok(v)
}

/// [`from_le_bytes`] into `out` (cleared first), reusing its allocation.
///
/// # Errors
/// [`FlatError::BadBytes`] if the length is not a multiple of 4 (`out` is then unchanged).
pub fn from_le_bytes_into(bytes: &[u8], out: &mut Vec<f32>) -> Result<(), FlatError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(FlatError::BadBytes { len: bytes.len() });
    }
    out.clear();
    out.extend(bytes.as_chunks::<4>().0.iter().map(|c| f32::from_le_bytes(*c)));
    Ok(())
}

/// SHA-256 of the little-endian bytes of a flat vector (see [`digest`]).
///
/// Displays, serializes and parses as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

/// SHA-256 of `to_le_bytes(v)`, computed without materializing the whole byte vector.
pub fn digest(v: &[f32]) -> Digest {
    const CHUNK: usize = 1024;
    let mut h = Sha256::new();
    let mut buf = [0u8; CHUNK * 4];
    for chunk in v.chunks(CHUNK) {
        le_bytes_into(chunk, &mut buf);
        h.update(&buf[..chunk.len() * 4]);
    }
    Digest(h.finalize().into())
}

/// A fast 256-bit fingerprint of `v`'s bits: which parameters a gradient was computed at.
///
/// Every round each node tags its gradient with the parameters it computed at, and peers
/// group the round's gradients by that tag; SHA-256 of a megabyte of parameters was 17 % of a
/// serverful peer's CPU (perf, MNIST MLP). The tag only has to tell replicas apart, and a
/// sender states its own tag anyway, so a cryptographic hash buys nothing there: this one
/// mixes every 64-bit word into four independent lanes (xor, multiply, rotate), several times
/// faster. States, final models and checkpoints keep [`digest`] (SHA-256).
pub fn fingerprint(v: &[f32]) -> Digest {
    let mut f = Fingerprinter::new();
    f.update(v);
    f.finish()
}

/// [`fingerprint`] of `v` and [`check_finite`] of it (the same digest and error), in one pass
/// over memory: each piece is checked while the fingerprint has it in cache. A function
/// instance does both to every version of the parameters it reads.
pub fn fingerprint_finite(what: &str, v: &[f32]) -> (Digest, Result<(), FlatError>) {
    const PIECE: usize = 4096;
    let mut f = Fingerprinter::new();
    let mut finite = Ok(());
    for (k, piece) in v.chunks(PIECE).enumerate() {
        f.update(piece);
        if finite.is_ok() {
            finite = check_finite(what, piece).map_err(|e| match e {
                FlatError::NonFinite { what, index, value } => {
                    FlatError::NonFinite { what, index: k * PIECE + index, value }
                }
                other => other,
            });
        }
    }
    (f.finish(), finite)
}

/// [`fingerprint`] taken piece by piece: `update` with consecutive pieces of a vector, every
/// piece but the last a multiple of 8 long, then `finish`, gives the fingerprint of the whole
/// vector (so that it can be taken while each piece is still in cache, as an optimizer step
/// writes it).
#[derive(Debug, Clone)]
pub struct Fingerprinter {
    lanes: [u64; 4],
    n: u64,
}

impl Default for Fingerprinter {
    fn default() -> Self {
        Fingerprinter::new()
    }
}

impl Fingerprinter {
    const K: [u64; 4] =
        [0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0x85EB_CA77_C2B2_AE63];

    /// A fingerprint of nothing yet.
    pub fn new() -> Fingerprinter {
        Fingerprinter { lanes: Self::K, n: 0 }
    }

    /// Takes in the next piece.
    ///
    /// # Panics
    /// In debug builds, after a piece whose length was not a multiple of 8 (a programmer
    /// error: only the last piece may be).
    pub fn update(&mut self, v: &[f32]) {
        debug_assert!(self.n.is_multiple_of(8), "fingerprint: a piece followed one not a multiple of 8 long");
        let k = Self::K;
        let lanes = &mut self.lanes;
        let word = |p: &[f32]| u64::from(p[0].to_bits()) | (u64::from(p[1].to_bits()) << 32);
        let mut blocks = v.chunks_exact(8);
        for b in &mut blocks {
            for (l, lane) in lanes.iter_mut().enumerate() {
                *lane = ((*lane ^ word(&b[2 * l..2 * l + 2])).wrapping_mul(k[l] | 1)).rotate_left(29);
            }
        }
        for (i, x) in blocks.remainder().iter().enumerate() {
            let l = i % 4;
            lanes[l] = ((lanes[l] ^ u64::from(x.to_bits())).wrapping_mul(k[l] | 1)).rotate_left(29);
        }
        self.n += v.len() as u64;
    }

    /// The fingerprint of everything taken in.
    pub fn finish(self) -> Digest {
        let (lanes, n, k) = (self.lanes, self.n, Self::K);
        let mut out = [0u8; 32];
        for l in 0..4 {
            // Each output word depends on every lane and the length (SplitMix64's finalizer).
            let mut z = lanes[l]
                ^ lanes[(l + 1) % 4].rotate_left(17)
                ^ lanes[(l + 2) % 4].rotate_left(41)
                ^ lanes[(l + 3) % 4].rotate_left(7)
                ^ n.wrapping_mul(k[l]);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            out[8 * l..8 * l + 8].copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        Digest(out)
    }
}

impl Digest {
    /// The first 16 hex characters, for logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(16);
        s
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A string that is not 64 hex characters, given where a [`Digest`] was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SHA-256 digest (want 64 hex characters): {text:?}")]
pub struct ParseDigestError {
    /// The rejected text (truncated to 80 characters).
    pub text: String,
}

impl FromStr for Digest {
    type Err = ParseDigestError;

    /// Parses 64 hex characters (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDigestError { text: s.chars().take(80).collect() };
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(err());
        }
        let nibble = |c: u8| -> Option<u8> {
            match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            }
        };
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let (Some(hi), Some(lo)) = (nibble(pair[0]), nibble(pair[1])) else {
                return Err(err());
            };
            *o = hi << 4 | lo;
        }
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprint_finite_is_fingerprint_and_check_finite_in_one() {
        for len in [0usize, 5, 4096, 4097, 20_000] {
            let mut v: Vec<f32> = (0..len).map(|i| i as f32 * 0.25 - 7.0).collect();
            let (d, ok) = fingerprint_finite("parameters", &v);
            assert_eq!((d, ok), (fingerprint(&v), Ok(())), "{len} values");
            for (at, bad) in
                [(len / 2, f32::NAN), (len.saturating_sub(1), f32::INFINITY), (len / 3, f32::NEG_INFINITY)]
            {
                if len == 0 {
                    continue;
                }
                v[at] = bad;
                let (d, err) = fingerprint_finite("parameters", &v);
                assert_eq!(d, fingerprint(&v), "{len} values, {bad} at {at}");
                // Compared as text: NaN is not equal to itself.
                let want = check_finite("parameters", &v).unwrap_err().to_string();
                assert_eq!(err.unwrap_err().to_string(), want, "{len} values, {bad} at {at}");
            }
        }
    }

    #[test]
    fn a_fingerprint_taken_in_pieces_is_the_fingerprint_of_the_whole() {
        let v: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).cos()).collect();
        for piece in [8, 16, 64, 1000, 1003, 4096] {
            let mut f = super::Fingerprinter::new();
            v.chunks(piece).for_each(|p| f.update(p));
            assert_eq!(f.finish(), super::fingerprint(&v), "pieces of {piece}");
        }
        let mut f = super::Fingerprinter::new();
        f.update(&[]);
        assert_eq!(f.finish(), super::fingerprint(&[]));
    }

    #[test]
    fn fingerprints_tell_apart_any_one_changed_bit_length_or_order() {
        let v: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin()).collect();
        let base = super::fingerprint(&v);
        assert_eq!(base, super::fingerprint(&v.clone()), "deterministic");
        let mut seen = std::collections::HashSet::from([base]);
        for i in [0, 1, 7, 8, 500, 999, 1000, 1002] {
            for bit in [0, 13, 31] {
                let mut w = v.clone();
                w[i] = f32::from_bits(w[i].to_bits() ^ (1 << bit));
                assert!(seen.insert(super::fingerprint(&w)), "flipping bit {bit} of element {i} went unseen");
            }
        }
        let mut swapped = v.clone();
        swapped.swap(3, 4);
        assert!(seen.insert(super::fingerprint(&swapped)), "order");
        assert!(seen.insert(super::fingerprint(&v[..1002])), "length");
        assert!(seen.insert(super::fingerprint(&[0.0; 8])) && seen.insert(super::fingerprint(&[0.0; 9])));
        assert_ne!(super::fingerprint(&[0.0]), super::fingerprint(&[-0.0]), "bits, not values");
    }

    use super::*;
    use proptest::prelude::*;

    fn mlp_layout() -> Layout {
        Layout::new([
            ("fc1.weight".to_string(), vec![4, 3]),
            ("fc1.bias".to_string(), vec![4]),
            ("scale".to_string(), vec![]),
            ("fc2.weight".to_string(), vec![2, 4]),
        ])
    }

    #[test]
    fn layout_packs_entries_in_order_without_gaps() {
        let l = mlp_layout();
        let offsets: Vec<(usize, usize)> = l.entries().iter().map(|e| (e.offset, e.len())).collect();
        assert_eq!(offsets, [(0, 12), (12, 4), (16, 1), (17, 8)]);
        assert_eq!(l.len(), 25);
        assert!(!l.is_empty());
        assert!(Layout::new(Vec::new()).is_empty());
        assert_eq!(l.get("fc1.bias").map(|e| e.offset), Some(12));
        assert!(l.get("nope").is_none());

        let flat: Vec<f32> = (0..25).map(|i| i as f32).collect();
        assert_eq!(l.slice("fc1.bias", &flat), Some(&[12.0, 13.0, 14.0, 15.0][..]));
        assert_eq!(l.slice("scale", &flat), Some(&[16.0][..]));
        assert_eq!(l.slice("fc2.weight", &flat[..20]), None, "too-short vector gives None");
        assert_eq!(l.slice("nope", &flat), None);
    }

    #[test]
    fn layout_check_reports_expected_and_got() {
        let l = mlp_layout();
        assert!(l.check(&[0.0; 25]).is_ok());
        let err = l.check(&[0.0; 24]).unwrap_err();
        assert!(matches!(err, FlatError::LengthMismatch { expected: 25, got: 24, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("expected 25") && msg.contains("got 24"), "{msg}");
    }

    #[test]
    #[should_panic(expected = "duplicate layout entry name")]
    fn layout_rejects_duplicate_names() {
        Layout::new([("w".to_string(), vec![2]), ("w".to_string(), vec![3])]);
    }

    #[test]
    fn fingerprint_is_stable_and_depends_on_names_and_shapes() {
        let l = mlp_layout();
        let fp = l.fingerprint();
        assert_eq!(fp.len(), 16);
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(fp, mlp_layout().fingerprint());
        let renamed = Layout::new([("a".to_string(), vec![2, 3])]);
        let reshaped = Layout::new([("a".to_string(), vec![3, 2])]);
        let split = Layout::new([("a".to_string(), vec![2]), ("b".to_string(), vec![3])]);
        assert_ne!(renamed.fingerprint(), reshaped.fingerprint());
        assert_ne!(renamed.fingerprint(), split.fingerprint());
        assert_ne!(fp, renamed.fingerprint());
    }

    #[test]
    fn check_finite_names_the_first_bad_index() {
        assert!(check_finite("g", &[1.0, -2.0, 0.0]).is_ok());
        let mut v = vec![0.5f32; 1000];
        v[700] = f32::INFINITY;
        v[900] = f32::NAN;
        let err = check_finite("gradient", &v).unwrap_err();
        assert!(matches!(err, FlatError::NonFinite { index: 700, value, .. } if value == f32::INFINITY));
        assert_eq!(err.to_string(), "gradient: non-finite value inf at index 700");
        v[3] = f32::NAN;
        assert!(matches!(check_finite("g", &v), Err(FlatError::NonFinite { index: 3, .. })));
    }

    #[test]
    fn arithmetic_helpers_compute_elementwise() {
        let mut y = vec![1.0f32, 2.0, 3.0];
        add_assign(&mut y, &[0.5, 0.5, -1.0]);
        assert_eq!(y, [1.5, 2.5, 2.0]);
        axpy(2.0, &[1.0, -1.0, 0.25], &mut y);
        assert_eq!(y, [3.5, 0.5, 2.5]);
        scale(&mut y, 2.0);
        assert_eq!(y, [7.0, 1.0, 5.0]);
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(l2_norm(&[]), 0.0);
        assert_eq!(max_abs_diff(&[1.0, 2.0, 3.0], &[1.5, 0.0, 3.0]), 2.0);
        assert_eq!(max_abs_diff(&[], &[]), 0.0);
        assert!(max_abs_diff(&[1.0, f32::NAN, 0.0], &[1.0, 0.0, 9.0]).is_nan());
    }

    #[test]
    #[should_panic(expected = "axpy: length mismatch")]
    fn axpy_panics_on_length_mismatch() {
        axpy(1.0, &[1.0], &mut [1.0, 2.0]);
    }

    #[test]
    fn mean_of_is_elementwise_mean_and_order_fixed() {
        let a = [1.0f32, 2.0, -4.0];
        let b = [3.0f32, 2.0, 0.0];
        let c = [2.0f32, 5.0, 1.0];
        assert_eq!(mean_of(&[&a, &b, &c]).unwrap(), [2.0, 3.0, -1.0]);
        assert_eq!(mean_of(&[&a]).unwrap(), a);

        // Same order, same bits, run after run; inputs chosen so rounding actually happens.
        let xs: Vec<Vec<f32>> = (0..7)
            .map(|k| (0..257).map(|i| ((i * 31 + k * 17) % 101) as f32 * 0.013_7 - 0.6).collect())
            .collect();
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let m1 = mean_of(&refs).unwrap();
        let m2 = mean_of(&refs).unwrap();
        assert_eq!(to_le_bytes(&m1), to_le_bytes(&m2));
        for (i, m) in m1.iter().enumerate() {
            let exact = xs.iter().map(|x| f64::from(x[i])).sum::<f64>() / 7.0;
            assert!((f64::from(*m) - exact).abs() < 1e-6, "{i}: {m} vs {exact}");
        }
    }

    #[test]
    fn mean_of_rejects_no_inputs_and_ragged_inputs() {
        assert_eq!(mean_of(&[]).unwrap_err(), FlatError::Empty { what: "mean_of".into() });
        let err = mean_of(&[&[1.0, 2.0], &[1.0, 2.0], &[1.0]]).unwrap_err();
        assert_eq!(err, FlatError::LengthMismatch { what: "mean_of input 2".into(), expected: 2, got: 1 });
        assert_eq!(err.to_string(), "mean_of input 2: expected 2 elements, got 1");
        assert_eq!(mean_of(&[&[], &[]]).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn bytes_round_trip_and_bad_length_is_an_error() {
        let v = [0.0f32, 1.0, -2.5, 0.1, 1e30, -0.0];
        let b = to_le_bytes(&v);
        // Independently: python3 -c "import struct; print(struct.pack('<6f', 0,1,-2.5,0.1,1e30,-0.0).hex())"
        assert_eq!(hex(&b), "000000000000803f000020c0cdcccc3dcaf2497100000080");
        let back = from_le_bytes(&b).unwrap();
        assert_eq!(to_le_bytes(&back), b);
        for len in [1, 2, 3, 5, 23] {
            assert_eq!(from_le_bytes(&b[..len]).unwrap_err(), FlatError::BadBytes { len });
        }
        assert_eq!(from_le_bytes(&[]).unwrap(), Vec::<f32>::new());
        assert!(FlatError::BadBytes { len: 7 }.to_string().contains("7 is not a multiple of 4"));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn digest_matches_sha256_of_le_bytes() {
        // Independently computed with python hashlib over struct.pack('<6f', ...).
        let d = digest(&[0.0, 1.0, -2.5, 0.1, 1e30, -0.0]);
        assert_eq!(d.to_string(), "cac73c70cc368d8f5e562a011787ef8f7b1878616fd2ebfea827e6d8c98397fc");
        assert_eq!(d.short(), "cac73c70cc368d8f");
        assert_eq!(
            digest(&[]).to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // Longer than one internal chunk, with a partial last chunk:
        // hashlib.sha256(struct.pack('<3000f', *[i*0.5-700 for i in range(3000)])).hexdigest()
        let long: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5 - 700.0).collect();
        assert_eq!(
            digest(&long).to_string(),
            "5c52ddaaa3ea59cd09d6d1421ad97b082e70825e197192fb824fc810aa9d78ca"
        );
    }

    #[test]
    fn digest_parses_from_hex_and_rejects_garbage() {
        let d = digest(&[1.0, 2.0]);
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(d.to_string().to_uppercase().parse::<Digest>().unwrap(), d);
        assert!(format!("{d:?}").starts_with("Digest("));
        for bad in ["", "abc", &"g".repeat(64), &"0".repeat(63), &"0".repeat(65)] {
            let err = bad.parse::<Digest>().unwrap_err();
            assert!(err.to_string().contains("64 hex"), "{err}");
        }
    }

    #[test]
    fn digest_and_layout_serde_round_trip() {
        use serde::de::IntoDeserializer;
        use serde::de::value::{Error as DeError, StrDeserializer};

        let d = digest(&[3.0]);
        let text = d.to_string();
        let de: StrDeserializer<'_, DeError> = text.as_str().into_deserializer();
        assert_eq!(Digest::deserialize(de).unwrap(), d);
        let de: StrDeserializer<'_, DeError> = "zz".into_deserializer();
        assert!(Digest::deserialize(de).is_err());

        let l = mlp_layout();
        assert_eq!(Layout::try_from(LayoutRepr::from(l.clone())), Ok(l.clone()));
        let mut bad = LayoutRepr::from(l);
        bad.entries[2].offset += 1;
        let err = Layout::try_from(bad).unwrap_err();
        assert!(err.contains("\"scale\" has offset 17"), "{err}");
    }

    proptest! {
        #[test]
        fn bytes_round_trip_bit_for_bit(bits in proptest::collection::vec(any::<u32>(), 0..200)) {
            let v: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
            let back = from_le_bytes(&to_le_bytes(&v)).unwrap();
            let back_bits: Vec<u32> = back.iter().map(|x| x.to_bits()).collect();
            prop_assert_eq!(back_bits, bits);
        }

        #[test]
        fn mean_of_n_copies_is_the_vector(
            v in proptest::collection::vec(proptest::num::f32::NORMAL | proptest::num::f32::SUBNORMAL | proptest::num::f32::ZERO, 0..100),
            n in 1usize..20,
        ) {
            let inputs: Vec<&[f32]> = (0..n).map(|_| v.as_slice()).collect();
            prop_assert_eq!(mean_of(&inputs).unwrap(), v);
        }
    }
}
