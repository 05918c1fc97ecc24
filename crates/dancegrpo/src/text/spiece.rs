//! A minimal reader of sentencepiece's `ModelProto` (`spiece.model`): the pieces
//! (field 1: `piece` 1, `score` 2, `type` 3) and `trainer_spec.byte_fallback` (2/35).

/// sentencepiece's `SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// What the tokenizer needs from a model file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Model {
    pub pieces: Vec<Piece>,
    pub byte_fallback: bool,
}

/// A protobuf field value.
enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

/// Iterates the `(field number, value)` pairs of one message.
struct Fields<'a> {
    buf: &'a [u8],
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if buf.len() < n {
        return Err(format!("field of {n} bytes runs past the end"));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let mut read = || -> Result<(u64, Value<'a>), String> {
            let key = varint(&mut self.buf)?;
            let value = match key & 7 {
                0 => Value::Varint(varint(&mut self.buf)?),
                1 => take(&mut self.buf, 8).map(|_| Value::Fixed64)?,
                2 => {
                    let n = varint(&mut self.buf)? as usize;
                    Value::Bytes(take(&mut self.buf, n)?)
                }
                5 => {
                    let b = take(&mut self.buf, 4)?;
                    Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                }
                w => return Err(format!("unsupported wire type {w}")),
            };
            Ok((key >> 3, value))
        };
        let item = read();
        if item.is_err() {
            self.buf = &[];
        }
        Some(item)
    }
}

/// Parses a serialized `ModelProto`.
pub(crate) fn parse_model(buf: &[u8]) -> Result<Model, String> {
    let mut model = Model {
        pieces: Vec::new(),
        byte_fallback: false,
    };
    for field in (Fields { buf }) {
        match field? {
            (1, Value::Bytes(b)) => {
                let i = model.pieces.len();
                model
                    .pieces
                    .push(parse_piece(b).map_err(|e| format!("pieces[{i}]: {e}"))?);
            }
            (2, Value::Bytes(b)) => {
                for f in (Fields { buf: b }) {
                    if let (35, Value::Varint(v)) = f.map_err(|e| format!("trainer_spec: {e}"))? {
                        model.byte_fallback = v != 0;
                    }
                }
            }
            _ => {}
        }
    }
    if model.pieces.is_empty() {
        return Err("no pieces".into());
    }
    Ok(model)
}

fn parse_piece(buf: &[u8]) -> Result<Piece, String> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    for field in (Fields { buf }) {
        match field? {
            (1, Value::Bytes(b)) => {
                piece.piece = String::from_utf8(b.to_vec()).map_err(|_| "piece is not UTF-8")?;
            }
            (2, Value::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Value::Varint(t)) => {
                piece.kind = match t {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    t => return Err(format!("unknown piece type {t}")),
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

/// Serializes pieces as a `ModelProto` (for tests of the reader and the tokenizer).
#[cfg(test)]
pub(crate) fn encode_model(pieces: &[(&str, f32, u64)]) -> Vec<u8> {
    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = Vec::new();
    for (p, score, kind) in pieces {
        let mut msg = vec![0x0a];
        put_varint(&mut msg, p.len() as u64);
        msg.extend_from_slice(p.as_bytes());
        msg.push(0x15);
        msg.extend_from_slice(&score.to_le_bytes());
        msg.push(0x18);
        put_varint(&mut msg, *kind);
        out.push(0x0a);
        put_varint(&mut out, msg.len() as u64);
        out.extend(msg);
    }
    // trainer_spec { byte_fallback: false } and an unknown field to skip.
    out.extend([0x12, 0x03, 0x98, 0x02, 0x00, 0x28, 0x07]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pieces_scores_and_types() {
        let buf = encode_model(&[("<unk>", 0.0, 2), ("▁a", -1.5, 1), ("</s>", 0.0, 3)]);
        let m = parse_model(&buf).unwrap();
        assert_eq!(m.pieces.len(), 3);
        assert_eq!(m.pieces[1].piece, "▁a");
        assert_eq!(m.pieces[1].score, -1.5);
        assert_eq!(m.pieces[0].kind, PieceType::Unknown);
        assert_eq!(m.pieces[2].kind, PieceType::Control);
        assert!(!m.byte_fallback);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let buf = encode_model(&[("▁a", -1.5, 1)]);
        assert!(parse_model(&buf[..buf.len() - 9]).is_err());
        assert!(parse_model(&[]).is_err());
    }
}
