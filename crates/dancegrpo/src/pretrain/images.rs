//! Procedurally generated training images: a smooth two-colour background
//! gradient with one to three filled shapes (circles or squares, edges
//! anti-aliased over one pixel) in a small palette.
//!
//! Image `index` belongs to class `index % classes`. A class fixes the
//! background colours, the gradient direction, the shape kind and the shape
//! colour (a pure function of `(seed, class)`); an image draws the number,
//! positions and sizes of its shapes and jitters the gradient (a pure function
//! of `(seed, index)`). Nothing depends on the order images are asked for.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::rng::Philox;

/// The palette, RGB in [0, 1].
const PALETTE: [[f32; 3]; 10] = [
    [0.90, 0.20, 0.20], // red
    [0.20, 0.70, 0.30], // green
    [0.20, 0.35, 0.90], // blue
    [0.95, 0.85, 0.20], // yellow
    [0.20, 0.80, 0.85], // cyan
    [0.80, 0.30, 0.80], // magenta
    [0.95, 0.95, 0.95], // white
    [0.10, 0.10, 0.12], // near black
    [0.95, 0.55, 0.15], // orange
    [0.55, 0.40, 0.25], // brown
];

/// The kind of shape a class draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeKind {
    /// Filled discs.
    Circle,
    /// Filled axis-aligned squares.
    Square,
}

/// What a class fixes.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassStyle {
    /// Background colour at the start of the gradient.
    pub from: [f32; 3],
    /// Background colour at its end.
    pub to: [f32; 3],
    /// Gradient direction (radians).
    pub angle: f32,
    /// The shapes drawn.
    pub shape: ShapeKind,
    /// Their colour.
    pub colour: [f32; 3],
}

/// One shape of an image, in pixels.
#[derive(Debug, Clone, Copy)]
struct Shape {
    cx: f32,
    cy: f32,
    /// Radius (circle) or half side (square).
    r: f32,
}

/// A seeded, deterministic source of procedural RGB images.
#[derive(Debug, Clone)]
pub struct ProceduralImages {
    seed: u64,
    size: i64,
    classes: u64,
}

impl ProceduralImages {
    /// Images of `size` x `size` pixels in `classes` classes under `seed`.
    pub fn new(seed: u64, size: i64, classes: u64) -> Result<Self> {
        if size < 8 || classes == 0 {
            return Err(Error::Input(format!(
                "procedural images need size >= 8 and >= 1 class, got size {size}, {classes} classes"
            )));
        }
        Ok(ProceduralImages {
            seed,
            size,
            classes,
        })
    }

    /// Number of classes.
    pub fn classes(&self) -> u64 {
        self.classes
    }

    /// The class of image `index`.
    pub fn class_of(&self, index: u64) -> u64 {
        index % self.classes
    }

    /// The style of `class` (a pure function of the seed and the class).
    pub fn style(&self, class: u64) -> ClassStyle {
        let mut rng = Philox::for_stream(self.seed, &format!("procedural/class/{class}"));
        let n = PALETTE.len();
        // three distinct palette entries: background from/to and the shapes
        let a = pick(&mut rng, n);
        let b = (a + 1 + pick(&mut rng, n - 1)) % n;
        let mut c = pick(&mut rng, n);
        while c == a || c == b {
            c = (c + 1) % n;
        }
        ClassStyle {
            from: PALETTE[a],
            to: PALETTE[b],
            angle: (rng.uniform() * std::f64::consts::TAU) as f32,
            shape: if class % 2 == 0 {
                ShapeKind::Circle
            } else {
                ShapeKind::Square
            },
            colour: PALETTE[c],
        }
    }

    /// Image `index` as float32 `(3, size, size)` in [-1, 1].
    pub fn image(&self, index: u64) -> Tensor {
        let style = self.style(self.class_of(index));
        let mut rng = Philox::for_stream(self.seed, &format!("procedural/image/{index}"));
        let s = self.size as f32;
        let angle = style.angle + (rng.uniform() as f32 - 0.5) * 0.6;
        let count = 1 + pick(&mut rng, 3);
        let shapes: Vec<Shape> = (0..count)
            .map(|_| {
                let r = s * (0.10 + 0.12 * rng.uniform() as f32);
                Shape {
                    cx: r + (s - 2.0 * r) * rng.uniform() as f32,
                    cy: r + (s - 2.0 * r) * rng.uniform() as f32,
                    r,
                }
            })
            .collect();
        let pixels = render(&style, angle, &shapes, self.size as usize);
        Tensor::from_slice(&pixels).view([3, self.size, self.size]) * 2.0 - 1.0
    }

    /// Images `indices` stacked `(b, 3, size, size)` in [-1, 1], with their classes.
    pub fn batch(&self, indices: &[u64]) -> (Tensor, Vec<u64>) {
        let images: Vec<Tensor> = indices.iter().map(|&i| self.image(i)).collect();
        let classes = indices.iter().map(|&i| self.class_of(i)).collect();
        (Tensor::stack(&images, 0), classes)
    }
}

/// A uniform integer in `0..n`.
fn pick(rng: &mut Philox, n: usize) -> usize {
    ((rng.uniform() * n as f64) as usize).min(n - 1)
}

/// Channel-major RGB pixels `(3, n, n)` in [0, 1].
fn render(style: &ClassStyle, angle: f32, shapes: &[Shape], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; 3 * n * n];
    let (dx, dy) = (angle.cos(), angle.sin());
    let half = n as f32 / 2.0;
    for y in 0..n {
        for x in 0..n {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            // gradient position in [0, 1] along (dx, dy) through the centre
            let g = (((px - half) * dx + (py - half) * dy) / (half * 1.42) + 1.0) / 2.0;
            let g = g.clamp(0.0, 1.0);
            let cover = shapes
                .iter()
                .map(|sh| coverage(style.shape, sh, px, py))
                .fold(0f32, f32::max);
            for ch in 0..3 {
                let bg = style.from[ch] * (1.0 - g) + style.to[ch] * g;
                out[ch * n * n + y * n + x] = bg * (1.0 - cover) + style.colour[ch] * cover;
            }
        }
    }
    out
}

/// How much of the pixel centred at `(px, py)` the shape covers (linear over one pixel).
fn coverage(kind: ShapeKind, sh: &Shape, px: f32, py: f32) -> f32 {
    let (ax, ay) = ((px - sh.cx).abs(), (py - sh.cy).abs());
    let distance = match kind {
        ShapeKind::Circle => (ax * ax + ay * ay).sqrt() - sh.r,
        ShapeKind::Square => ax.max(ay) - sh.r,
    };
    (0.5 - distance).clamp(0.0, 1.0)
}

/// Images `(b, 3, H, W)` in [-1, 1] -> uint8 `(b, H, W, 3)` for PNG grids.
pub fn to_uint8(images: &Tensor) -> Tensor {
    crate::models::vae::to_uint8(&images.to_kind(Kind::Float))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_deterministic_and_differ_by_index() {
        let gen = ProceduralImages::new(7, 32, 4).unwrap();
        let a = gen.image(5);
        assert_eq!(a.size(), [3, 32, 32]);
        assert!(a.equal(&ProceduralImages::new(7, 32, 4).unwrap().image(5)));
        // the same image whatever was generated before, and in a batch
        let (batch, classes) = gen.batch(&[9, 5]);
        assert!(batch.get(1).equal(&a));
        assert_eq!(classes, [1, 1]);
        assert!(!gen.image(6).equal(&a), "another index, another image");
        assert!(!gen.image(9).equal(&a), "same class, another image");
        assert!(!ProceduralImages::new(8, 32, 4).unwrap().image(5).equal(&a));
        let (lo, hi) = (a.min().double_value(&[]), a.max().double_value(&[]));
        assert!((-1.0..=1.0).contains(&lo) && (-1.0..=1.0).contains(&hi) && hi - lo > 0.3);
    }

    #[test]
    fn classes_fix_the_style() {
        let gen = ProceduralImages::new(0, 16, 16).unwrap();
        for c in 0..16 {
            let st = gen.style(c);
            assert_ne!(st.from, st.to);
            assert!(st.colour != st.from && st.colour != st.to);
            let want = if c % 2 == 0 {
                ShapeKind::Circle
            } else {
                ShapeKind::Square
            };
            assert_eq!(st.shape, want);
        }
        assert_ne!(gen.style(0), gen.style(2));
        assert_eq!(gen.class_of(35), 3);
        assert!(ProceduralImages::new(0, 4, 1).is_err());
        assert!(ProceduralImages::new(0, 16, 0).is_err());
    }

    #[test]
    fn a_shape_covers_its_pixels() {
        let sh = Shape {
            cx: 8.0,
            cy: 8.0,
            r: 3.0,
        };
        assert_eq!(coverage(ShapeKind::Circle, &sh, 8.5, 8.5), 1.0);
        assert_eq!(coverage(ShapeKind::Circle, &sh, 14.5, 8.5), 0.0);
        // the corner (10.5, 10.5) is inside the square, outside the circle
        assert_eq!(coverage(ShapeKind::Square, &sh, 10.5, 10.5), 1.0);
        assert_eq!(coverage(ShapeKind::Circle, &sh, 10.5, 10.5), 0.0);
    }
}
