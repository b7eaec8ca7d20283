//! `tokenizer.json` through the tokenizers crate, plus readable per-token display strings.
//!
//! Byte-level BPE pieces (`Ġthe`, `æĹ¥`) are mapped back to their bytes; a piece that ends
//! inside a multi-byte UTF-8 character (common for Japanese) shows its dangling bytes as
//! `\xNN` rather than a replacement character, so every token stays distinguishable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A token's `(start, end)` byte offsets in the encoded text.
pub type ByteRange = (usize, usize);

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// GPT-2's byte ↔ printable-char table, when the tokenizer is byte-level.
    byte_decoder: Option<HashMap<char, u8>>,
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join(TOKENIZER_FILE))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "tokenizer",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let byte_level = text.contains("\"ByteLevel\"");
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            byte_decoder: byte_level.then(|| {
                bytes_to_unicode()
                    .into_iter()
                    .map(|(b, c)| (c, b))
                    .collect()
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Ids of the tokens the tokenizer marks special (BOS, EOS, padding, …).
    pub fn special_token_ids(&self) -> Vec<u32> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes with the tokenizer's own post-processor (so BOS is added where the model's
    /// tokenizer adds it, as `tokenizer(text)` does in transformers).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes like [`Self::encode`] and also returns each token's byte range in `text`, to
    /// map character-level labels (a subject, an entity) onto tokens.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let enc = self.inner.encode(text, true).map_err(|e| self.error(e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| self.error(e))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A readable string for one token: its bytes as text, invalid UTF-8 bytes as `\xNN`.
    pub fn token_display(&self, id: u32) -> String {
        let Some(piece) = self.inner.id_to_token(id) else {
            return format!("<unk:{id}>");
        };
        if let Some(table) = &self.byte_decoder {
            // Added/special tokens are stored verbatim, not byte-mapped.
            if let Some(bytes) = piece
                .chars()
                .map(|c| table.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
            {
                return display_bytes(&bytes);
            }
            return piece;
        }
        // SentencePiece style: `▁` is a space, `<0xNN>` a raw byte.
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|s| s.strip_suffix('>'))
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            return display_bytes(&[b]);
        }
        piece.replace('▁', " ")
    }

    pub fn tokens_display(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&id| self.token_display(id)).collect()
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

/// Renders bytes as UTF-8 where valid and `\xNN` for each byte that is not; control
/// characters are escaped (`\n`, `\t`, `\xNN`) so a token never breaks a line or a table.
fn display_bytes(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() && (c as u32) < 0x100 => {
                    out.push_str(&format!("\\x{:02X}", c as u32))
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// GPT-2's reversible map from bytes to printable characters (as in `bytes_to_unicode`).
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256u32;
    (0u8..=255)
        .map(|b| {
            if printable(b) {
                (b, char::from(b))
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                (b, c)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_with_gpt2_space() {
        let table = bytes_to_unicode();
        let chars: std::collections::HashSet<char> = table.iter().map(|(_, c)| *c).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(table[b' ' as usize].1, 'Ġ');
    }

    #[test]
    fn partial_utf8_shows_hex_bytes() {
        // "日" is E6 97 A5; a piece holding its first two bytes only.
        assert_eq!(display_bytes(&[0xE6, 0x97]), "\\xE6\\x97");
        assert_eq!(display_bytes("日本".as_bytes()), "日本");
        assert_eq!(display_bytes(b"a\nb\x01"), "a\\nb\\x01");
    }
}
