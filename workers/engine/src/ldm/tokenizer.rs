//! The CLIP BPE tokenizer of Stable Diffusion 1.x through the `tokenizers` crate, loaded from
//! the model's own files: `tokenizer.json`, or the `vocab.json` + `merges.txt` pair that SD
//! checkpoints ship in `tokenizer/` (the pipeline transformers' `CLIPTokenizerFast` builds:
//! NFC → collapse whitespace → lower-case; split on CLIP's regex; byte-level; BPE with the
//! `</w>` end-of-word suffix). Encoding gives `[BOS] tokens… [EOS] [PAD]…`, truncated and
//! padded to the context length (77), as diffusers' pipelines call it.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::error::{EngineError, Result};

/// CLIP's pre-tokenisation pattern (openai/CLIP `simple_tokenizer.py`).
pub const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

fn terr(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// The ids of `text` without special tokens.
fn tokenize(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tokenizer.encode(text, false).map_err(terr)?;
    Ok(enc.get_ids().to_vec())
}

/// `[first] ids… [last] [pad]…` of exactly `max_len` ids; over-long input is truncated and
/// keeps `last`.
fn frame(mut ids: Vec<u32>, (first, last, pad): (u32, u32, u32), max_len: usize) -> Vec<u32> {
    ids.truncate(max_len - 2);
    let mut out = Vec::with_capacity(max_len);
    out.push(first);
    out.extend(ids);
    out.push(last);
    out.resize(max_len, pad);
    out
}

/// CLIP tokenizer with SD's framing (BOS, EOS, padding to a fixed length).
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

impl ClipTokenizer {
    /// Loads a tokenizer directory: `tokenizer.json` if present, else `vocab.json` +
    /// `merges.txt`. The pad token is read from `special_tokens_map.json` or
    /// `tokenizer_config.json` when present (SD 1.5 pads with `<|endoftext|>`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer = if dir.join("tokenizer.json").is_file() {
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(terr)?
        } else {
            Self::build_bpe(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        };
        let mut pad_token = None;
        for f in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(f);
            if pad_token.is_none() && p.is_file() {
                let v: serde_json::Value = crate::weights::read_json(&p)?;
                pad_token = match &v["pad_token"] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(o) => {
                        o.get("content").and_then(|c| c.as_str()).map(String::from)
                    }
                    _ => None,
                };
            }
        }
        let max_len = 77;
        Self::from_tokenizer(tokenizer, pad_token.as_deref(), max_len)
    }

    /// Builds the fast CLIP tokenizer from `vocab.json` and `merges.txt`.
    pub fn build_bpe(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
        for p in [vocab, merges] {
            if !p.is_file() {
                return Err(EngineError::Tokenizer(format!(
                    "{} does not exist",
                    p.display()
                )));
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .end_of_word_suffix("</w>".into())
            .unk_token("<|endoftext|>".into())
            .build()
            .map_err(terr)?;
        let mut tok = Tokenizer::new(bpe);
        tok.with_normalizer(Some(NormSeq::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(terr)?
            .into(),
            Lowercase.into(),
        ])))
        .map_err(terr)?;
        tok.with_pre_tokenizer(Some(PreSeq::new(vec![
            Split::new(
                SplitPattern::Regex(CLIP_PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(terr)?
            .into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        Ok(tok)
    }

    /// Wraps a `tokenizers` tokenizer; BOS/EOS are `<|startoftext|>`/`<|endoftext|>`, the pad
    /// token defaults to EOS.
    pub fn from_tokenizer(tokenizer: Tokenizer, pad: Option<&str>, max_len: usize) -> Result<Self> {
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| EngineError::Tokenizer(format!("vocabulary has no {t:?} token")))
        };
        let bos = id("<|startoftext|>")?;
        let eos = id("<|endoftext|>")?;
        let pad = match pad {
            Some(p) => id(p)?,
            None => eos,
        };
        if max_len < 2 {
            return Err(EngineError::Tokenizer("max_len must be at least 2".into()));
        }
        Ok(Self {
            tokenizer,
            bos,
            eos,
            pad,
            max_len,
        })
    }

    /// The ids of `text` without framing.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        tokenize(&self.tokenizer, text)
    }

    /// `[BOS] ids… [EOS] [PAD]…` of exactly `max_len` ids (over-long text is truncated,
    /// keeping the EOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(frame(
            self.tokenize(text)?,
            (self.bos, self.eos, self.pad),
            self.max_len,
        ))
    }

    /// The id of a token string (e.g. a placeholder token), if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// BOS, EOS and pad ids.
    pub fn special_ids(&self) -> (u32, u32, u32) {
        (self.bos, self.eos, self.pad)
    }

    /// The fixed sequence length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// The WordPiece tokenizer of the LDM text encoder (bert-base-uncased rules, as the official
/// `BERTTokenizer` calls `BertTokenizerFast`: clean text, CJK spacing, lower-case with accent
/// stripping, split on whitespace and punctuation, WordPiece with `##` continuations and
/// `[UNK]`), built from the `vocab.txt` that comes with the model (one token per line, the id
/// is the line number). Encoding gives `[CLS] tokens… [SEP]` padded with id 0 to the context
/// length (77), truncated keeping `[SEP]` — the official `truncation=True,
/// padding="max_length"` call.
pub struct WordPieceTokenizer {
    tokenizer: Tokenizer,
    cls: u32,
    sep: u32,
    pad: u32,
    max_len: usize,
}

impl WordPieceTokenizer {
    /// Loads `vocab.txt` (bert-base-uncased's, or any vocabulary holding `[CLS]`, `[SEP]`,
    /// `[PAD]` and `[UNK]`).
    pub fn from_vocab(vocab: &Path, max_len: usize) -> Result<Self> {
        use tokenizers::models::wordpiece::WordPiece;
        use tokenizers::normalizers::bert::BertNormalizer;
        use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
        if !vocab.is_file() {
            return Err(EngineError::Tokenizer(format!(
                "{} does not exist (the WordPiece vocabulary, bert-base-uncased's vocab.txt)",
                vocab.display()
            )));
        }
        let wp = WordPiece::from_file(&vocab.to_string_lossy())
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", vocab.display())))?;
        let mut tokenizer = Tokenizer::new(wp);
        tokenizer
            .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .map_err(terr)?;
        tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
        let id = |t: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| {
                EngineError::Tokenizer(format!("{} has no {t:?} token", vocab.display()))
            })
        };
        let (cls, sep, pad) = (id("[CLS]")?, id("[SEP]")?, id("[PAD]")?);
        id("[UNK]")?;
        if max_len < 2 {
            return Err(EngineError::Tokenizer("max_len must be at least 2".into()));
        }
        Ok(Self {
            tokenizer,
            cls,
            sep,
            pad,
            max_len,
        })
    }

    /// The ids of `text` without framing.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        tokenize(&self.tokenizer, text)
    }

    /// `[CLS] ids… [SEP] [PAD]…` of exactly `max_len` ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(frame(
            self.tokenize(text)?,
            (self.cls, self.sep, self.pad),
            self.max_len,
        ))
    }

    /// The id of a token string (e.g. the placeholder `*`), if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// `[CLS]`, `[SEP]` and `[PAD]` ids.
    pub fn special_ids(&self) -> (u32, u32, u32) {
        (self.cls, self.sep, self.pad)
    }

    /// The fixed sequence length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}
