//! Hand-encoded `tensorflow.Event` protobufs (the payload of each record of an
//! event file), only the fields TensorBoard's scalar, image and text dashboards
//! need. Hand-written because no maintained crate writes TensorBoard events, and
//! these few messages are simpler to encode than to generate; the CLI test reads
//! them back with `prost` from messages declared after TensorFlow's `.proto`s.
//!
//! ```text
//! Event       { double wall_time = 1; int64 step = 2; string file_version = 3;
//!               Summary summary = 5; SessionLog session_log = 7; }
//! Summary     { repeated Value value = 1; }
//! Value       { string tag = 1; float simple_value = 2; Image image = 4;
//!               TensorProto tensor = 8; SummaryMetadata metadata = 9; }
//! Image       { int32 height = 1; int32 width = 2; int32 colorspace = 3;
//!               bytes encoded_image_string = 4; }     // colorspace 3: RGB
//! TensorProto { DataType dtype = 1; TensorShapeProto tensor_shape = 2;
//!               repeated bytes string_val = 8; }      // DT_STRING = 7, shape {}: a scalar
//! SummaryMetadata { PluginData plugin_data = 1; }     // PluginData { string plugin_name = 1; }
//! SessionLog  { SessionStatus status = 1; }           // START = 1
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
    /// One PNG image summary (the Images dashboard).
    Image {
        /// The summary's tag.
        tag: &'a str,
        /// The encoded PNG.
        png: &'a [u8],
        /// Image height in pixels.
        height: u32,
        /// Image width in pixels.
        width: u32,
    },
    /// One text summary (the Text dashboard renders it as Markdown).
    Text {
        /// The summary's tag.
        tag: &'a str,
        /// The Markdown text.
        text: &'a str,
    },
}

/// `DataType.DT_STRING`.
const DT_STRING: u64 = 7;
/// `Summary.Image.colorspace` of RGB.
const RGB: u64 = 3;

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
        EventBody::Image {
            tag,
            png,
            height,
            width,
        } => {
            let mut image = Vec::with_capacity(png.len() + 16);
            put_uint(&mut image, 1, *height as u64);
            put_uint(&mut image, 2, *width as u64);
            put_uint(&mut image, 3, RGB);
            put_bytes(&mut image, 4, png);
            put_bytes(&mut out, 5, &summary_value(tag, 4, &image, None));
        }
        EventBody::Text { tag, text } => {
            let mut tensor = Vec::with_capacity(text.len() + 8);
            put_uint(&mut tensor, 1, DT_STRING);
            put_bytes(&mut tensor, 2, &[]); // shape {}: a scalar
            put_bytes(&mut tensor, 8, text.as_bytes());
            let mut plugin = Vec::new();
            put_bytes(&mut plugin, 1, b"text");
            let mut metadata = Vec::new();
            put_bytes(&mut metadata, 1, &plugin);
            let value = summary_value(tag, 8, &tensor, Some(&metadata));
            put_bytes(&mut out, 5, &value);
        }
    }
    out
}

/// A `Summary` holding one `Value` with `tag`, the message `field` of it and
/// optional `metadata`.
fn summary_value(tag: &str, field: u64, message: &[u8], metadata: Option<&[u8]>) -> Vec<u8> {
    let mut v = Vec::with_capacity(tag.len() + message.len() + 16);
    put_bytes(&mut v, 1, tag.as_bytes());
    put_bytes(&mut v, field, message);
    if let Some(m) = metadata {
        put_bytes(&mut v, 9, m);
    }
    let mut summary = Vec::with_capacity(v.len() + 4);
    put_bytes(&mut summary, 1, &v);
    summary
}

fn put_uint(out: &mut Vec<u8>, field: u64, v: u64) {
    put_key(out, field, Wire::Varint);
    put_varint(out, v);
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
        // summary { value { tag: "i" image { height: 2 width: 3 colorspace: 3 encoded: "P" } } }
        let body = EventBody::Image {
            tag: "i",
            png: b"P",
            height: 2,
            width: 3,
        };
        let e = encode_event(0.0, 0, &body);
        let image = [0x08, 2, 0x10, 3, 0x18, 3, 0x22, 1, b'P'];
        let mut want = vec![0x10, 0, 0x2A, 16, 0x0A, 14, 0x0A, 1, b'i', 0x22, 9];
        want.extend_from_slice(&image);
        assert_eq!(&e[9..], want);
        // summary { value { tag: "t" tensor { dtype: DT_STRING tensor_shape {} string_val: "x" }
        //                   metadata { plugin_data { plugin_name: "text" } } } }
        let e = encode_event(
            0.0,
            0,
            &EventBody::Text {
                tag: "t",
                text: "x",
            },
        );
        let tensor = [0x08, 7, 0x12, 0, 0x42, 1, b'x'];
        let meta = [0x0A, 6, 0x0A, 4, b't', b'e', b'x', b't'];
        let mut want = vec![0x10, 0, 0x2A, 24, 0x0A, 22, 0x0A, 1, b't', 0x42, 7];
        want.extend_from_slice(&tensor);
        want.extend_from_slice(&[0x4A, 8]);
        want.extend_from_slice(&meta);
        assert_eq!(&e[9..], want);
    }
}
