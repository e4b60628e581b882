//! Every protocol's frame parser (the first byte picks one): never a
//! panic, and a whole frame is within the buffer, not empty, and what
//! the parser says again when given exactly those bytes.
#![no_main]

use faultbox_proxy::protocol::Frame;
use faultbox_proxy::protocols::{http, memcached, mysql, postgres, redis, tcp};
use libfuzzer_sys::fuzz_target;

const PARSERS: &[fn(&[u8]) -> Frame] = &[
    http::request_frame,
    http::chunked_len,
    redis::command_frame,
    redis::reply_frame,
    postgres::frontend_frame,
    postgres::backend_frame,
    mysql::packet_frame,
    memcached::command_frame,
    memcached::reply_frame,
    tcp::line_frame,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, buf)) = data.split_first() else {
        return;
    };
    let parse = PARSERS[pick as usize % PARSERS.len()];
    if let Ok(Some(n)) = parse(buf) {
        assert!(n > 0 && n <= buf.len(), "frame of {n} in {} bytes", buf.len());
        assert_eq!(parse(&buf[..n]), Ok(Some(n)), "the frame alone parses differently");
    }
    let _ = http::request_head(buf);
});
