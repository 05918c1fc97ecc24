//! Image operations that must match a Python library bit for bit.

pub mod pil;
