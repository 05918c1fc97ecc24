//! CRC-32C (Castagnoli), the checksum of TFRecord framing, table-driven, and
//! TensorFlow's masked form of it.

/// The reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

/// The byte-at-a-time lookup table, built at compile time.
const TABLE: [u32; 256] = build_table();

const fn build_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// CRC-32C of `bytes` (initial value and final xor `0xFFFFFFFF`).
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TensorFlow's masked CRC: rotated right by 15 bits plus a constant, so that
/// a CRC stored inside checksummed data does not checksum to a fixed value.
pub fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// The masked CRC-32C of `bytes`, as TFRecord stores it.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    masked(crc32c(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros, and of 0xFF
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn masking_rotates_and_adds_the_constant() {
        // ((crc >> 15) | (crc << 17)) + 0xa282ead8, by hand
        assert_eq!(masked(0), 0xA282_EAD8);
        assert_eq!(masked(1), (1u32 << 17).wrapping_add(0xA282_EAD8));
        // the sum wraps
        assert_eq!(masked(0xFFFF_FFFF), 0xA282_EAD7);
        // ((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xa282ead8, computed elsewhere
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }
}
