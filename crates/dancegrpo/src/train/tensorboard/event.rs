//! Hand-encoded `tensorflow.Event` protobufs (the payload of each record of an
//! event file), only the fields TensorBoard's scalar dashboard needs:
//!
//! ```text
//! Event      { double wall_time = 1; int64 step = 2; string file_version = 3;
//!              Summary summary = 5; SessionLog session_log = 7; }
//! Summary    { repeated Value value = 1; }
//! Value      { string tag = 1; float simple_value = 2; }
//! SessionLog { SessionStatus status = 1; }   // START = 1
//! ```

/// The `file_version` of the first event of every file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// `SessionLog.SessionStatus.START`. (`session_log` is field 7 of `Event`;
/// field 6 is the deprecated `log_message`, which TensorBoard does not purge on.)
const SESSION_START: u64 = 1;

/// Protobuf wire types.
#[derive(Clone, Copy)]
enum Wire {
    Varint = 0,
    Fixed64 = 1,
    Delimited = 2,
    Fixed32 = 5,
}

/// What an event carries besides its time and step.
#[derive(Debug, Clone, PartialEq)]
pub enum EventBody<'a> {
    /// The file header ([`FILE_VERSION`]).
    FileVersion,
    /// Scalar summaries `(tag, value)`.
    Scalars(&'a [(String, f32)]),
    /// `SessionLog { status: START }`: TensorBoard drops the points of earlier
    /// files at this step and later (a restarted run).
    SessionStart,
}

/// The encoded `Event` at `wall_time` (seconds since the epoch) and `step`.
pub fn encode_event(wall_time: f64, step: i64, body: &EventBody) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_key(&mut out, 1, Wire::Fixed64);
    out.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut out, 2, Wire::Varint);
    put_varint(&mut out, step as u64);
    match body {
        EventBody::FileVersion => put_bytes(&mut out, 3, FILE_VERSION.as_bytes()),
        EventBody::Scalars(values) => put_bytes(&mut out, 5, &encode_summary(values)),
        EventBody::SessionStart => {
            let mut log = Vec::new();
            put_key(&mut log, 1, Wire::Varint);
            put_varint(&mut log, SESSION_START);
            put_bytes(&mut out, 7, &log);
        }
    }
    out
}

/// The encoded `Summary` of scalar `values`.
fn encode_summary(values: &[(String, f32)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in values {
        let mut v = Vec::with_capacity(tag.len() + 8);
        put_bytes(&mut v, 1, tag.as_bytes());
        put_key(&mut v, 2, Wire::Fixed32);
        v.extend_from_slice(&value.to_le_bytes());
        put_bytes(&mut summary, 1, &v);
    }
    summary
}

fn put_key(out: &mut Vec<u8>, field: u64, wire: Wire) {
    put_varint(out, (field << 3) | wire as u64);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, Wire::Delimited);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Base-128 varint, least significant group first (negative int64 take 10 bytes).
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7F) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_known_encodings() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
        // wall_time 0.0, step 1, file_version "brain.Event:2"
        let e = encode_event(0.0, 1, &EventBody::FileVersion);
        let mut want = vec![0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 1, 0x1A, 13];
        want.extend_from_slice(b"brain.Event:2");
        assert_eq!(e, want);
        // session_log { status: START }
        let e = encode_event(0.0, 7, &EventBody::SessionStart);
        assert_eq!(&e[9..], [0x10, 7, 0x3A, 2, 0x08, 1]);
        // summary { value { tag: "a" simple_value: 1.0 } }
        let e = encode_event(0.0, 0, &EventBody::Scalars(&[("a".into(), 1.0)]));
        assert_eq!(
            &e[9..],
            [0x10, 0, 0x2A, 10, 0x0A, 8, 0x0A, 1, b'a', 0x15, 0, 0, 0x80, 0x3F]
        );
    }
}
