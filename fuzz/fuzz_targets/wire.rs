//! The controller–shim protocol: arbitrary lines never panic either side,
//! and a message that decodes encodes back to the same message.
#![no_main]

use faultbox_agent::wire::{self, ControlMessage, ShimMessage};
use libfuzzer_sys::fuzz_target;

fn round_trip<M>(data: &[u8])
where
    M: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let mut input = std::io::Cursor::new(data);
    while let Ok(Some(message)) = wire::recv::<_, M>(&mut input) {
        let mut out = Vec::new();
        wire::send(&mut out, &message).expect("encode");
        let again: Option<M> = wire::recv(&mut std::io::Cursor::new(out)).expect("decode");
        assert_eq!(again.as_ref(), Some(&message));
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<ControlMessage>(data);
    round_trip::<ShimMessage>(data);
});
