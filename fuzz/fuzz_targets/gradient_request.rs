//! The gradient function's JSON (`peerless_core::function`): the request a function instance
//! receives (from its node's runtime, or anyone speaking the Invoke API) and the response its
//! node decodes; and the request's fields that are parsed further: the model id
//! (`peerless_ml::ModelSpec::from_id`), the parameter digest and the dataset name.
//!
//! First byte picks the decoder; the rest is its input.
//! - Request, response: what decodes encodes and decodes back equal; a response's loss is
//!   finite (JSON numbers beyond f32's range must not become ±∞).
//! - Model id: an accepted id is canonical (`from_id(id)?.id() == id`), and building its
//!   parameter layout is an answer (a layout or an error), never a panic.
//! - Digest, dataset: an accepted text prints back as itself (the digest in lowercase).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerless_core::flat::Digest;
use peerless_core::function::{GradientRequest, GradientResponse};
use peerless_ml::{DatasetName, ModelSpec};

const REQUEST: &str = r#"{"node":"peer-1","round":3,"batch":0,"attempt":0,"model":"mlp-64-32-10","backend":"auto","params_key":"params/3","params_digest":"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff","dataset":"digits","data_dir":"/data","indices":[1,2,3],"output_key":"grad/3","output_mode":"accumulate","store":{"url":"redis://:pw@127.0.0.1:6379/"},"return_digest":false}"#;
const DIGEST: &str = "00112233445566778899AABBCCDDEEFF00112233445566778899aabbccddeeff";
const RESPONSE: &str = r#"{"key":"grad/3","len":2410,"digest":"ab","loss":2.25,"samples":64,"compute_ms":1.5,"applied":true,"cold":false}"#;

fuzz_target!(
    init: {
        peerless_fuzz::seeds(|| {
            [(0u8, "request", REQUEST), (1, "response", RESPONSE), (2, "mlp", "mlp-784-256-128-10"),
             (2, "lenet", "lenet-1x28x28-10"), (2, "logreg", "logreg-64-10"), (3, "digest", DIGEST),
             (3, "dataset", "fashion-mnist")]
                .into_iter()
                .map(|(mode, name, text)| (name.to_string(), [&[mode][..], text.as_bytes()].concat()))
                .collect()
        })
    },
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else { return };
        match mode % 4 {
            0 => {
                if let Ok(req) = serde_json::from_slice::<GradientRequest>(rest) {
                    let json = serde_json::to_vec(&req).expect("a request serializes");
                    let back: GradientRequest = serde_json::from_slice(&json).expect("a written request decodes");
                    assert_eq!(back, req);
                }
            }
            1 => {
                if let Ok(resp) = serde_json::from_slice::<GradientResponse>(rest) {
                    assert!(resp.loss.is_finite(), "decoded a non-finite loss {}", resp.loss);
                    assert!(resp.compute_ms.is_finite(), "decoded a non-finite compute_ms {}", resp.compute_ms);
                    let json = serde_json::to_vec(&resp).expect("a response serializes");
                    let back: GradientResponse =
                        serde_json::from_slice(&json).expect("a written response decodes");
                    assert_eq!(back, resp);
                }
            }
            2 => {
                let Ok(id) = std::str::from_utf8(rest) else { return };
                if let Ok(spec) = ModelSpec::from_id(id) {
                    assert_eq!(spec.id(), id, "an accepted model id is canonical");
                    if let Ok(layout) = spec.layout() {
                        assert!(layout.len() > 0);
                    }
                }
            }
            _ => {
                let Ok(text) = std::str::from_utf8(rest) else { return };
                if let Ok(d) = text.parse::<Digest>() {
                    assert_eq!(d.to_string(), text.to_ascii_lowercase());
                }
                if let Ok(name) = text.parse::<DatasetName>() {
                    assert_eq!(name.to_string().parse::<DatasetName>().ok(), Some(name));
                }
            }
        }
    }
);
