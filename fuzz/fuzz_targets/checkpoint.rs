//! Checkpoints (`peerless_runtime::checkpoint`, safetensors with string metadata): files a
//! resumed run or a restarted PS loads.
//!
//! First byte: bit 7 picks the mode.
//! - Raw bytes: a checkpoint that loads is valid (finite parameters, optimizer buffers and
//!   wall time; buffers of the parameters' length; distinct buffer names), and saving it and
//!   loading that gives it back.
//! - A checkpoint built from the input: it loads back equal when valid, and is refused when
//!   not; then its bytes, overwritten in places by the rest of the input, take the raw check.
#![no_main]

use std::path::Path;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use peerless_core::optim::OptimizerState;
use peerless_runtime::checkpoint::Checkpoint;

fuzz_target!(
    init: {
        peerless_fuzz::seeds(|| {
            let ck = Checkpoint {
                model: "mlp-4-2-2".into(),
                layout: "3f2a".into(),
                round: 17,
                epoch: 2,
                params: vec![0.5, -1.25, 3.0],
                optimizer: OptimizerState {
                    kind: "adam".into(),
                    steps: 17,
                    buffers: vec![("exp_avg".into(), vec![0.1, 0.2, 0.3]), ("exp_avg_sq".into(), vec![0.0; 3])],
                },
                rng: [1, 2, u64::MAX, 4],
                wall_s: 12.5,
                error_feedback: Some(vec![0.0, 1e-3, -2.0]),
            };
            vec![("adam".into(), [&[0u8][..], &ck.to_bytes()].concat())]
        })
    },
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else { return };
        if mode & 0x80 == 0 {
            check_load(rest);
        } else {
            let mut u = Unstructured::new(rest);
            if let Ok(ck) = checkpoint(&mut u) {
                check_round_trip(&ck, &mut u);
            }
        }
    }
);

fn path() -> &'static Path {
    Path::new("fuzz.safetensors")
}

fn check_load(bytes: &[u8]) {
    match Checkpoint::from_bytes(bytes, path()) {
        Ok(ck) => {
            if let Some(problem) = problem(&ck) {
                panic!("loaded an invalid checkpoint ({problem}): {ck:?}");
            }
            let again = Checkpoint::from_bytes(&ck.to_bytes(), path())
                .unwrap_or_else(|e| panic!("a loaded checkpoint, saved again, does not load: {e}"));
            assert_eq!(again, ck);
        }
        Err(e) => assert!(e.to_string().contains("fuzz.safetensors"), "{e}"),
    }
}

fn check_round_trip(ck: &Checkpoint, u: &mut Unstructured) {
    let mut bytes = ck.to_bytes();
    match (Checkpoint::from_bytes(&bytes, path()), problem(ck)) {
        (Ok(back), None) => assert_eq!(&back, ck),
        (Err(e), None) => panic!("valid checkpoint refused ({e}): {ck:?}"),
        (Ok(_), Some(problem)) => panic!("invalid checkpoint accepted ({problem}): {ck:?}"),
        (Err(_), Some(_)) => {}
    }
    // Overwrite a few bytes (the header's JSON is where most of the checks are).
    for _ in 0..u.int_in_range(0..=8u8).unwrap_or(0) {
        let (Ok(at), Ok(byte)) = (u.arbitrary::<u16>(), u.arbitrary::<u8>()) else { break };
        let at = usize::from(at) % bytes.len();
        bytes[at] = byte;
    }
    check_load(&bytes);
}

/// What loading must refuse in `ck`, if anything.
fn problem(ck: &Checkpoint) -> Option<&'static str> {
    let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
    if !finite(&ck.params) {
        return Some("non-finite parameter");
    }
    if !(ck.wall_s.is_finite() && ck.wall_s >= 0.0) {
        return Some("wall time not a finite number of seconds");
    }
    if let Some(e) = &ck.error_feedback {
        if e.len() != ck.params.len() || !finite(e) {
            return Some("error feedback of the wrong length or not finite");
        }
    }
    let buffers = &ck.optimizer.buffers;
    for (i, (name, b)) in buffers.iter().enumerate() {
        if buffers[..i].iter().any(|(n, _)| n == name) {
            return Some("repeated buffer name");
        }
        if b.len() != ck.params.len() {
            return Some("buffer of the wrong length");
        }
        if !finite(b) {
            return Some("non-finite buffer");
        }
    }
    None
}

fn checkpoint(u: &mut Unstructured) -> Result<Checkpoint> {
    let n = u.int_in_range(0..=8)?;
    let floats = |u: &mut Unstructured, n: usize| -> Result<Vec<f32>> {
        (0..n).map(|_| Ok(f32::from_bits(u.arbitrary()?))).collect()
    };
    let params = floats(u, n)?;
    let mut buffers = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        // Names as optimizers write them: distinct, non-empty, no commas (the metadata list's
        // separator).
        let name = ["momentum", "exp_avg", "exp_avg_sq", "m", "v"][u.int_in_range(0..=4)?].to_string();
        let len = if u.ratio(1, 8)? { u.int_in_range(0..=9)? } else { n };
        let values = floats(u, len)?;
        if !buffers.iter().any(|(n, _): &(String, Vec<f32>)| *n == name) {
            buffers.push((name, values));
        }
    }
    Ok(Checkpoint {
        model: u.arbitrary()?,
        layout: u.arbitrary()?,
        round: u.arbitrary()?,
        epoch: u.arbitrary()?,
        params,
        optimizer: OptimizerState { kind: u.arbitrary()?, steps: u.arbitrary()?, buffers },
        rng: u.arbitrary()?,
        wall_s: f64::from_bits(u.arbitrary()?),
        error_feedback: if u.arbitrary()? {
            let len = if u.ratio(1, 8)? { u.int_in_range(0..=9)? } else { n };
            Some(floats(u, len)?)
        } else {
            None
        },
    })
}
