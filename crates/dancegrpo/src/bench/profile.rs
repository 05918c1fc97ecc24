//! libtorch's operator profiler (Kineto, CPU), for `bench train --profile`:
//! every operator call between [`Profiler::start`] and [`Profiler::stop`] is
//! recorded with its thread, start and duration; [`OpProfile`] turns them into
//! self time per operator (a call's time minus that of the calls it made).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::Path;

use crate::error::{Error, Result};

extern "C" {
    fn dg_profiler_start() -> std::os::raw::c_int;
    fn dg_profiler_stop(path: *const std::os::raw::c_char) -> i64;
}

/// A running profile (one at a time per process).
pub struct Profiler(());

impl Profiler {
    /// Starts recording operator calls.
    pub fn start() -> Result<Self> {
        // SAFETY: enables libtorch's thread-local profiler state
        match unsafe { dg_profiler_start() } {
            0 => Ok(Profiler(())),
            _ => Err(Error::Input("the libtorch profiler could not start".into())),
        }
    }

    /// Stops recording and writes the raw events to `path` (`thread \t start_ns
    /// \t duration_ns \t name \t input dtypes \t input shapes` per line), then
    /// reads them back as a profile.
    pub fn stop(self, path: &Path) -> Result<OpProfile> {
        let c = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| Error::Input(format!("{}: a path with a NUL byte", path.display())))?;
        // SAFETY: `c` is a valid C string for the duration of the call
        let n = unsafe { dg_profiler_stop(c.as_ptr()) };
        if n < 0 {
            return Err(Error::Input(format!(
                "{}: the profiler's events could not be written",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        OpProfile::parse(&text, path)
    }
}

/// Time per operator name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpStat {
    /// Calls.
    pub calls: u64,
    /// Time inside the operator itself, not in the operators it called (s).
    pub self_seconds: f64,
    /// Time from entry to exit (s).
    pub total_seconds: f64,
}

/// The operators of a profile, by name.
#[derive(Debug, Clone, Default)]
pub struct OpProfile {
    /// Statistics per operator name.
    pub ops: BTreeMap<String, OpStat>,
}

/// One recorded call.
struct Event {
    thread: u64,
    start: u64,
    dur: u64,
    name: String,
}

impl OpProfile {
    /// Parses the events and nests them per thread: a call inside another's
    /// interval is its child.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut events = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let mut f = line.split('\t');
            let mut num = || f.next().and_then(|v| v.parse::<u64>().ok());
            let (thread, start, dur) = (num(), num(), num());
            let (Some(thread), Some(start), Some(dur), Some(name)) = (thread, start, dur, f.next())
            else {
                return Err(Error::Input(format!(
                    "{}:{}: not an event",
                    path.display(),
                    i + 1
                )));
            };
            events.push(Event {
                thread,
                start,
                dur,
                name: name.to_string(),
            });
        }
        // by thread, then start; an enclosing call (longer) before the calls it makes
        events.sort_by_key(|e| (e.thread, e.start, std::cmp::Reverse(e.dur)));
        let mut ops: BTreeMap<String, OpStat> = BTreeMap::new();
        let mut child_time = vec![0u64; events.len()];
        let mut stack: Vec<usize> = Vec::new();
        for i in 0..events.len() {
            let e = &events[i];
            while let Some(&top) = stack.last() {
                let t = &events[top];
                if t.thread == e.thread && e.start < t.start + t.dur {
                    break;
                }
                stack.pop();
            }
            if let Some(&parent) = stack.last() {
                child_time[parent] += e.dur;
            }
            stack.push(i);
        }
        for (e, child) in events.iter().zip(child_time) {
            let s = ops.entry(e.name.clone()).or_default();
            s.calls += 1;
            s.total_seconds += e.dur as f64 * 1e-9;
            s.self_seconds += e.dur.saturating_sub(child) as f64 * 1e-9;
        }
        Ok(OpProfile { ops })
    }

    /// Operators by self time, largest first.
    pub fn by_self_time(&self) -> Vec<(&str, &OpStat)> {
        let mut v: Vec<(&str, &OpStat)> = self.ops.iter().map(|(k, s)| (k.as_str(), s)).collect();
        v.sort_by(|a, b| b.1.self_seconds.total_cmp(&a.1.self_seconds));
        v
    }

    /// Self time of every operator together (s).
    pub fn self_seconds(&self) -> f64 {
        self.ops.values().map(|s| s.self_seconds).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_calls_split_into_self_time() {
        // thread 1: outer [0, 100) calls a [10, 40) and b [50, 60); thread 2: c
        let text = "1\t0\t100\touter\n1\t10\t30\ta\n1\t50\t10\tb\n2\t5\t1000\tc\n1\t200\t20\ta\n";
        let p = OpProfile::parse(text, Path::new("t")).unwrap();
        let s = |n: &str| p.ops[n].clone();
        assert_eq!(s("outer").calls, 1);
        assert!((s("outer").self_seconds - 60e-9).abs() < 1e-15);
        assert!((s("outer").total_seconds - 100e-9).abs() < 1e-15);
        assert_eq!(s("a").calls, 2);
        assert!((s("a").self_seconds - 50e-9).abs() < 1e-15);
        assert!((s("c").self_seconds - 1000e-9).abs() < 1e-15);
        assert_eq!(p.by_self_time()[0].0, "c");
        assert!(OpProfile::parse("x\ty", Path::new("bad")).is_err());
    }

    #[test]
    fn profiles_a_matmul() {
        let p = Profiler::start().unwrap();
        let a = tch::Tensor::ones([64, 64], (tch::Kind::Float, tch::Device::Cpu));
        let _ = a.matmul(&a);
        let dir = std::env::temp_dir().join(format!("dg-profile-{}", std::process::id()));
        let prof = p.stop(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        assert!(
            prof.ops.contains_key("aten::matmul"),
            "{:?}",
            prof.ops.keys()
        );
    }
}
