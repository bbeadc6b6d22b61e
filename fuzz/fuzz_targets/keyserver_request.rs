#![no_main]

// Key-server request parsing and validation: the first byte picks the
// request kind, the rest is the HTTP body (see protocol::fuzz_request).
libfuzzer_sys::fuzz_target!(|data: &[u8]| lsvfs_keyserver::protocol::fuzz_request(data));
