//! PNG output of uint8 images, written atomically.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;

/// Writes `image` (H, W, 3) uint8 to `path` as an RGB PNG.
pub fn write_png(path: &Path, image: &Tensor) -> Result<()> {
    let (h, w, c) = image
        .size3()
        .ok()
        .filter(|(_, _, c)| *c == 3)
        .ok_or_else(|| {
            Error::Input(format!(
                "write_png {}: expected (H, W, 3), got {:?}",
                path.display(),
                image.size()
            ))
        })?;
    let _ = c;
    let data: Vec<u8> = Vec::try_from(image.to_kind(Kind::Uint8).contiguous().flatten(0, -1))?;
    write_atomic(path, |out| {
        let mut enc = png::Encoder::new(out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(std::io::Error::other)?;
        writer
            .write_image_data(&data)
            .map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    })
}

/// Tiles `images` (n, H, W, 3) into a grid with `cols` columns (n, H, W, 3) -> (rows*H, cols*W, 3).
pub fn grid(images: &Tensor, cols: i64) -> Tensor {
    let (n, h, w, c) = images.size4().expect("(n, H, W, 3) images");
    let rows = (n + cols - 1) / cols;
    let pad = rows * cols - n;
    let all = if pad > 0 {
        Tensor::cat(
            &[
                images.shallow_clone(),
                Tensor::zeros([pad, h, w, c], (images.kind(), images.device())),
            ],
            0,
        )
    } else {
        images.shallow_clone()
    };
    all.view([rows, cols, h, w, c])
        .permute([0, 2, 1, 3, 4])
        .reshape([rows * h, cols * w, c])
}
