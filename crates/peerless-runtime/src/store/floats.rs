//! Float vectors as the store keeps them (little-endian `f32`), without a copy where the machine is little-endian.
//!
//! A vector's little-endian bytes are, on a little-endian machine, the memory it already lies
//! in: it goes to a socket from there and comes from one straight into a `Vec<f32>`. Every
//! round a node puts its parameters (0.94 MB for the MNIST MLP) and each function instance
//! reads them and sends a gradient back; encoding and decoding each of those copied it whole
//! once or twice more. On a big-endian machine the same functions convert.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

/// The little-endian bytes of `v`: its own memory on a little-endian machine.
pub(crate) fn le_bytes(v: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(v))
    } else {
        Cow::Owned(peerless_core::flat::to_le_bytes(v))
    }
}

/// `v`'s memory as bytes to read little-endian floats into; call [`from_le_in_place`] once
/// they are in.
pub(crate) fn bytes_mut(v: &mut [f32]) -> &mut [u8] {
    bytemuck::cast_slice_mut(v)
}

/// Turns floats read as little-endian bytes into `v`'s memory into the machine's floats (a
/// no-op on a little-endian machine).
pub(crate) fn from_le_in_place(v: &mut [f32]) {
    if cfg!(target_endian = "big") {
        v.iter_mut().for_each(|x| *x = f32::from_bits(x.to_bits().swap_bytes()));
    }
}

/// `v`'s little-endian bytes as [`Bytes`] that keep `v` alive: no copy on a little-endian
/// machine.
pub(crate) fn shared_le_bytes(v: Arc<Vec<f32>>) -> Bytes {
    if cfg!(target_endian = "little") {
        Bytes::from_owner(Shared(v))
    } else {
        Bytes::from(peerless_core::flat::to_le_bytes(&v))
    }
}

/// A shared vector seen as its bytes (only built on a little-endian machine).
struct Shared(Arc<Vec<f32>>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(self.0.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerless_core::flat::{from_le_bytes, to_le_bytes};

    fn sample() -> Vec<f32> {
        vec![1.5, -0.0, f32::MIN_POSITIVE, 3.0e38, -7.25, f32::from_bits(0x7fc0_0001)]
    }

    #[test]
    fn the_views_are_the_little_endian_encoding_bit_for_bit() {
        let v = sample();
        assert_eq!(&*le_bytes(&v), &to_le_bytes(&v)[..]);
        assert_eq!(&shared_le_bytes(Arc::new(v.clone()))[..], &to_le_bytes(&v)[..]);
        let mut back = vec![0f32; v.len()];
        bytes_mut(&mut back).copy_from_slice(&to_le_bytes(&v));
        from_le_in_place(&mut back);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&from_le_bytes(&to_le_bytes(&v)).unwrap()));
    }

    #[test]
    fn shared_bytes_keep_the_vector_and_let_it_go_when_dropped() {
        let v = Arc::new(sample());
        let b = shared_le_bytes(Arc::clone(&v));
        let copy = b.clone();
        drop(b);
        assert_eq!(Arc::strong_count(&v), 2, "a clone of the bytes still holds the vector");
        drop(copy);
        assert_eq!(
            Arc::strong_count(&v),
            1,
            "the last bytes dropped, the vector is the caller's alone again"
        );
    }
}
