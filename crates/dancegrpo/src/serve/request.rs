//! A generation request of the server's JSON API, read and checked: every
//! refusal names the field (the server answers it with 400).

use serde::Deserialize;

/// The limits and defaults a server applies to requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest image side in pixels.
    pub max_side: i64,
    /// Most ODE steps.
    pub max_steps: i64,
    /// Longest prompt in characters.
    pub max_prompt: usize,
    /// Steps when the request names none.
    pub default_steps: i64,
    /// Side when the request names none.
    pub default_side: i64,
    /// Guidance when the request names none.
    pub default_guidance: f64,
}

/// A checked request: one image.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// The prompt.
    pub prompt: String,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Image height and width in pixels (multiples of 16).
    pub height: i64,
    /// See `height`.
    pub width: i64,
    /// ODE steps.
    pub steps: i64,
    /// Guidance of a guidance-distilled model.
    pub guidance: f64,
}

impl GenRequest {
    /// Whether `other` can share a model batch with this request (same
    /// shape, steps and guidance).
    pub fn batches_with(&self, other: &GenRequest) -> bool {
        (self.height, self.width, self.steps) == (other.height, other.width, other.steps)
            && self.guidance == other.guidance
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    prompt: String,
    #[serde(default)]
    seed: u64,
    height: Option<i64>,
    width: Option<i64>,
    steps: Option<i64>,
    guidance: Option<f64>,
}

/// Reads the JSON `body` of a request, or says why it is refused.
pub fn parse(body: &[u8], limits: &Limits) -> Result<GenRequest, String> {
    let body: Body =
        serde_json::from_slice(body).map_err(|e| format!("invalid request JSON: {e}"))?;
    let side = |name: &str, v: Option<i64>| {
        let v = v.unwrap_or(limits.default_side);
        match v >= 16 && v <= limits.max_side && v % 16 == 0 {
            true => Ok(v),
            false => Err(format!(
                "{name}: must be a multiple of 16 in 16..={}, got {v}",
                limits.max_side
            )),
        }
    };
    let steps = body.steps.unwrap_or(limits.default_steps);
    if !(1..=limits.max_steps).contains(&steps) {
        return Err(format!(
            "steps: must be in 1..={}, got {steps}",
            limits.max_steps
        ));
    }
    let guidance = body.guidance.unwrap_or(limits.default_guidance);
    if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
        return Err(format!("guidance: must be in 0..=100, got {guidance}"));
    }
    if body.prompt.trim().is_empty() || body.prompt.chars().count() > limits.max_prompt {
        return Err(format!(
            "prompt: must hold 1 to {} characters, got {}",
            limits.max_prompt,
            body.prompt.chars().count()
        ));
    }
    Ok(GenRequest {
        height: side("height", body.height)?,
        width: side("width", body.width)?,
        prompt: body.prompt,
        seed: body.seed,
        steps,
        guidance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_side: 256,
            max_steps: 100,
            max_prompt: 50,
            default_steps: 8,
            default_side: 64,
            default_guidance: 3.5,
        }
    }

    #[test]
    fn requests_are_read_with_defaults_and_refused_naming_the_field() {
        let r = parse(br#"{"prompt": "a red circle", "seed": 7}"#, &limits()).unwrap();
        assert_eq!(
            (r.height, r.width, r.steps, r.guidance, r.seed),
            (64, 64, 8, 3.5, 7)
        );
        let r2 = parse(br#"{"prompt": "x", "steps": 8, "height": 64}"#, &limits()).unwrap();
        assert!(r.batches_with(&r2));
        let r3 = parse(br#"{"prompt": "x", "width": 128}"#, &limits()).unwrap();
        assert!(!r.batches_with(&r3));
        for (body, needle) in [
            (&b"{not json"[..], "invalid request JSON"),
            (br#"{"seed": 1}"#, "missing field `prompt`"),
            (br#"{"prompt": "x", "colour": 1}"#, "unknown field `colour`"),
            (
                br#"{"prompt": "x", "height": 100}"#,
                "height: must be a multiple of 16",
            ),
            (br#"{"prompt": "x", "width": 4096}"#, "width"),
            (
                br#"{"prompt": "x", "steps": 0}"#,
                "steps: must be in 1..=100",
            ),
            (br#"{"prompt": "x", "guidance": -1}"#, "guidance"),
            (br#"{"prompt": "   "}"#, "prompt: must hold"),
            (br#"{"prompt": "x", "seed": -3}"#, "invalid request JSON"),
        ] {
            let err = parse(body, &limits()).unwrap_err();
            assert!(
                err.contains(needle),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
