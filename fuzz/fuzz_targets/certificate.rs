//! Admission certificates (`peerless_core::admission`): what any node that connects presents.
//!
//! A certificate that decodes re-encodes to exactly its bytes, and verifying any input against
//! a fixed run and key never panics and admits nothing that the run's key did not sign (the
//! fuzzer cannot forge an ed25519 signature, so an admission is a failure).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerless_core::admission::{AdmissionKey, Certificate, Claims, Expected, Role, RunId, verify};

const RUN: RunId = RunId([7; 16]);

fn key() -> AdmissionKey {
    AdmissionKey::from_seed([1; 32])
}

fuzz_target!(
    init: {
        peerless_fuzz::seeds(|| {
            let claims = Claims { run: RUN, peer_id: vec![0, 36, 1, 2, 3], role: Role::Peer, index: 2, expires: 10 };
            // Signed by another key: a seed the fuzzer may mutate, never one it may get admitted.
            let cert = Certificate::sign(claims, &AdmissionKey::from_seed([2; 32]));
            vec![("peer".to_string(), cert.encode())]
        })
    },
    |data: &[u8]| {
        if let Ok(cert) = Certificate::decode(data) {
            assert_eq!(cert.encode(), data, "a decoded certificate re-encodes to its bytes");
        }
        let public = key().public();
        let expected = Expected { run: RUN, key: &public, roles: &[Role::Peer, Role::Worker, Role::Ps], now: 0 };
        if let Ok(cert) = verify(Some(data), &[0, 36, 1, 2, 3], &expected) {
            panic!("a certificate not signed by the run's key was admitted: {cert:?}");
        }
    }
);
