//! Images: PNG output of uint8 images (written atomically), PNG encoding in
//! memory, and reading PNG or JPEG files into uint8 `(H, W, 3)` RGB tensors.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;

/// Image in [-1, 1] (b, 3, H, W) -> uint8 (b, H, W, 3): `clamp(x/2 + 0.5, 0, 1) * 255`,
/// rounded half to even (as numpy's `round`).
pub fn to_uint8(image: &Tensor) -> Tensor {
    let x = (image * 0.5 + 0.5)
        .clamp(0.0, 1.0)
        .permute([0, 2, 3, 1])
        .to_kind(crate::nn::upcast_kind(image.kind()));
    (x * 255.0).round().to_kind(Kind::Uint8)
}

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
        encode_rgb_png(out, w as u32, h as u32, &data, png::Compression::Balanced)
    })
}

fn encode_rgb_png<W: std::io::Write>(
    out: W,
    w: u32,
    h: u32,
    data: &[u8],
    compression: png::Compression,
) -> std::io::Result<()> {
    let mut enc = png::Encoder::new(out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(compression);
    let mut writer = enc.write_header().map_err(std::io::Error::other)?;
    writer
        .write_image_data(data)
        .map_err(std::io::Error::other)?;
    writer.finish().map_err(std::io::Error::other)
}

/// Encodes one uint8 image `(H, W, 3)` (any device) as an RGB PNG in memory
/// (fast compression).
pub fn encode_png(image: &Tensor) -> Result<Vec<u8>> {
    let (h, w, _) = image
        .size3()
        .ok()
        .filter(|(h, w, c)| *c == 3 && *h > 0 && *w > 0)
        .filter(|_| image.kind() == Kind::Uint8)
        .ok_or_else(|| {
            Error::Input(format!(
                "PNG encoding: expected a uint8 (H, W, 3) image, got {:?} {:?}",
                image.kind(),
                image.size()
            ))
        })?;
    let data: Vec<u8> = Vec::try_from(
        image
            .to_device(tch::Device::Cpu)
            .contiguous()
            .flatten(0, -1),
    )?;
    let mut out = Vec::new();
    encode_rgb_png(&mut out, w as u32, h as u32, &data, png::Compression::Fast)
        .map_err(|e| Error::Input(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

/// Reads a PNG or JPEG file (by its content, not its name) into a uint8
/// `(H, W, 3)` RGB tensor. Grayscale is replicated to RGB; 16-bit samples are
/// reduced to 8 bits and palettes expanded; images with an alpha channel and
/// CMYK JPEGs are rejected (the error names the file).
pub fn read_image(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Input(format!("{}: {msg}", path.display()));
    let (w, h, channels, data) = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        let mut dec = png::Decoder::new(std::io::Cursor::new(&bytes));
        dec.set_transformations(png::Transformations::normalize_to_color8());
        let mut reader = dec
            .read_info()
            .map_err(|e| bad(format!("invalid PNG: {e}")))?;
        let mut buf = vec![0u8; reader.output_buffer_size().unwrap_or(0)];
        let info = reader
            .next_frame(&mut buf)
            .map_err(|e| bad(format!("invalid PNG: {e}")))?;
        buf.truncate(info.buffer_size());
        let channels = match info.color_type {
            png::ColorType::Grayscale => 1,
            png::ColorType::Rgb => 3,
            other => {
                return Err(bad(format!(
                    "PNG of color type {other:?} ({} channels): only RGB or grayscale images are \
                     scored (flatten the alpha channel first)",
                    other.samples()
                )))
            }
        };
        (info.width as usize, info.height as usize, channels, buf)
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        let mut dec = jpeg_decoder::Decoder::new(std::io::Cursor::new(&bytes));
        let data = dec
            .decode()
            .map_err(|e| bad(format!("invalid JPEG: {e}")))?;
        let info = dec
            .info()
            .ok_or_else(|| bad("JPEG without a frame".into()))?;
        let channels = match info.pixel_format {
            jpeg_decoder::PixelFormat::L8 => 1,
            jpeg_decoder::PixelFormat::RGB24 => 3,
            other => {
                return Err(bad(format!(
                    "JPEG of pixel format {other:?}: only RGB or 8-bit grayscale images are scored"
                )))
            }
        };
        (info.width as usize, info.height as usize, channels, data)
    } else {
        return Err(bad("not a PNG or JPEG file".into()));
    };
    if data.len() != w * h * channels || w == 0 || h == 0 {
        return Err(bad(format!(
            "decoded {} bytes for a {w}x{h} image of {channels} channels",
            data.len()
        )));
    }
    let t = Tensor::from_slice(&data).view([h as i64, w as i64, channels as i64]);
    Ok(if channels == 1 {
        t.expand([h as i64, w as i64, 3], false).contiguous()
    } else {
        t
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
