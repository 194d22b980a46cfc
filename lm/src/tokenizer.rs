//! `Tokenizer`: the `tokenizers` crate over a `tokenizer.json`, with Gemma's
//! special tokens looked up by their strings, and BPE training for the demo.

use crate::chat::template::{self, ChatTemplate, TemplateFiles, TemplateOrigin};
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Encoding, ModelWrapper};

/// The special tokens of Gemma, in the id order Gemma's vocabulary has them
/// (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3), then the turn markers.
pub const SPECIAL_TOKENS: [&str; 6] =
    ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"];

/// Ids of the special tokens, read from the tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub pad: i64,
    pub eos: i64,
    pub bos: i64,
    pub start_of_turn: i64,
    pub end_of_turn: i64,
}

/// The process-wide default of [`Tokenizer::parse_special_tokens`]: off, so
/// that message content is always text (see [`set_parse_special_tokens_default`]).
static PARSE_SPECIAL_TOKENS_DEFAULT: AtomicBool = AtomicBool::new(false);

/// Sets the default of [`Tokenizer::parse_special_tokens`] for tokenizers
/// loaded after this call (the CLI's `--parse-special-tokens` flag).
pub fn set_parse_special_tokens_default(parse: bool) {
    PARSE_SPECIAL_TOKENS_DEFAULT.store(parse, Ordering::Relaxed);
}

/// The default of [`Tokenizer::parse_special_tokens`] for tokenizers loaded now.
pub fn parse_special_tokens_default() -> bool {
    PARSE_SPECIAL_TOKENS_DEFAULT.load(Ordering::Relaxed)
}

/// A tokenizer with Gemma's special tokens.
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub special: SpecialIds,
    /// Whether special-token strings inside message content (`<end_of_turn>`,
    /// `<start_of_turn>`, ...) become control tokens, as transformers'
    /// `apply_chat_template` does. Off by default: content is text, so user
    /// text cannot forge a turn. Only [`crate::chat::encode`] reads it.
    pub parse_special_tokens: bool,
    /// `inner` with special-token parsing off, made on first use.
    text_only: OnceLock<tokenizers::Tokenizer>,
    /// The chat template of the directory the tokenizer was loaded from;
    /// `None` renders with the built-in Gemma formatter ([`crate::chat::render`]),
    /// which is also used when the checkpoint's template is the built-in one.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// Where the template [`crate::chat::encode`] uses came from.
    pub template_origin: TemplateOrigin,
    /// `tokenizer_config.json` and `chat_template.jinja` of that directory,
    /// as read: a checkpoint align writes keeps them as they were.
    pub template_files: TemplateFiles,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("tokenizer file {} does not exist", path.display());
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        let mut tok = Self::new(inner).with_context(|| format!("tokenizer {}", path.display()))?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        tok.load_chat_template(dir)?;
        Ok(tok)
    }

    /// Takes the chat template of the checkpoint directory `dir`
    /// (`chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template`) and keeps both files' bytes for saving. Without a
    /// template, or with the built-in one, the built-in formatter renders.
    pub fn load_chat_template(&mut self, dir: &Path) -> Result<()> {
        let files = TemplateFiles::read(dir)?;
        let found = template::find(dir, &files)?;
        self.template_files = files;
        match found {
            None => {
                self.chat_template = None;
                self.template_origin = TemplateOrigin::Builtin;
            }
            Some(found) => {
                let bos_is_builtin = found.variables.get("bos_token").is_none_or(|b| b == "<bos>");
                self.template_origin = found.origin.clone();
                self.chat_template = if found.source == template::CHAT_TEMPLATE && bos_is_builtin {
                    None
                } else {
                    Some(Arc::new(ChatTemplate::new(found, &self.inner)?))
                };
            }
        }
        Ok(())
    }

    /// Which chat template renders conversations, for `align inspect`.
    pub fn describe_chat_template(&self) -> String {
        match (&self.template_origin, &self.chat_template) {
            (TemplateOrigin::Builtin, _) => {
                "align's built-in Gemma template (the checkpoint has none)".to_string()
            }
            (origin, None) => {
                format!("the checkpoint's ({origin}), which is align's built-in Gemma template")
            }
            (origin, Some(_)) => format!("the checkpoint's ({origin})"),
        }
    }

    pub fn new(inner: tokenizers::Tokenizer) -> Result<Self> {
        let id = |s: &str| -> Result<i64> {
            inner
                .token_to_id(s)
                .map(i64::from)
                .ok_or_else(|| anyhow!("the tokenizer has no {s:?} token; Gemma's dialogue format needs it"))
        };
        // Gemma 1–3 mark turns with <start_of_turn>/<end_of_turn>, Gemma 4
        // with <|turn>/<turn|>: the end marker is where generation stops.
        let either = |a: &str, b: &str| -> Result<i64> {
            inner.token_to_id(a).or_else(|| inner.token_to_id(b)).map(i64::from).ok_or_else(|| {
                anyhow!(
                    "the tokenizer has neither {a:?} nor {b:?}; Gemma's dialogue format needs a turn marker"
                )
            })
        };
        let special = SpecialIds {
            pad: id("<pad>")?,
            eos: id("<eos>")?,
            bos: id("<bos>")?,
            start_of_turn: either("<start_of_turn>", "<|turn>")?,
            end_of_turn: either("<end_of_turn>", "<turn|>")?,
        };
        Ok(Tokenizer {
            inner,
            special,
            parse_special_tokens: parse_special_tokens_default(),
            text_only: OnceLock::new(),
            chat_template: None,
            template_origin: TemplateOrigin::Builtin,
            template_files: TemplateFiles::default(),
        })
    }

    pub fn vocab_size(&self) -> i64 {
        self.inner.get_vocab_size(true) as i64
    }

    /// Encodes text as is: special-token strings in it become their ids, no
    /// `<bos>` is added.
    pub fn encode_raw(&self, text: &str) -> Result<Encoding> {
        self.inner.encode(text, false).map_err(|e| anyhow!("tokenizer failed to encode text: {e}"))
    }

    /// Encodes text as text: special-token strings in it are spelled with
    /// ordinary tokens, not turned into control tokens (transformers'
    /// `split_special_tokens=True`). No `<bos>` is added. Added tokens that
    /// are not special are still matched, as in [`Self::encode_raw`].
    pub fn encode_text(&self, text: &str) -> Result<Encoding> {
        let t = self.text_only.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        t.encode(text, false).map_err(|e| anyhow!("tokenizer failed to encode text: {e}"))
    }

    /// Encodes a user's or a data file's text (a pretraining document) as
    /// [`Self::parse_special_tokens`] says: as text (the default), or with
    /// special-token strings as control tokens.
    pub fn encode_content(&self, text: &str) -> Result<Vec<i64>> {
        let enc = if self.parse_special_tokens { self.encode_raw(text)? } else { self.encode_text(text)? };
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        Ok(self.encode_raw(text)?.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Decodes ids; special tokens are skipped when `skip_special`.
    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, skip_special).map_err(|e| anyhow!("tokenizer failed to decode: {e}"))
    }

    pub fn id_to_token(&self, id: i64) -> String {
        self.inner.id_to_token(id as u32).unwrap_or_else(|| format!("<id {id}>"))
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.inner.to_string(true).map_err(|e| anyhow!("cannot serialise tokenizer: {e}"))?;
        crate::fsio::write_atomic(path, text.as_bytes())
    }

    /// Trains a byte-level BPE tokenizer on `texts` with Gemma's special
    /// tokens at ids 0..6 and a post-processor that prepends `<bos>` when
    /// special tokens are requested (as Gemma's does).
    pub fn train_bpe<I, S>(texts: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let specials: Vec<AddedToken> =
            SPECIAL_TOKENS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
        let min_vocab = 256 + SPECIAL_TOKENS.len();
        if vocab_size < min_vocab {
            bail!("vocab_size {vocab_size} is too small: a byte-level BPE needs at least {min_vocab}");
        }
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut tok = tokenizers::Tokenizer::new(ModelWrapper::BPE(BPE::default()));
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        tok.train(&mut trainer, texts).map_err(|e| anyhow!("BPE training failed: {e}"))?;
        let bos_id = tok.token_to_id("<bos>").ok_or_else(|| anyhow!("training lost the <bos> token"))?;
        let post = TemplateProcessing::builder()
            .try_single("<bos> $A")
            .map_err(|e| anyhow!("{e}"))?
            .try_pair("<bos> $A $B")
            .map_err(|e| anyhow!("{e}"))?
            .special_tokens(vec![("<bos>", bos_id)])
            .build()
            .map_err(|e| anyhow!("{e}"))?;
        tok.with_post_processor(Some(post));
        Self::new(tok)
    }
}

#[cfg(test)]
mod turn_marker_tests {
    use super::*;

    fn word_level(tokens: &[&str]) -> Result<Tokenizer> {
        let vocab: std::collections::HashMap<String, u32> =
            tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .map_err(|e| anyhow!("{e}"))?;
        Tokenizer::new(tokenizers::Tokenizer::new(model))
    }

    /// A Gemma 4 vocabulary marks turns with <|turn>/<turn|>: generation
    /// stops at <turn|>; a vocabulary with neither is refused naming both.
    #[test]
    fn gemma4_turn_markers_are_found() {
        let t = word_level(&["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]).unwrap();
        assert_eq!((t.special.start_of_turn, t.special.end_of_turn), (4, 5));
        let e = word_level(&["<pad>", "<eos>", "<bos>", "<unk>"]).err().unwrap().to_string();
        assert!(e.contains("\"<start_of_turn>\" nor \"<|turn>\""), "{e}");
    }
}
