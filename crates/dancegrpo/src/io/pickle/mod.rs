//! A restricted pickle reader: it interprets the opcodes `torch.save` emits and
//! builds plain values, never executing anything.
//!
//! `GLOBAL` / `STACK_GLOBAL` are accepted only for names the caller allows;
//! `REDUCE` of an allowed callable does not call it but records an
//! [`Value::Object`] (callable name, arguments) for the caller to interpret.
//! The one exception is `collections.OrderedDict`, which becomes a plain
//! [`Value::Dict`] so that the following `SETITEMS` can fill it.
//! Any other opcode (or a disallowed global) is an error naming it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

mod opcodes;

/// A shared, mutable list or dict (pickle memo entries alias their object).
pub type Shared<T> = Rc<RefCell<T>>;

/// A value built by the unpickler.
#[derive(Debug, Clone)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// A unicode string.
    Str(String),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Shared<Vec<Value>>),
    /// A dict (or `OrderedDict`), in insertion order.
    Dict(Shared<Vec<(Value, Value)>>),
    /// An allowed global, `module.name`.
    Global(String),
    /// A persistent id (`BINPERSID`), resolved by the caller.
    Persistent(Box<Value>),
    /// `REDUCE` of an allowed global (not called): `callable(*args)`, plus a `BUILD` state.
    Object {
        /// `module.name` of the callable.
        callable: String,
        /// Its positional arguments.
        args: Vec<Value>,
        /// The state given by `BUILD`, if any.
        state: Option<Box<Value>>,
    },
}

impl Value {
    /// A short description of the value's type for error messages.
    pub fn type_name(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global(g) => format!("global `{g}`"),
            Value::Persistent(_) => "persistent id".into(),
            Value::Object { callable, .. } => format!("`{callable}(...)`"),
        }
    }
}

/// The largest memo index / container size accepted (a guard against hostile inputs).
const MAX_MEMO: usize = 1 << 24;

enum Item {
    Mark,
    V(Value),
}

/// Interprets `data` (a pickle stream) and returns the value `STOP` leaves.
/// `allowed(module, name)` decides which globals may be referenced. Errors are
/// plain messages naming the opcode, global or position; the caller adds the file.
pub fn unpickle(data: &[u8], allowed: &dyn Fn(&str, &str) -> bool) -> Result<Value, String> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    m.run(allowed)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated pickle at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| format!("unterminated line at byte {}", self.pos))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| format!("non-UTF-8 text at byte {}", self.pos))?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> Result<String, String> {
        let at = self.pos;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| format!("invalid UTF-8 string at byte {at}"))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Item::V(v));
    }

    fn pop(&mut self) -> Result<Value, String> {
        match self.stack.pop() {
            Some(Item::V(v)) => Ok(v),
            Some(Item::Mark) => Err(format!("unexpected MARK on the stack at byte {}", self.pos)),
            None => Err(format!("stack underflow at byte {}", self.pos)),
        }
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        match self.stack.last_mut() {
            Some(Item::V(v)) => Ok(v),
            _ => Err("no value on the stack".into()),
        }
    }

    /// Pops everything down to the last MARK (removing it).
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|i| matches!(i, Item::Mark))
            .ok_or_else(|| format!("no MARK on the stack at byte {}", self.pos))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|i| match i {
                Item::V(v) => v,
                Item::Mark => unreachable!("the last mark was found above"),
            })
            .collect())
    }

    fn memo_put(&mut self, idx: u32) -> Result<(), String> {
        if idx as usize > MAX_MEMO {
            return Err(format!("memo index {idx} too large"));
        }
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<(), String> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| format!("memo entry {idx} read before it was written"))?;
        self.push(v);
        Ok(())
    }

    fn global(
        &mut self,
        module: &str,
        name: &str,
        allowed: &dyn Fn(&str, &str) -> bool,
    ) -> Result<(), String> {
        if !allowed(module, name) {
            return Err(format!(
                "refuses global `{module}.{name}` (only tensor-rebuilding globals are allowed; nothing was executed)"
            ));
        }
        self.push(Value::Global(format!("{module}.{name}")));
        Ok(())
    }

    fn set_items(dict: &Value, items: Vec<Value>) -> Result<(), String> {
        let Value::Dict(d) = dict else {
            return Err(format!("SETITEM(S) on a {}", dict.type_name()));
        };
        if items.len() % 2 != 0 {
            return Err("SETITEMS with an odd number of items".into());
        }
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            // Later keys override earlier ones, as in Python (keys compared as strings/ints).
            let slot = d.iter().position(|(old, _)| same_key(old, &k));
            match slot {
                Some(i) => d[i].1 = v,
                None => d.push((k, v)),
            }
        }
        Ok(())
    }

    fn append(list: &Value, items: Vec<Value>) -> Result<(), String> {
        let Value::List(l) = list else {
            return Err(format!("APPEND(S) on a {}", list.type_name()));
        };
        l.borrow_mut().extend(items);
        Ok(())
    }
}

fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::None, Value::None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_none(_: &str, _: &str) -> bool {
        false
    }

    #[test]
    fn dict_of_ints_and_strings() {
        // pickle.dumps({"a": 1, "b": [2, 300, -5]}, protocol=2)
        let mut p = vec![
            0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b'K', 1,
        ];
        p.extend([
            b'X', 1, 0, 0, 0, b'b', b']', b'q', 1, b'(', b'K', 2, b'M', 0x2c, 1,
        ]);
        p.extend([0x8a, 1, 0xfb, b'e', b'u', b'.']);
        let v = unpickle(&p, &allow_none).unwrap();
        let Value::Dict(d) = v else { panic!() };
        let d = d.borrow();
        assert_eq!(d.len(), 2);
        assert!(matches!(d[0], (Value::Str(ref k), Value::Int(1)) if k == "a"));
        let Value::List(l) = &d[1].1 else { panic!() };
        let l: Vec<i64> = l
            .borrow()
            .iter()
            .map(|v| match v {
                Value::Int(i) => *i,
                _ => panic!(),
            })
            .collect();
        assert_eq!(l, [2, 300, -5]);
    }

    #[test]
    fn refuses_globals_and_unknown_opcodes() {
        let p = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85R.";
        let e = unpickle(p, &allow_none).unwrap_err();
        assert!(e.contains("os.system"), "{e}");
        let e = unpickle(b"\x80\x02(i__builtin__\neval\n.", &allow_none).unwrap_err();
        assert!(e.contains("INST"), "{e}");
        let e = unpickle(b"\x80\x02}", &allow_none).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }
}
