//! Reading JSON files with errors that name the file.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads and parses `path` as JSON into `T`; a value of the wrong type is
/// named by its path in the document (`field `num_layers`: invalid type ...`).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        let data = e.inner().classify() == serde_json::error::Category::Data;
        let msg = match at.as_str() {
            "." | "" | "?" => e.inner().to_string(),
            _ if !data => e.inner().to_string(),
            _ => format!("field `{at}`: {}", e.inner()),
        };
        Error::Json {
            path: path.to_path_buf(),
            msg,
        }
    })
}

/// Converts an already parsed JSON `value` of file `path` into `T`, naming a
/// value of the wrong type by its path as [`read_json`] does (`prefix`, when
/// not empty, is the path of `value` inside the file).
pub fn from_value<T: DeserializeOwned>(
    value: serde_json::Value,
    path: &Path,
    prefix: &str,
) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = match (prefix, e.path().to_string()) {
            (p, inner) if inner == "." => p.to_string(),
            ("", inner) => inner,
            (p, inner) => format!("{p}.{inner}"),
        };
        let msg = match at.as_str() {
            "" => e.inner().to_string(),
            _ => format!("field `{at}`: {}", e.inner()),
        };
        Error::Json {
            path: path.to_path_buf(),
            msg,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Config {
        num_layers: usize,
    }

    #[test]
    fn a_type_error_names_its_field() {
        let path = std::env::temp_dir().join(format!("dg-json-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"num_layers": "one"}"#).unwrap();
        let err = read_json::<Config>(&path).unwrap_err().to_string();
        assert!(
            err.contains("field `num_layers`: invalid type: string \"one\""),
            "{err}"
        );
        std::fs::write(&path, "{").unwrap();
        let err = read_json::<Config>(&path).unwrap_err().to_string();
        assert!(err.contains("invalid JSON: EOF"), "{err}");
        let v = serde_json::json!({"num_layers": -1});
        let err = from_value::<Config>(v, &path, "text_config")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("field `text_config.num_layers`: invalid value"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
