//! Image operations that match a Python library: PIL's resampling bit for
//! bit, and the image-quality measures (PSNR, SSIM) as scikit-image defines them.

pub mod pil;
pub mod quality;
