//! Arbitrary bytes as an operator-API request: the JSON decoder and the
//! role check every request goes through before anything runs.
#![no_main]

use covey_protocol::admin::{AdminRequest, MAX_REQUEST_BYTES, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_REQUEST_BYTES {
        return;
    }
    if let Ok(request) = serde_json::from_slice::<AdminRequest>(data) {
        let _ = request.action();
        for role in [Role::Device, Role::Auditor, Role::Operator, Role::Admin] {
            let _ = role.may(&request);
        }
    }
});
