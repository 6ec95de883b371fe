//! In-memory datasets: images as flat `f32` rows (standardized on load), labels as `u8`, and batches.

use super::error::{DataError, Result};
use super::idx::ImagesView;

/// A labelled image dataset held in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Name for logs ("mnist/train").
    pub name: String,
    /// `len() × features()` values, row-major: pixels scaled to `[0, 1]` by [`Dataset::from_idx`],
    /// then standardized by [`Split::standardize`] when loaded through [`super::load`].
    pub images: Vec<f32>,
    /// One label per image, each `< classes`.
    pub labels: Vec<u8>,
    /// Shape of one image: channels, height, width.
    pub shape: [usize; 3],
    /// Number of classes.
    pub classes: usize,
}

/// A batch gathered from a [`Dataset`]: `x` is `y.len() × features`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Inputs, `y.len() × (c·h·w)`.
    pub x: Vec<f32>,
    /// Labels.
    pub y: Vec<u8>,
    /// Shape of one input: channels, height, width.
    pub shape: [usize; 3],
}

impl Batch {
    /// Replaces each label y by `classes − 1 − y` (a label-flipping attacker's data, 9 − y on
    /// MNIST). Labels must be `< classes`, as every dataset's are.
    pub fn flip_labels(&mut self, classes: usize) {
        let top = classes.saturating_sub(1);
        for y in &mut self.y {
            *y = top.saturating_sub(usize::from(*y)) as u8;
        }
    }
}

/// A dataset's fixed train/test split.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Training set.
    pub train: Dataset,
    /// Held-out test set.
    pub test: Dataset,
}

impl Split {
    /// Standardizes inputs to zero mean and unit variance with the *training* set's pixel mean
    /// and standard deviation (applied to both parts, so no test information leaks). An MLP
    /// trained with SGD converges markedly faster on standardized inputs (Fashion-MNIST, 3
    /// epochs: 86.2 % on [0, 1] pixels). Returns the `(mean, std)` used.
    pub fn standardize(&mut self) -> (f32, f32) {
        let n = self.train.images.len().max(1) as f64;
        let mean = self.train.images.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = self.train.images.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
        let std = var.sqrt().max(1e-6);
        let (m, inv) = (mean as f32, (1.0 / std) as f32);
        for v in self.train.images.iter_mut().chain(self.test.images.iter_mut()) {
            *v = (*v - m) * inv;
        }
        (mean as f32, std as f32)
    }
}

impl Dataset {
    /// A single-channel dataset from parsed IDX images and labels, pixels divided by 255.
    /// `images_origin`/`labels_origin` name the files in errors.
    pub fn from_idx(
        name: impl Into<String>,
        images: ImagesView<'_>,
        labels: Vec<u8>,
        classes: usize,
        images_origin: &str,
        labels_origin: &str,
    ) -> Result<Dataset> {
        if images.count != labels.len() {
            return Err(DataError::CountMismatch {
                images_origin: images_origin.to_owned(),
                images: images.count,
                labels_origin: labels_origin.to_owned(),
                labels: labels.len(),
            });
        }
        if let Some(index) = labels.iter().position(|&l| usize::from(l) >= classes) {
            return Err(DataError::LabelOutOfRange {
                origin: labels_origin.to_owned(),
                index,
                label: labels[index],
                classes,
            });
        }
        Ok(Dataset {
            name: name.into(),
            images: u8_to_unit_f32(images.pixels),
            labels,
            shape: [1, images.rows, images.cols],
            classes,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per sample: `c · h · w`.
    pub fn features(&self) -> usize {
        self.shape.iter().product()
    }

    /// The `i`-th sample's inputs.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn image(&self, i: usize) -> &[f32] {
        let f = self.features();
        &self.images[i * f..(i + 1) * f]
    }

    /// The samples at `idx` (in that order, repeats allowed) as a batch.
    ///
    /// # Panics
    /// If an index is `>= len()`.
    pub fn gather(&self, idx: &[usize]) -> Batch {
        let f = self.features();
        let mut x = Vec::with_capacity(idx.len() * f);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            assert!(i < self.len(), "sample index {i} out of range for {} ({})", self.name, self.len());
            x.extend_from_slice(&self.images[i * f..(i + 1) * f]);
            y.push(self.labels[i]);
        }
        Batch { x, y, shape: self.shape }
    }

    /// A new dataset of the samples at `idx`, keeping name, shape and classes.
    ///
    /// # Panics
    /// If an index is `>= len()`.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let Batch { x, y, shape } = self.gather(idx);
        Dataset { name: self.name.clone(), images: x, labels: y, shape, classes: self.classes }
    }

    /// How many samples each class has.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            counts[usize::from(l)] += 1;
        }
        counts
    }
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Values per sample: `c · h · w`.
    pub fn features(&self) -> usize {
        self.shape.iter().product()
    }
}

/// `p / 255` for every byte: a tight loop the compiler vectorizes.
fn u8_to_unit_f32(pixels: &[u8]) -> Vec<f32> {
    pixels.iter().map(|&p| f32::from(p) / 255.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        let images = ImagesView { count: 3, rows: 1, cols: 2, pixels: &[0, 255, 51, 102, 1, 2] };
        Dataset::from_idx("tiny", images, vec![2, 0, 1], 3, "i", "l").unwrap()
    }

    #[test]
    fn pixels_are_scaled_to_unit_interval() {
        let d = tiny();
        assert_eq!((d.len(), d.features(), d.shape), (3, 2, [1, 1, 2]));
        assert_eq!(&d.images[..4], &[0.0, 1.0, 0.2, 0.4]);
        assert_eq!(d.class_counts(), vec![1, 1, 1]);
    }

    #[test]
    fn gather_and_subset_follow_the_index_order() {
        let d = tiny();
        let b = d.gather(&[2, 0, 2]);
        assert_eq!(b.y, vec![1, 2, 1]);
        assert_eq!(b.x.len(), 3 * 2);
        assert_eq!(&b.x[2..4], d.image(0));
        let s = d.subset(&[1]);
        assert_eq!((s.len(), s.labels[0], s.classes), (1, 0, 3));
        assert!(d.gather(&[]).is_empty());
    }

    #[test]
    fn count_mismatch_and_bad_labels_are_errors() {
        let images = ImagesView { count: 2, rows: 1, cols: 1, pixels: &[0, 0] };
        assert!(matches!(
            Dataset::from_idx("x", images, vec![0], 2, "i", "l"),
            Err(DataError::CountMismatch { images: 2, labels: 1, .. })
        ));
        assert!(matches!(
            Dataset::from_idx("x", images, vec![0, 2], 2, "i", "l"),
            Err(DataError::LabelOutOfRange { index: 1, .. })
        ));
    }
}
