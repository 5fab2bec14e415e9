//! Arbitrary bytes as a dashboard request: the router, the login form and
//! the cookie header, which every HTTP request passes through before any
//! login is looked up.
#![no_main]

use covey_protocol::dashboard::{route, token_from_cookie, token_from_form};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input between method and path.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(rest.len());
    let (method, path) = rest.split_at(split);
    if let (Ok(method), Ok(path)) = (std::str::from_utf8(method), std::str::from_utf8(path)) {
        if let Err(e) = route(method, path) {
            let _ = (e.status(), e.to_string());
        }
    }
    if let Ok(token) = token_from_form(data) {
        // What parses must print back to itself.
        let text = token.to_text();
        assert_eq!(token_from_form(format!("token={text}").as_bytes()).ok(), Some(token));
    }
    let _ = token_from_cookie(data);
});
