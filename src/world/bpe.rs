//! Byte-level BPE trained on the world corpus with the tokenizers crate.
//!
//! GPT-2's pre-tokenizer treats a run of Japanese as one word, so BPE would merge across word
//! boundaries ("は東" in "首都は東京") and an answer would not start on a token. Splitting
//! first on script changes (kanji / hiragana / katakana / Latin) keeps every answer after a
//! particle or a space on a token boundary in both languages.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, TokenizerBuilder};

use crate::error::{Error, Result};

/// The end-of-text token separating documents.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// GPT-2's pattern with script runs split apart (ー, the long-vowel mark, is script Common).
const PRE_TOKENIZE_PATTERN: &str = r"'(?:s|t|re|ve|m|ll|d)| ?\p{Han}+| ?\p{Hiragana}+| ?[\p{Katakana}ー]+| ?\p{Latin}+| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Trains a byte-level BPE of `vocab_size` tokens (including [`EOS_TOKEN`]) on `texts` and
/// writes it as `tokenizer.json` at `path`.
pub fn train_tokenizer<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    vocab_size: usize,
    path: &Path,
) -> Result<()> {
    let err = |message: String| Error::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    if vocab_size < 257 {
        return Err(Error::InvalidArgument {
            what: "vocab size",
            value: vocab_size.to_string(),
            message: "a byte-level BPE needs at least 257 tokens (256 bytes + end of text)".into(),
        });
    }
    let split = Split::new(
        SplitPattern::Regex(PRE_TOKENIZE_PATTERN.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| err(e.to_string()))?;
    let pre_tokenizer = Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ]);
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        ByteLevelDecoder,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre_tokenizer)))
    .with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(
        false, true, false,
    ))))
    .with_decoder(Some(ByteLevelDecoder::default()))
    .build()
    .map_err(|e| err(e.to_string()))?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .build();
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| err(e.to_string()))?;
    let tokenizer: tokenizers::Tokenizer = tokenizer.into();
    tokenizer
        .save(path, true)
        .map_err(|e| err(format!("writing: {e}")))?;
    Ok(())
}
