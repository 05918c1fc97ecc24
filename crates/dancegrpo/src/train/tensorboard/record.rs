//! TFRecord framing: each record is
//! `u64 length (LE) | u32 masked crc32c(length bytes) | payload | u32 masked crc32c(payload)`.
//! The CRC-32C itself comes from the `crc32c` crate; the mask is TensorFlow's.

use std::io::Write;

/// TensorFlow's masked CRC-32C of `bytes` (rotated right by 15 bits, plus a
/// constant), so that a CRC of data holding CRCs stays well spread.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// Writes `payload` as one record into `out`.
pub fn write_record(out: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    let len = (payload.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc32c(&len).to_le_bytes())?;
    out.write_all(payload)?;
    out.write_all(&masked_crc32c(payload).to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value_and_mask() {
        // the CRC-32C check value (RFC 3720 / the catalogue's "123456789")
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // TensorFlow's mask of it: ((c >> 15) | (c << 17)) + 0xa282ead8
        let c = 0xE306_9283u32;
        #[allow(clippy::manual_rotate)] // the format's own words
        let want = ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), want);
        assert_eq!(crc32c::crc32c(b""), 0);
    }

    #[test]
    fn a_record_is_length_crc_payload_crc() {
        let mut out = Vec::new();
        write_record(&mut out, b"abc").unwrap();
        assert_eq!(out.len(), 8 + 4 + 3 + 4);
        assert_eq!(&out[..8], &3u64.to_le_bytes());
        assert_eq!(&out[8..12], &masked_crc32c(&out[..8]).to_le_bytes());
        assert_eq!(&out[12..15], b"abc");
        assert_eq!(&out[15..], &masked_crc32c(b"abc").to_le_bytes());
    }
}
