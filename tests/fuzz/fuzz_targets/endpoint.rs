//! The server address the tools accept (`endpoint::parse_url`, `endpoint::parse`): never a
//! panic; what is accepted is http or https with a port and no path, and `parse` accepts
//! exactly the accepted http addresses.

#![no_main]

use kvstore::endpoint::{parse, parse_url};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|addr: &str| {
    let url = parse_url(addr);
    match &url {
        Ok(endpoint) => {
            let uri = endpoint.uri();
            assert!(
                matches!(uri.scheme_str(), Some("http" | "https")),
                "{addr:?}: {uri}"
            );
            assert!(uri.port().is_some(), "{addr:?}: {uri}");
            assert!(matches!(uri.path(), "" | "/"), "{addr:?}: {uri}");
        }
        Err(message) => assert!(!message.is_empty()),
    }
    let plain = url.is_ok_and(|e| e.uri().scheme_str() == Some("http"));
    assert_eq!(parse(addr).is_ok(), plain, "{addr:?}");
});
