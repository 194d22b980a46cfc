//! Hugging Face checkpoint directories: `config.json`, `model.safetensors` (or
//! shards with `model.safetensors.index.json`), `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`.
//!
//! Loading checks every tensor's name and shape against the model and names
//! what is missing, unexpected or mis-shaped, then streams each tensor from
//! the memory-mapped files straight into the model's variables, in their
//! dtype and on their device (no random init first, no second copy). Saving
//! streams tensor by tensor into shards of at most `max_shard_bytes` (both
//! in [`crate::safetensors_io`]). Every file is written atomically (temp
//! file + rename), and a whole directory is assembled beside its
//! destination and renamed into place (both in [`crate::fsio`]).

use crate::chat::template::CHAT_TEMPLATE;
use crate::config::{Family, GemmaConfig};
use crate::fsio::{write_atomic, write_dir_atomic};
use crate::model::{Gemma, WeightInit};
use crate::safetensors_io::{self, WeightReader};
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

pub const CONFIG: &str = "config.json";
pub use crate::safetensors_io::{weight_files, TensorEntry, TensorSource, WEIGHTS, WEIGHTS_INDEX};
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";

/// Reads one safetensors file onto the CPU (every tensor at once: for
/// small files; large ones load through [`WeightReader`]).
pub fn read_tensors_file(file: &Path) -> Result<BTreeMap<String, Tensor>> {
    WeightReader::open_files(&[file.to_path_buf()], file)?.read_all()
}

/// The names of the checkpoint's tensors, read from the safetensors headers
/// (or the shard index) without reading any tensor.
pub fn tensor_names(dir: &Path) -> Result<std::collections::BTreeSet<String>> {
    let mut names = std::collections::BTreeSet::new();
    for file in weight_files(dir)? {
        let mut f = std::fs::File::open(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let mut len = [0u8; 8];
        std::io::Read::read_exact(&mut f, &mut len)
            .with_context(|| format!("{} is not a valid safetensors file", file.display()))?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            bail!("{} is not a valid safetensors file: a {len}-byte header", file.display());
        }
        let mut header = vec![0u8; len as usize];
        std::io::Read::read_exact(&mut f, &mut header)
            .with_context(|| format!("{} is not a valid safetensors file", file.display()))?;
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", file.display()))?;
        names.extend(v.into_iter().map(|(k, _)| k).filter(|k| k != "__metadata__"));
    }
    Ok(names)
}

/// Reads every tensor of the checkpoint's safetensors files onto the CPU
/// (for small checkpoints and tests; models load through [`load_from`]).
pub fn read_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    WeightReader::open_dir(dir)?.read_all()
}

/// Writes named tensors to one safetensors file, atomically, streamed
/// tensor by tensor.
pub fn write_tensors_file(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    safetensors_io::write_file(path, tensors, &tensors.entries()?)
}

/// Copies `tensors` into the variables of `vs`, checking names and shapes.
/// `ignore` names tensors that may be present without a variable (a tied
/// `lm_head.weight`).
pub fn load_into(
    vs: &nn::VarStore,
    mut tensors: BTreeMap<String, Tensor>,
    ignore: &[&str],
    origin: &Path,
) -> Result<()> {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let missing: Vec<&str> =
        names.iter().filter(|n| !tensors.contains_key(n.as_str())).map(|n| n.as_str()).collect();
    let unexpected: Vec<&str> = tensors
        .keys()
        .filter(|k| !vars.contains_key(k.as_str()) && !ignore.contains(&k.as_str()))
        .map(|k| k.as_str())
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        let mut msg = format!("checkpoint {} does not match the model:", origin.display());
        if !missing.is_empty() {
            msg.push_str(&format!("\n  missing tensors: {}", missing.join(", ")));
        }
        if !unexpected.is_empty() {
            msg.push_str(&format!("\n  unexpected tensors: {}", unexpected.join(", ")));
        }
        msg.push_str("\n  check that config.json describes these weights");
        bail!(msg);
    }
    tch::no_grad(|| -> Result<()> {
        for name in names {
            let mut var = vars[name].shallow_clone();
            let src = tensors.remove(name).expect("checked above");
            if var.size() != src.size() {
                bail!(
                    "checkpoint {}: tensor {name} has shape {:?}, the model expects {:?}",
                    origin.display(),
                    src.size(),
                    var.size()
                );
            }
            var.f_copy_(&src).with_context(|| format!("copying tensor {name}"))?;
        }
        Ok(())
    })
}

/// A loaded causal LM with its tokenizer.
pub struct Loaded {
    pub vs: nn::VarStore,
    pub model: Gemma,
    pub tokenizer: Tokenizer,
}

/// Reads `config.json` of a checkpoint directory.
pub fn read_config(dir: &Path) -> Result<GemmaConfig> {
    if dir.is_file() {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        bail!(
            "{} is a file; pass the model directory that holds it ({}), not one of its files",
            dir.display(),
            parent.display()
        );
    }
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let path = dir.join(CONFIG);
    let cfg = GemmaConfig::from_file(&path)?;
    cfg.validate().with_context(|| format!("invalid model config {}", path.display()))?;
    Ok(cfg)
}

/// Streams the weights of the checkpoint `dir` (opened as `reader`) into
/// the variables of `vs`, checking names and shapes as [`load_into`] does.
/// `ignore` names tensors that may be present without a variable, `skip`
/// variables filled otherwise (a new head).
pub fn load_from(
    vs: &nn::VarStore,
    reader: &WeightReader,
    ignore: &[&str],
    skip: &[&str],
    origin: &Path,
) -> Result<()> {
    safetensors_io::load_vars(&vs.variables(), reader, ignore, skip, origin)
}

/// Loads a `GemmaForCausalLM` directory onto `device` in `kind`: the model
/// is built without a random init in `kind`, and each tensor is streamed
/// from the memory-mapped files into its variable.
pub fn load_causal_lm(dir: &Path, device: Device, kind: Kind) -> Result<Loaded> {
    let cfg = read_config(dir)?;
    let tokenizer = Tokenizer::from_file(&dir.join(TOKENIZER))?;
    if tokenizer.vocab_size() > cfg.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            cfg.vocab_size
        );
    }
    let reader = WeightReader::open_dir(dir)?;
    let mut vs = nn::VarStore::new(device);
    vs.set_kind(kind);
    let model = Gemma::with_init(&vs.root(), &cfg, WeightInit::Zeros)?;
    let ignore: &[&str] = if cfg.tie_word_embeddings { &["lm_head.weight"] } else { &[] };
    load_from(&vs, &reader, ignore, &[], dir)?;
    Ok(Loaded { vs, model, tokenizer })
}

/// Writes the named tensors as the checkpoint's weights in `dir`, split into
/// shards of at most `max_shard_bytes` (one `model.safetensors` when all fit).
pub fn write_tensors(dir: &Path, tensors: &BTreeMap<String, Tensor>, max_shard_bytes: usize) -> Result<()> {
    safetensors_io::write_sharded(dir, tensors, max_shard_bytes)
}

/// `tokenizer_config.json` for a Gemma tokenizer with our chat template.
pub fn tokenizer_config_json(max_len: i64) -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "add_bos_token": true,
        "add_eos_token": false,
        "padding_side": "left",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": false,
        "chat_template": CHAT_TEMPLATE,
    })
}

/// `generation_config.json`: stop at `<eos>` or `<end_of_turn>`.
pub fn generation_config_json(tok: &Tokenizer) -> serde_json::Value {
    serde_json::json!({
        "bos_token_id": tok.special.bos,
        "eos_token_id": [tok.special.eos, tok.special.end_of_turn],
        "pad_token_id": tok.special.pad,
    })
}

/// The default largest shard: 5 GB, as transformers' `"5GB"`.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// What to write besides the weights.
pub struct SaveOptions {
    /// Largest shard in bytes (default 5 GB, transformers' `"5GB"`); more
    /// weights than this are split.
    pub max_shard_bytes: usize,
    /// `architectures` entry (`GemmaForCausalLM` or `GemmaForSequenceClassification`).
    pub architecture: String,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { max_shard_bytes: DEFAULT_MAX_SHARD_BYTES, architecture: "GemmaForCausalLM".into() }
    }
}

/// A text model's tensors put back into its multimodal checkpoint: `model.X`
/// under the checkpoint's text prefix, and every tensor of the other towers
/// read from the source checkpoint as stored.
struct Wrapped<'a> {
    text: &'a dyn TensorSource,
    prefix: String,
    raw: WeightReader,
    /// The other towers' tensors, by their stored names.
    passthrough: Vec<String>,
}

impl<'a> Wrapped<'a> {
    fn new(text: &'a dyn TensorSource, w: &crate::config::Wrapper) -> Result<Self> {
        let raw = WeightReader::open_dir_raw(&w.source).with_context(|| {
            format!(
                "reading the vision and audio towers of the multimodal checkpoint {} to write them back",
                w.source.display()
            )
        })?;
        let prefix = safetensors_io::TEXT_PREFIXES
            .iter()
            .find(|p| raw.names().any(|n| n.starts_with(*p)))
            .with_context(|| format!("{}: no text model tensors under a known prefix", w.source.display()))?
            .to_string();
        let passthrough =
            raw.names().filter(|n| safetensors_io::text_name(n, &prefix).is_none()).cloned().collect();
        Ok(Wrapped { text, prefix, raw, passthrough })
    }

    fn stored(&self, name: &str) -> String {
        match name.strip_prefix("model.") {
            Some(rest) => format!("{}{rest}", self.prefix),
            None => name.to_string(),
        }
    }
}

impl TensorSource for Wrapped<'_> {
    fn entries(&self) -> Result<Vec<TensorEntry>> {
        let mut out: Vec<TensorEntry> = self
            .text
            .entries()?
            .into_iter()
            .map(|e| TensorEntry { name: self.stored(&e.name), ..e })
            .collect();
        for name in &self.passthrough {
            let (_, st) = self.raw.get(name).context("a listed tensor")?;
            out.push(TensorEntry { name: name.clone(), kind: st.kind, shape: st.shape.clone() });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        if self.passthrough.iter().any(|n| n == name) {
            return self.raw.read(name);
        }
        let public = match name.strip_prefix(self.prefix.as_str()) {
            Some(rest) => format!("model.{rest}"),
            None => name.to_string(),
        };
        self.text.tensor(&public)
    }
}

/// The `architectures` name of `family` for a head given by its Gemma 1
/// name (`GemmaForCausalLM`, `GemmaForSequenceClassification`), as
/// transformers' auto classes map the family's `model_type`; other names
/// are kept as they are. transformers 5.24 has no sequence classifier for
/// `gemma4_text`: a Gemma 4 reward model is written in the same layout
/// (`model.*` and `score.weight`) under `Gemma4TextForSequenceClassification`.
pub fn family_architecture(family: Family, head: &str) -> String {
    let (causal, classifier) = match family {
        Family::Gemma => ("GemmaForCausalLM", "GemmaForSequenceClassification"),
        Family::Gemma2 => ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
        Family::Gemma3 => ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
        Family::Gemma4 => ("Gemma4ForCausalLM", "Gemma4TextForSequenceClassification"),
    };
    match head {
        "GemmaForCausalLM" => causal.into(),
        "GemmaForSequenceClassification" => classifier.into(),
        other => other.into(),
    }
}

/// Writes a complete checkpoint directory atomically. Weights are stored in
/// the dtype they have in `vs`, streamed one tensor at a time.
pub fn save(
    dir: &Path,
    vs: &nn::VarStore,
    cfg: &GemmaConfig,
    tok: &Tokenizer,
    opts: &SaveOptions,
) -> Result<()> {
    save_source(dir, vs, cfg, tok, opts)
}

/// [`save`] of any [`TensorSource`] (weights computed as they are written:
/// a fresh seeded init, LoRA merged into the base, a cast). `torch_dtype`
/// is the dtype of the largest floating-point tensor.
pub fn save_source(
    dir: &Path,
    src: &dyn TensorSource,
    cfg: &GemmaConfig,
    tok: &Tokenizer,
    opts: &SaveOptions,
) -> Result<()> {
    let entries = src.entries()?;
    let kind = entries
        .iter()
        .filter(|e| matches!(e.kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double))
        .max_by_key(|e| e.bytes())
        .map(|e| e.kind)
        .unwrap_or(Kind::Float);
    let mut cfg = cfg.clone();
    cfg.architectures = Some(vec![family_architecture(cfg.family()?, &opts.architecture)]);
    cfg.pad_token_id = Some(tok.special.pad);
    cfg.bos_token_id = Some(tok.special.bos);
    cfg.eos_token_id = Some(serde_json::json!(tok.special.eos));
    let dtype = match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    };
    cfg.extra.insert("torch_dtype".into(), serde_json::json!(dtype));
    cfg.extra.insert("dtype".into(), serde_json::json!(dtype));
    // The text model of a multimodal checkpoint goes back into it: the
    // wrapper's config, the text tensors under its prefix, the other towers
    // copied as they were. A reward model is written as a text model.
    let wrapped = match &cfg.wrapper {
        Some(w) if opts.architecture == SaveOptions::default().architecture => Some(Wrapped::new(src, w)?),
        _ => None,
    };
    let config_json = match (&wrapped, &cfg.wrapper) {
        (Some(_), Some(w)) => {
            let mut outer = w.config.clone();
            if let Some(o) = outer.as_object_mut() {
                o.insert("dtype".into(), serde_json::json!(dtype));
            }
            serde_json::to_string_pretty(&outer)?
        }
        _ => cfg.to_json()?,
    };
    let src: &dyn TensorSource = match &wrapped {
        Some(w) => w,
        None => src,
    };
    write_dir_atomic(dir, |tmp| {
        safetensors_io::write_sharded(tmp, src, opts.max_shard_bytes)?;
        write_atomic(&tmp.join(CONFIG), config_json.as_bytes())?;
        tok.save(&tmp.join(TOKENIZER))?;
        // The input's tokenizer_config.json and chat_template.jinja as they
        // were; the built-in ones only for a tokenizer that came without.
        let files = &tok.template_files;
        match &files.tokenizer_config {
            Some(bytes) => write_atomic(&tmp.join(TOKENIZER_CONFIG), bytes)?,
            None => {
                let tc = tokenizer_config_json(cfg.max_position_embeddings);
                write_atomic(&tmp.join(TOKENIZER_CONFIG), serde_json::to_string_pretty(&tc)?.as_bytes())?;
            }
        }
        match &files.chat_template {
            Some(bytes) => write_atomic(&tmp.join(crate::chat::template::TEMPLATE_FILE), bytes)?,
            None if files.tokenizer_config.is_none() => {
                write_atomic(&tmp.join(crate::chat::template::TEMPLATE_FILE), CHAT_TEMPLATE.as_bytes())?
            }
            None => {}
        }
        let gc = generation_config_json(tok);
        write_atomic(&tmp.join(GENERATION_CONFIG), serde_json::to_string_pretty(&gc)?.as_bytes())?;
        Ok(())
    })
    .with_context(|| format!("saving checkpoint to {}", dir.display()))
}
