//! The control socket's request parser, on any bytes: it never panics, a
//! command it accepts parses again from its own line, and the reply echoes
//! the id it was given, verbatim.

#![no_main]

use gmem_protocol::{Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    match Request::parse(&line) {
        Ok(request) => {
            let again = Request::parse(&request.command.to_line()).expect("a command's own line parses");
            assert_eq!(again.command, request.command);
            let reply = Reply::Return { value: serde_json::Value::Null, id: request.id.clone() }.to_line();
            if let Some(id) = &request.id {
                assert!(reply.contains(id.json()), "the id {} is not echoed verbatim in {reply}", id.json());
            }
        }
        Err((error, _)) => assert!(!error.desc.is_empty()),
    }
});
