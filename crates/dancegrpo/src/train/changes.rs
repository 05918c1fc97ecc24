//! What differs between two training configurations, field by field (what
//! `train --resume` reports when the configuration is not the run's own).

use std::collections::BTreeMap;

use super::config::TrainConfig;
/// One field whose value differs between two configurations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    /// Dotted field name (`optim.learning_rate`, `rewards[1].weight`).
    pub field: String,
    /// The earlier value as TOML (`None`: absent).
    pub before: Option<String>,
    /// The new value as TOML (`None`: absent).
    pub after: Option<String>,
}

impl ConfigChange {
    /// Whether changing this field leaves the trajectory of a resumed run as
    /// it would have been (run length, cadences, outputs, evaluation).
    pub fn keeps_trajectory(&self) -> bool {
        const SAFE: [&str; 6] = [
            "run.iterations",
            "run.checkpoint_every",
            "run.image_every",
            "run.keep_checkpoints",
            "run.tensorboard",
            "eval.",
        ];
        SAFE.iter().any(|s| self.field.starts_with(s))
    }
}

impl TrainConfig {
    /// The fields whose values differ from `earlier`'s, in field order.
    pub fn changes_from(&self, earlier: &TrainConfig) -> Vec<ConfigChange> {
        let flat = |c: &TrainConfig| {
            let mut out = BTreeMap::new();
            flatten(
                "",
                &toml::Value::try_from(c).expect("serialisable config"),
                &mut out,
            );
            out
        };
        let (old, new) = (flat(earlier), flat(self));
        let fields: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        fields
            .into_iter()
            .filter(|f| old.get(*f) != new.get(*f))
            .map(|f| ConfigChange {
                field: f.clone(),
                before: old.get(f).cloned(),
                after: new.get(f).cloned(),
            })
            .collect()
    }
}

/// Leaf values of `v` by dotted name (array items as `name[i]`), as TOML text.
fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    let join = |k: &str| match prefix {
        "" => k.to_string(),
        _ => format!("{prefix}.{k}"),
    };
    match v {
        toml::Value::Table(t) => t.iter().for_each(|(k, v)| flatten(&join(k), v, out)),
        toml::Value::Array(a) if a.iter().all(|x| x.is_table()) && !a.is_empty() => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| flatten(&format!("{prefix}[{i}]"), x, out)),
        leaf => {
            out.insert(prefix.to_string(), leaf.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn changed(overrides: &[&str]) -> Vec<ConfigChange> {
        let base = TrainConfig::tiny_demo();
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let new = base.with_overrides(&o, Path::new("test")).unwrap();
        new.changes_from(&base)
    }

    #[test]
    fn changes_name_each_field_with_both_values() {
        assert!(changed(&[]).is_empty());
        let c = changed(&["optim.learning_rate=2e-3", "run.iterations=300"]);
        let fields: Vec<&str> = c.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["optim.learning_rate", "run.iterations"]);
        assert_eq!(c[0].before.as_deref(), Some("0.001"));
        assert_eq!(c[0].after.as_deref(), Some("0.002"));
        assert!(!c[0].keeps_trajectory() && c[1].keeps_trajectory());
        // entries of arrays of tables are named by index
        let c = changed(&[
            "rewards=[{kind = \"jpeg\", objective = \"compressibility\", quality = 80}]",
        ]);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].field, "rewards[0].quality");
        assert!(!c[0].keeps_trajectory());
        // evaluation settings leave the trajectory alone; a new field is absent before
        let c = changed(&["eval.every=5", "optim.ema.decay=0.9"]);
        assert!(c[0].field.starts_with("eval.") && c[0].keeps_trajectory());
        let ema = c.iter().find(|c| c.field == "optim.ema.decay").unwrap();
        assert_eq!(
            (ema.before.as_deref(), ema.after.as_deref()),
            (None, Some("0.9"))
        );
    }
}
