//! Hugging Face checkpoint directories: `config.json`, `model.safetensors` (or
//! shards with `model.safetensors.index.json`), `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`.
//!
//! Loading checks every tensor's name and shape against the model and names
//! what is missing, unexpected or mis-shaped. Every file is written
//! atomically (temp file + rename), and a whole directory is assembled beside
//! its destination and renamed into place (both in [`crate::fsio`]).

use crate::chat::CHAT_TEMPLATE;
use crate::config::GemmaConfig;
use crate::fsio::{write_atomic, write_dir_atomic};
use crate::model::Gemma;
use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG: &str = "generation_config.json";

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        other => bail!("cannot save tensors of kind {other:?}"),
    })
}

/// The safetensors files of a checkpoint: the shards named by the index, or
/// the single `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(WEIGHTS_INDEX);
    if index.exists() {
        let text =
            std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{} has no \"weight_map\" object", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .map(|f| {
                f.as_str()
                    .map(String::from)
                    .ok_or_else(|| anyhow!("{}: a weight_map value is not a string", index.display()))
            })
            .collect::<Result<_>>()?;
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(WEIGHTS);
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "{} has neither {WEIGHTS} nor {WEIGHTS_INDEX}; is it a Hugging Face model directory?",
        dir.display()
    )
}

/// Reads one safetensors file onto the CPU.
pub fn read_tensors_file(file: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", file.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let kind = kind_of(view.dtype()).with_context(|| format!("{}: tensor {name}", file.display()))?;
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .with_context(|| format!("{}: tensor {name}", file.display()))?;
        out.insert(name, t);
    }
    Ok(out)
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

/// Reads every tensor of the checkpoint's safetensors files onto the CPU.
pub fn read_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for file in weight_files(dir)? {
        for (name, t) in read_tensors_file(&file)? {
            if out.insert(name.clone(), t).is_some() {
                bail!("tensor {name} appears twice in the checkpoint {}", dir.display());
            }
        }
    }
    Ok(out)
}

/// One tensor a [`TensorSource`] will produce: its name, dtype and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
}

impl TensorEntry {
    /// Bytes of the tensor's data.
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<i64>().max(0) as usize * self.kind.elt_size_in_bytes()
    }
}

/// Named tensors produced one at a time as they are written, so that a save
/// never holds a second copy of the model: a `VarStore`'s variables, a map,
/// or weights computed on the fly (LoRA merged into the base, a cast).
pub trait TensorSource {
    /// The tensors in the order they are written (their dtype and shape as
    /// they will be stored).
    fn entries(&self) -> Result<Vec<TensorEntry>>;
    /// The tensor `name` of [`TensorSource::entries`], on any device, of the
    /// entry's dtype and shape.
    fn tensor(&self, name: &str) -> Result<Tensor>;
}

impl TensorSource for BTreeMap<String, Tensor> {
    fn entries(&self) -> Result<Vec<TensorEntry>> {
        Ok(self
            .iter()
            .map(|(n, t)| TensorEntry { name: n.clone(), kind: t.kind(), shape: t.size() })
            .collect())
    }
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.get(name).map(Tensor::shallow_clone).ok_or_else(|| anyhow!("no tensor {name}"))
    }
}

impl TensorSource for nn::VarStore {
    fn entries(&self) -> Result<Vec<TensorEntry>> {
        let mut v: Vec<TensorEntry> = self
            .variables()
            .into_iter()
            .map(|(n, t)| TensorEntry { name: n, kind: t.kind(), shape: t.size() })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.variables().remove(name).ok_or_else(|| anyhow!("no variable {name}"))
    }
}

/// A tensor's dtype, shape and bytes, copied to the CPU.
fn tensor_bytes(name: &str, t: &Tensor) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
    let t = t.to_device(Device::Cpu).contiguous();
    let dtype = dtype_of(t.kind()).with_context(|| format!("tensor {name}"))?;
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok((dtype, t.size().iter().map(|&d| d as usize).collect(), bytes))
}

type Item = (String, Dtype, Vec<usize>, Vec<u8>);

fn serialize_items(items: &[&Item], label: &str) -> Result<Vec<u8>> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let views: Vec<(String, safetensors::tensor::TensorView)> = items
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow!("tensor {name}: {e}"))
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(views, Some(meta)).map_err(|e| anyhow!("cannot serialise {label}: {e}"))
}

/// Writes named tensors to one safetensors file, atomically.
pub fn write_tensors_file(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let items: Vec<Item> = tensors
        .iter()
        .map(|(n, t)| tensor_bytes(n, t).map(|(d, s, b)| (n.clone(), d, s, b)))
        .collect::<Result<_>>()?;
    let refs: Vec<&Item> = items.iter().collect();
    write_atomic(path, &serialize_items(&refs, &path.display().to_string())?)
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
    GemmaConfig::from_file(&dir.join(CONFIG))
}

/// Loads a `GemmaForCausalLM` directory onto `device` in `kind`.
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
    let mut vs = nn::VarStore::new(device);
    let model = Gemma::new(&vs.root(), &cfg)?;
    let tensors = read_tensors(dir)?;
    let ignore: &[&str] = if cfg.tie_word_embeddings { &["lm_head.weight"] } else { &[] };
    load_into(&vs, tensors, ignore, dir)?;
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    Ok(Loaded { vs, model, tokenizer })
}

/// Writes the named tensors as the checkpoint's weights in `dir`, split into
/// shards of at most `max_shard_bytes` (one `model.safetensors` when all fit).
pub fn write_tensors(dir: &Path, tensors: &BTreeMap<String, Tensor>, max_shard_bytes: usize) -> Result<()> {
    let items: Vec<Item> = tensors
        .iter()
        .map(|(n, t)| tensor_bytes(n, t).map(|(d, s, b)| (n.clone(), d, s, b)))
        .collect::<Result<_>>()?;
    let mut shards: Vec<Vec<&Item>> = vec![vec![]];
    let mut size = 0usize;
    for it in &items {
        if size > 0 && size + it.3.len() > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        size += it.3.len();
        shards.last_mut().expect("non-empty").push(it);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (s, shard) in shards.iter().enumerate() {
        let fname =
            if n == 1 { WEIGHTS.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", s + 1, n) };
        for it in shard {
            weight_map.insert(it.0.clone(), fname.clone());
        }
        write_atomic(&dir.join(&fname), &serialize_items(shard, &fname)?)?;
    }
    if n > 1 {
        let total: usize = items.iter().map(|i| i.3.len()).sum();
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(&dir.join(WEIGHTS_INDEX), serde_json::to_string_pretty(&index)?.as_bytes())?;
    }
    Ok(())
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

/// What to write besides the weights.
pub struct SaveOptions {
    /// Largest shard in bytes; more weights than this are split.
    pub max_shard_bytes: usize,
    /// `architectures` entry (`GemmaForCausalLM` or `GemmaForSequenceClassification`).
    pub architecture: String,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { max_shard_bytes: 4 << 30, architecture: "GemmaForCausalLM".into() }
    }
}

/// Writes a complete checkpoint directory atomically. Weights are stored in
/// the dtype they have in `vs`.
pub fn save(
    dir: &Path,
    vs: &nn::VarStore,
    cfg: &GemmaConfig,
    tok: &Tokenizer,
    opts: &SaveOptions,
) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut cfg = cfg.clone();
    cfg.architectures = Some(vec![opts.architecture.clone()]);
    cfg.pad_token_id = Some(tok.special.pad);
    cfg.bos_token_id = Some(tok.special.bos);
    cfg.eos_token_id = Some(serde_json::json!(tok.special.eos));
    let dtype = match vs.kind() {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    };
    cfg.extra.insert("torch_dtype".into(), serde_json::json!(dtype));
    cfg.extra.insert("dtype".into(), serde_json::json!(dtype));
    write_dir_atomic(dir, |tmp| {
        write_tensors(tmp, &tensors, opts.max_shard_bytes)?;
        write_atomic(&tmp.join(CONFIG), cfg.to_json()?.as_bytes())?;
        tok.save(&tmp.join(TOKENIZER))?;
        let tc = tokenizer_config_json(cfg.max_position_embeddings);
        write_atomic(&tmp.join(TOKENIZER_CONFIG), serde_json::to_string_pretty(&tc)?.as_bytes())?;
        write_atomic(&tmp.join("chat_template.jinja"), CHAT_TEMPLATE.as_bytes())?;
        let gc = generation_config_json(tok);
        write_atomic(&tmp.join(GENERATION_CONFIG), serde_json::to_string_pretty(&gc)?.as_bytes())?;
        Ok(())
    })
    .with_context(|| format!("saving checkpoint to {}", dir.display()))
}
