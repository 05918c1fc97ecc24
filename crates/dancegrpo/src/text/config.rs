//! Field access in a parsed `tokenizer.json` with errors naming the file and field.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// A JSON value of a tokenizer file together with the file and the dotted field
/// path it was found at, so every error can name both.
#[derive(Clone, Copy)]
pub(crate) struct Field<'a> {
    pub path: &'a Path,
    pub name: &'a str,
    pub value: &'a Value,
}

impl<'a> Field<'a> {
    /// The root of a parsed file.
    pub fn root(path: &'a Path, value: &'a Value) -> Self {
        Field {
            path,
            name: "",
            value,
        }
    }

    /// A configuration error about this field.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        let name = if self.name.is_empty() {
            "<root>"
        } else {
            self.name
        };
        Error::config(self.path, name, msg)
    }

    /// The member `key` (an error when absent); `name` is its full dotted path.
    pub fn get(&self, key: &str, name: &'a str) -> Result<Field<'a>> {
        self.opt(key, name)
            .ok_or_else(|| Error::config(self.path, name, "missing"))
    }

    /// The `model` member of a `tokenizer.json` root, which must be of type `want`.
    pub fn model(&self, want: &str) -> Result<Field<'a>> {
        let model = self.get("model", "model")?;
        let kind = model.get("type", "model.type")?.str()?;
        if kind != want {
            let msg = format!("expected {want}, found {kind}");
            return Err(Error::config(self.path, "model.type", msg));
        }
        Ok(model)
    }

    /// The member `key`, or `None` when absent or null.
    pub fn opt(&self, key: &str, name: &'a str) -> Option<Field<'a>> {
        match self.value.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(Field {
                path: self.path,
                name,
                value,
            }),
        }
    }

    /// The value as a string.
    pub fn str(&self) -> Result<&'a str> {
        self.value
            .as_str()
            .ok_or_else(|| self.error(format!("expected a string, found {}", self.value)))
    }

    /// The value as a non-negative integer.
    pub fn u64(&self) -> Result<u64> {
        self.value.as_u64().ok_or_else(|| {
            self.error(format!(
                "expected an unsigned integer, found {}",
                self.value
            ))
        })
    }

    /// The value as a boolean.
    pub fn bool(&self) -> Result<bool> {
        self.value
            .as_bool()
            .ok_or_else(|| self.error(format!("expected a boolean, found {}", self.value)))
    }

    /// The value as an array.
    pub fn array(&self) -> Result<&'a Vec<Value>> {
        self.value
            .as_array()
            .ok_or_else(|| self.error("expected an array"))
    }

    /// An element of this (array) field, reported under the same field name.
    pub fn item(&self, value: &'a Value) -> Field<'a> {
        Field {
            path: self.path,
            name: self.name,
            value,
        }
    }
}
