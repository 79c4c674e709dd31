//! 8-bit PNG writing (RGB and gray), atomically. Knows nothing about CT or the network.

use super::atomic::write_atomic;
use super::IoError;
use std::path::Path;

/// Writes `rgb` (row-major, 3 bytes per pixel) as an 8-bit RGB PNG.
pub fn write_rgb(path: &Path, width: usize, height: usize, rgb: &[u8]) -> Result<(), IoError> {
    write(path, width, height, rgb, png::ColorType::Rgb, 3)
}

/// Writes `gray` (row-major, 1 byte per pixel) as an 8-bit grayscale PNG.
pub fn write_gray(path: &Path, width: usize, height: usize, gray: &[u8]) -> Result<(), IoError> {
    write(path, width, height, gray, png::ColorType::Grayscale, 1)
}

fn write(
    path: &Path,
    width: usize,
    height: usize,
    pixels: &[u8],
    color: png::ColorType,
    channels: usize,
) -> Result<(), IoError> {
    if width == 0 || height == 0 || width > u32::MAX as usize || height > u32::MAX as usize {
        return Err(IoError::invalid(
            path,
            format!("cannot write a {width}x{height} PNG"),
        ));
    }
    let want = width
        .checked_mul(height)
        .and_then(|n| n.checked_mul(channels));
    if want != Some(pixels.len()) {
        return Err(IoError::invalid(
            path,
            format!(
                "PNG of {width}x{height}x{channels} needs {} bytes, got {}",
                want.map_or("too many".to_string(), |n| n.to_string()),
                pixels.len()
            ),
        ));
    }
    write_atomic(path, |w| {
        let mut enc = png::Encoder::new(w, width as u32, height as u32);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(std::io::Error::other)?;
        writer
            .write_image_data(pixels)
            .map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    })
}
