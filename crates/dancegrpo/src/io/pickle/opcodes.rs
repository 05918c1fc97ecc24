//! The opcodes of the restricted pickle machine, one method per family
//! (framing, containers, strings, scalars, the memo, globals and objects).

use std::cell::RefCell;
use std::rc::Rc;

use super::{Item, Machine, Value, MAX_MEMO};

impl Machine<'_> {
    /// Interprets opcodes until `STOP`; the value it leaves.
    pub(super) fn run(&mut self, allowed: &dyn Fn(&str, &str) -> bool) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                b'.' => return self.pop(), // STOP
                0x80 | 0x95 | b'(' | b'0' | b'1' | b'2' => self.framing(op)?,
                b'}' | b']' | b')' | b'd' | b'l' | b't' | 0x85..=0x87 => self.container(op, at)?,
                b's' | b'u' | b'a' | b'e' => self.fill(op)?,
                b'X' | 0x8c | 0x8d | b'B' | b'C' | 0x8e => self.text(op)?,
                b'J' | b'K' | b'M' | 0x8a | b'G' | 0x88 | 0x89 | b'N' => self.scalar(op, at)?,
                b'q' | b'r' | 0x94 | b'h' | b'j' => self.memo_op(op)?,
                b'c' | 0x93 | b'R' | b'b' | b'Q' => self.object(op, at, allowed)?,
                other => {
                    return Err(format!(
                        "unsupported pickle opcode {} (0x{other:02x}) at byte {at}",
                        opcode_name(other)
                    ))
                }
            }
            if self.stack.len() > MAX_MEMO {
                return Err("pickle stack too deep".into());
            }
        }
    }

    /// `PROTO`, `FRAME`, `MARK`, `POP`, `POP_MARK`, `DUP`.
    fn framing(&mut self, op: u8) -> Result<(), String> {
        match op {
            0x80 => {
                // PROTO
                let p = self.u8()?;
                if p > 5 {
                    return Err(format!("unsupported pickle protocol {p}"));
                }
            }
            0x95 => {
                // FRAME: only a size hint
                self.u64()?;
            }
            b'(' => self.stack.push(Item::Mark),
            b'0' => {
                self.pop()?; // POP
            }
            b'1' => {
                self.pop_mark()?; // POP_MARK
            }
            _ => {
                let v = self.top()?.clone(); // DUP
                self.push(v);
            }
        }
        Ok(())
    }

    /// Empty and marked dicts, lists and tuples, `TUPLE1..3`.
    fn container(&mut self, op: u8, at: usize) -> Result<(), String> {
        match op {
            b'}' => self.push(Value::Dict(Rc::default())),
            b']' => self.push(Value::List(Rc::default())),
            b')' => self.push(Value::Tuple(Vec::new())),
            b'd' => {
                // DICT
                let items = self.pop_mark()?;
                let d = Value::Dict(Rc::default());
                Self::set_items(&d, items)?;
                self.push(d);
            }
            b'l' => {
                // LIST
                let items = self.pop_mark()?;
                self.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(items));
            }
            _ => {
                // TUPLE1..3
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err(format!("stack underflow at byte {at}"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Value::Tuple(items));
            }
        }
        Ok(())
    }

    /// `SETITEM(S)`, `APPEND(S)` into the container under them.
    fn fill(&mut self, op: u8) -> Result<(), String> {
        match op {
            b's' => {
                // SETITEM
                let v = self.pop()?;
                let k = self.pop()?;
                Self::set_items(self.top()?, vec![k, v])
            }
            b'u' => {
                let items = self.pop_mark()?;
                Self::set_items(self.top()?, items)
            }
            b'a' => {
                let v = self.pop()?;
                Self::append(self.top()?, vec![v])
            }
            _ => {
                let items = self.pop_mark()?;
                Self::append(self.top()?, items)
            }
        }
    }

    /// Unicode and byte strings of every length encoding.
    fn text(&mut self, op: u8) -> Result<(), String> {
        let value = match op {
            b'X' | 0x8c | 0x8d => {
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                let n = match op {
                    b'X' => self.u32()? as usize,
                    0x8c => self.u8()? as usize,
                    _ => usize::try_from(self.u64()?).map_err(|_| "string too long")?,
                };
                Value::Str(self.string(n)?)
            }
            _ => {
                // BINBYTES, SHORT_BINBYTES, BINBYTES8
                let n = match op {
                    b'B' => self.u32()? as usize,
                    b'C' => self.u8()? as usize,
                    _ => usize::try_from(self.u64()?).map_err(|_| "bytes too long")?,
                };
                Value::Bytes(self.take(n)?.to_vec())
            }
        };
        self.push(value);
        Ok(())
    }

    /// Integers, floats, booleans and `None`.
    fn scalar(&mut self, op: u8, at: usize) -> Result<(), String> {
        let value = match op {
            b'J' => {
                let b = self.take(4)?;
                Value::Int(i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
            }
            b'K' => Value::Int(self.u8()? as i64),
            b'M' => Value::Int(self.u16()? as i64),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes
                let n = self.u8()? as usize;
                let b = self.take(n)?;
                if n > 8 {
                    return Err(format!(
                        "integer of {n} bytes does not fit in 64 bits at byte {at}"
                    ));
                }
                let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                    [0xffu8; 8]
                } else {
                    [0u8; 8]
                };
                buf[..n].copy_from_slice(b);
                Value::Int(i64::from_le_bytes(buf))
            }
            b'G' => {
                let b = self.take(8)?;
                Value::Float(f64::from_be_bytes(b.try_into().expect("8 bytes")))
            }
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            _ => Value::None,
        };
        self.push(value);
        Ok(())
    }

    /// `BINPUT`, `LONG_BINPUT`, `MEMOIZE`, `BINGET`, `LONG_BINGET`.
    fn memo_op(&mut self, op: u8) -> Result<(), String> {
        match op {
            b'q' => {
                let i = self.u8()? as u32;
                self.memo_put(i)
            }
            b'r' => {
                let i = self.u32()?;
                self.memo_put(i)
            }
            0x94 => {
                // MEMOIZE
                let i = self.memo.len() as u32;
                self.memo_put(i)
            }
            b'h' => {
                let i = self.u8()? as u32;
                self.memo_get(i)
            }
            _ => {
                let i = self.u32()?;
                self.memo_get(i)
            }
        }
    }

    /// `GLOBAL`, `STACK_GLOBAL` (allowed names only), `REDUCE` (recorded,
    /// never called), `BUILD`, `BINPERSID`.
    fn object(
        &mut self,
        op: u8,
        at: usize,
        allowed: &dyn Fn(&str, &str) -> bool,
    ) -> Result<(), String> {
        match op {
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.global(&module, &name, allowed)?;
            }
            0x93 => {
                // STACK_GLOBAL
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.global(&m, &n, allowed)?,
                    _ => return Err(format!("STACK_GLOBAL without two strings at byte {at}")),
                }
            }
            b'R' => self.reduce(at)?,
            b'b' => {
                // BUILD: attach the state (an OrderedDict's `_metadata` is dropped)
                let state = self.pop()?;
                match self.top()? {
                    Value::Dict(_) => {}
                    Value::Object { state: s, .. } => *s = Some(Box::new(state)),
                    other => return Err(format!("BUILD on a {} at byte {at}", other.type_name())),
                }
            }
            _ => {
                // BINPERSID
                let pid = self.pop()?;
                self.push(Value::Persistent(Box::new(pid)));
            }
        }
        Ok(())
    }

    /// `REDUCE`: recorded as an [`Value::Object`], never called
    /// (`collections.OrderedDict()` becomes an empty dict).
    fn reduce(&mut self, at: usize) -> Result<(), String> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let Value::Global(callable) = callable else {
            return Err(format!("REDUCE of a {} at byte {at}", callable.type_name()));
        };
        let Value::Tuple(args) = args else {
            return Err(format!(
                "REDUCE `{callable}` without an argument tuple at byte {at}"
            ));
        };
        if callable != "collections.OrderedDict" {
            self.push(Value::Object {
                callable,
                args,
                state: None,
            });
        } else if args.is_empty() {
            self.push(Value::Dict(Rc::default()));
        } else {
            return Err("OrderedDict with constructor arguments is not supported".into());
        }
        Ok(())
    }
}

/// The name of an opcode the machine refuses, for its error message.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        b'P' => "PERSID",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'p' => "PUT",
        b'g' => "GET",
        0x82..=0x84 => "EXT",
        0x8b => "LONG4",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}
