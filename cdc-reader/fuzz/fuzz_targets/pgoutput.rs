//! The pgoutput decoder on arbitrary bytes: as a whole CopyData payload
//! (walsender frame, then the message inside an XLogData frame, as the
//! reader reads them) and as a bare message. Any input must give a message
//! or an error, never a panic, an overflow or an unbounded allocation.
#![no_main]

use bytes::Bytes;
use cdc_reader::pgoutput::{Message, ReplicationFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(ReplicationFrame::XLogData { data, .. }) = ReplicationFrame::parse(bytes.clone()) {
        let _ = Message::parse(data);
    }
    let _ = Message::parse(bytes);
});
