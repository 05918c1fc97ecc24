//! libjpeg-turbo's baseline encoder, called through `mozjpeg-sys` the way
//! Pillow's `JpegEncode.c` calls it, so that the JPEG reward's sizes are the
//! reference's byte for byte (the reasons: [`super::jpeg`]).
//!
//! Hand-written FFI because the safe `mozjpeg` wrapper cannot force baseline
//! quantisation tables (Pillow's `jpeg_set_quality(.., TRUE)`; below quality
//! ~24 the tables differ) and starts from mozjpeg's own defaults.

use std::ffi::{c_int, c_ulong};
use std::mem;
use std::panic::{catch_unwind, AssertUnwindSafe};

use mozjpeg_sys as ffi;

/// Chroma sampling factors per component, luma first: `(h, v)`.
pub(crate) type Sampling = [(c_int, c_int); 3];

/// Encodes `rgb` (`height` rows of `width` RGB pixels; the caller checked the
/// sides are in 1..=65500 and the length is `width * height * 3`).
pub(crate) fn encode(
    rgb: &[u8],
    width: u32,
    height: u32,
    quality: u8,
    sampling: Sampling,
) -> Result<Vec<u8>, String> {
    debug_assert_eq!(rgb.len(), width as usize * height as usize * 3);
    // libjpeg reports errors by calling `error_exit`, which unwinds to here
    catch_unwind(AssertUnwindSafe(|| unsafe {
        encode_unchecked(rgb, width, height, quality, sampling)
    }))
    .map_err(|p| match p.downcast::<String>() {
        Ok(msg) => *msg,
        Err(_) => "libjpeg failed".to_string(),
    })
}

/// Owns the compressor and libjpeg's output buffer; frees both on every exit.
struct Compressor {
    cinfo: ffi::jpeg_compress_struct,
    out: *mut u8,
    out_len: c_ulong,
}

impl Drop for Compressor {
    fn drop(&mut self) {
        unsafe {
            ffi::jpeg_destroy_compress(&mut self.cinfo);
            if !self.out.is_null() {
                libc::free(self.out.cast());
            }
        }
    }
}

unsafe fn encode_unchecked(
    rgb: &[u8],
    width: u32,
    height: u32,
    quality: u8,
    sampling: Sampling,
) -> Vec<u8> {
    let mut err: Box<ffi::jpeg_error_mgr> = Box::new(mem::zeroed());
    ffi::jpeg_std_error(&mut err);
    err.error_exit = Some(error_exit);
    err.emit_message = Some(no_message);
    // boxed: libjpeg keeps pointers to the struct and to the buffer fields
    let mut c = Box::new(Compressor {
        cinfo: mem::zeroed(),
        out: std::ptr::null_mut(),
        out_len: 0,
    });
    c.cinfo.common.err = &mut *err;
    ffi::jpeg_create_compress(&mut c.cinfo);
    let Compressor {
        cinfo,
        out,
        out_len,
    } = &mut *c;
    ffi::jpeg_mem_dest(cinfo, out, out_len);
    cinfo.image_width = width;
    cinfo.image_height = height;
    cinfo.input_components = 3;
    cinfo.in_color_space = ffi::J_COLOR_SPACE::JCS_RGB;
    // libjpeg-turbo's defaults (baseline; no trellis, progressive scans or Huffman optimisation)
    ffi::jpeg_c_set_int_param(
        cinfo,
        ffi::J_INT_PARAM::JINT_COMPRESS_PROFILE,
        ffi::JINT_COMPRESS_PROFILE_VALUE::JCP_FASTEST as c_int,
    );
    ffi::jpeg_set_defaults(cinfo);
    ffi::jpeg_set_quality(cinfo, c_int::from(quality), 1); // force_baseline, as Pillow
    let comps = std::slice::from_raw_parts_mut(cinfo.comp_info, 3);
    for (comp, (h, v)) in comps.iter_mut().zip(sampling) {
        comp.h_samp_factor = h;
        comp.v_samp_factor = v;
    }
    ffi::jpeg_start_compress(cinfo, 1);
    let stride = width as usize * 3;
    for row in rgb.chunks_exact(stride) {
        let ptr = row.as_ptr();
        ffi::jpeg_write_scanlines(cinfo, &ptr, 1);
    }
    ffi::jpeg_finish_compress(cinfo);
    let bytes = std::slice::from_raw_parts(*out, *out_len as usize).to_vec();
    drop(c); // before `err`, which the compressor points to
    bytes
}

unsafe extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    let code = cinfo.err.as_ref().map_or(0, |e| e.msg_code);
    std::panic::resume_unwind(Box::new(format!("libjpeg error code {code}")));
}

unsafe extern "C-unwind" fn no_message(_cinfo: &mut ffi::jpeg_common_struct, _level: c_int) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libjpeg_errors_come_back_as_errors() {
        let rgb = vec![7u8; 16 * 16 * 3];
        let ok = encode(&rgb, 16, 16, 95, [(2, 2), (1, 1), (1, 1)]).unwrap();
        assert_eq!(&ok[..2], &[0xFF, 0xD8]); // SOI
        assert_eq!(&ok[ok.len() - 2..], &[0xFF, 0xD9]); // EOI

        // sampling factors above 4 are refused inside jpeg_start_compress
        let err = encode(&rgb, 16, 16, 95, [(5, 5), (1, 1), (1, 1)]).unwrap_err();
        assert!(err.starts_with("libjpeg error code"), "{err}");
        // and the encoder is still usable afterwards
        assert_eq!(
            encode(&rgb, 16, 16, 95, [(2, 2), (1, 1), (1, 1)]).unwrap(),
            ok
        );
    }
}
