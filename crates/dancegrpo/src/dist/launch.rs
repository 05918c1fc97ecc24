//! The launch environment of a process: the variables `torchrun` sets (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, and
//! `TORCHELASTIC_USE_AGENT_STORE` / `TORCHELASTIC_RESTART_COUNT` when its agent
//! serves the store), which a user may also set by hand.

use crate::error::{Error, Result};

/// Where this process sits among the processes of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Global rank.
    pub rank: i64,
    /// Number of processes.
    pub world_size: i64,
    /// Rank on this machine (selects the GPU).
    pub local_rank: i64,
    /// Host of the rendezvous store.
    pub master_addr: String,
    /// Port of the rendezvous store.
    pub master_port: u16,
    /// The store is served by torchrun's agent (every worker is a client), and
    /// the keys of this attempt live under `/worker/attempt_<restart_count>`.
    pub agent_store: bool,
    /// torchrun's restart count.
    pub restart_count: u64,
}

impl Launch {
    /// The launch read from `var` (`std::env::var` in use): `None` for a single
    /// process (`WORLD_SIZE` unset or 1). Errors name the variable.
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let world: i64 = match var("WORLD_SIZE") {
            None => return Ok(None),
            Some(w) => parse(&w, "WORLD_SIZE")?,
        };
        if world == 1 {
            return Ok(None);
        }
        let need = |name: &str| {
            var(name).ok_or_else(|| {
                Error::Input(format!("WORLD_SIZE={world} but {name} is not set (launch with torchrun, or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"))
            })
        };
        let rank: i64 = parse(&need("RANK")?, "RANK")?;
        if world < 1 || rank < 0 || rank >= world {
            return Err(Error::Input(format!(
                "RANK={rank} is not in 0..WORLD_SIZE={world}"
            )));
        }
        Ok(Some(Launch {
            rank,
            world_size: world,
            local_rank: var("LOCAL_RANK").map_or(Ok(rank), |v| parse(&v, "LOCAL_RANK"))?,
            master_addr: need("MASTER_ADDR")?,
            master_port: parse(&need("MASTER_PORT")?, "MASTER_PORT")?,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
            restart_count: var("TORCHELASTIC_RESTART_COUNT")
                .map_or(Ok(0), |v| parse(&v, "TORCHELASTIC_RESTART_COUNT"))?,
        }))
    }

    /// The launch of this process's environment.
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(&|name| std::env::var(name).ok())
    }
}

fn parse<T: std::str::FromStr>(value: &str, name: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| Error::Input(format!("{name}={value:?} is not a valid number")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(pairs: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(&|k| map.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_variables_and_names_bad_ones() {
        assert_eq!(launch(&[]).unwrap(), None);
        assert_eq!(launch(&[("WORLD_SIZE", "1")]).unwrap(), None);
        let l = launch(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.world_size, l.master_port, l.agent_store),
            (1, 2, 29500, true)
        );
        let e = launch(&[("WORLD_SIZE", "2"), ("RANK", "0")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
        let e = launch(&[("WORLD_SIZE", "2"), ("RANK", "2")]).unwrap_err();
        assert!(e.to_string().contains("RANK=2"), "{e}");
        let e = launch(&[("WORLD_SIZE", "two")]).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE"), "{e}");
    }
}
