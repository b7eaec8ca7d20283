//! Reading and writing files with errors that name them, and writing results safely: never a
//! half-written file under the final name.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads and parses a JSON file; errors name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `value` as pretty JSON to `path`, in place; errors name the file.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Why an empty output path is refused (shared with the CLI's flag parser).
pub const EMPTY_OUTPUT_PATH: &str = "is empty; name the folder or file to write";

/// Refuses an empty output path: it would name the current folder, and writing results there
/// replaces whatever files of the same names it holds.
pub fn require_output_path(what: &'static str, path: &Path) -> Result<()> {
    if path.as_os_str().is_empty() {
        return Err(Error::InvalidArgument {
            what,
            value: String::new(),
            message: EMPTY_OUTPUT_PATH.into(),
        });
    }
    Ok(())
}

/// Writes `tensors` to `path` as safetensors, in place (wrap it in [`write_atomic`] to give
/// a final name only to a complete file); errors name the file.
pub fn write_safetensors(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes through a temporary file in the same folder, then renames into place.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_atomic_with(path, write)
}

/// [`write_atomic`] for any error type that library errors convert into (the CLI's `anyhow`).
pub fn write_atomic_with<E: From<Error>>(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = write(&tmp).and_then(|()| {
        // Some writers create private files; results are for sharing.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e).into())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes 8-bit `pixels` (rows top to bottom, `color`'s channels per pixel) as a PNG file.
pub fn write_png(
    path: &Path,
    width: usize,
    height: usize,
    color: png::ColorType,
    pixels: &[u8],
) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(pixels))
        .map_err(|e| Error::io(path, std::io::Error::other(e)))
}
