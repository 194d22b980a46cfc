//! Safetensors files written and read at any size, one tensor at a time.
//!
//! - Writing: [`write_file`] computes the header (`{name: {dtype, shape,
//!   data_offsets}}` and `__metadata__ {"format": "pt"}`, padded with spaces
//!   to a multiple of 8 bytes) from the [`TensorEntry`]s up front, then asks
//!   the [`TensorSource`] for each tensor in turn and streams its bytes in
//!   bounded chunks into a temp file that is synced and renamed into place.
//!   [`write_sharded`] splits the tensors into `model-0000i-of-0000N`
//!   shards exactly as transformers (huggingface_hub) does and writes
//!   `model.safetensors.index.json` beside them. No more than one tensor
//!   (and a chunk of it on the CPU) is ever held besides the source.
//! - Reading: [`SafetensorsFile`] memory-maps a file and checks its header
//!   against the file's length; [`WeightReader`] gathers a checkpoint's
//!   files. A tensor is copied into an existing destination (any dtype, any
//!   device) chunk by chunk, and the mapped pages are released after each
//!   chunk, so loading never holds the file in anonymous memory and the
//!   resident set does not grow by the file's size.

use crate::fsio;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// The single-file weights of a checkpoint.
pub const WEIGHTS: &str = "model.safetensors";
/// The index of a sharded checkpoint's weights.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

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

/// Bytes copied at a time between a tensor and a file.
pub const CHUNK_BYTES: usize = 64 << 20;

/// Largest header accepted (as the safetensors crate).
const MAX_HEADER: u64 = 100 << 20;

/// The safetensors dtype name of `kind`.
pub fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Int16 => "I16",
        Kind::Int8 => "I8",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        other => bail!("cannot save tensors of kind {other:?}"),
    })
}

/// The kind of the safetensors dtype `name`.
pub fn kind_of_name(name: &str) -> Result<Kind> {
    Ok(match name {
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F64" => Kind::Double,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        other => bail!("unsupported safetensors dtype {other}"),
    })
}

/// A tensor's `(start, end)` byte offsets in the data section of a file.
pub type DataOffsets = (usize, usize);

/// The header of a safetensors file holding `entries` in this order (with
/// the 8-byte length prefix), and each entry's `(start, end)` data offsets.
pub fn header(entries: &[TensorEntry]) -> Result<(Vec<u8>, Vec<DataOffsets>)> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offsets = Vec::with_capacity(entries.len());
    let mut at = 0usize;
    for e in entries {
        if e.name == "__metadata__" {
            bail!("a tensor cannot be named __metadata__");
        }
        let end = at + e.bytes();
        let v = serde_json::json!({
            "dtype": dtype_name(e.kind).with_context(|| format!("tensor {}", e.name))?,
            "shape": e.shape,
            "data_offsets": [at, end],
        });
        if map.insert(e.name.clone(), v).is_some() {
            bail!("tensor {} appears twice", e.name);
        }
        offsets.push((at, end));
        at = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map))?;
    // The data must start 8-byte aligned: pad the header with spaces.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok((out, offsets))
}

/// Writes `t`'s bytes (of `e`'s dtype and shape) to `w` in chunks of at
/// most [`CHUNK_BYTES`], each copied to the CPU on its own.
fn write_tensor(w: &mut dyn Write, e: &TensorEntry, t: &Tensor, buf: &mut Vec<u8>) -> Result<()> {
    if t.kind() != e.kind || t.size() != e.shape {
        bail!(
            "tensor {} is {:?} {:?}, but its entry says {:?} {:?}",
            e.name,
            t.kind(),
            t.size(),
            e.kind,
            e.shape
        );
    }
    let _guard = tch::no_grad_guard();
    let elt = e.kind.elt_size_in_bytes();
    let numel = t.numel() as i64;
    if numel == 0 {
        return Ok(());
    }
    // `reshape` is a view of a contiguous tensor; others are copied, one
    // tensor at a time.
    let flat = t.detach().reshape([-1]);
    let step = (CHUNK_BYTES / elt).max(1) as i64;
    let mut start = 0i64;
    while start < numel {
        let n = step.min(numel - start);
        let part = flat.narrow(0, start, n).to_device(Device::Cpu).contiguous();
        let bytes = n as usize * elt;
        buf.resize(bytes, 0);
        part.f_copy_data_u8(&mut buf[..bytes], n as usize).with_context(|| format!("tensor {}", e.name))?;
        w.write_all(&buf[..bytes])?;
        start += n;
    }
    Ok(())
}

/// Writes the tensors `entries` of `src` (in that order) to one
/// safetensors file at `path`, streamed through a temp file, synced and
/// renamed into place.
pub fn write_file(path: &Path, src: &dyn TensorSource, entries: &[TensorEntry]) -> Result<()> {
    let (head, _) = header(entries).with_context(|| format!("writing {}", path.display()))?;
    fsio::write_atomic_with(path, |w| {
        w.write_all(&head)?;
        let mut buf = Vec::new();
        for e in entries {
            let t = src.tensor(&e.name).with_context(|| format!("writing {}", path.display()))?;
            write_tensor(w, e, &t, &mut buf).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    })
}

/// Splits `entries` into shards of at most `max_shard_bytes` as
/// huggingface_hub's `split_torch_state_dict_into_shards` does: a tensor
/// larger than the limit gets a shard of its own, otherwise a shard is
/// closed when the next tensor would tip it over the limit.
pub fn split_shards(entries: &[TensorEntry], max_shard_bytes: usize) -> Vec<Vec<TensorEntry>> {
    let mut shards: Vec<Vec<TensorEntry>> = vec![];
    let mut current: Vec<TensorEntry> = vec![];
    let mut size = 0usize;
    for e in entries {
        let b = e.bytes();
        if b > max_shard_bytes {
            shards.push(vec![e.clone()]);
            continue;
        }
        if size + b > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(e.clone());
        size += b;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// The name of shard `i` (0-based) of `n`, as transformers names them.
pub fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// Writes `src`'s tensors into `dir` as a checkpoint's weights: one
/// `model.safetensors` when they fit in `max_shard_bytes`, else shards and
/// `model.safetensors.index.json` (`metadata.total_size`,
/// `metadata.total_parameters`, `weight_map`), as transformers'
/// `save_pretrained` writes them. A stale index (of an earlier sharded
/// save into the same directory) is removed when one file is written.
pub fn write_sharded(dir: &Path, src: &dyn TensorSource, max_shard_bytes: usize) -> Result<()> {
    let entries = src.entries()?;
    let shards = split_shards(&entries, max_shard_bytes.max(1));
    let n = shards.len();
    if n == 1 {
        write_file(&dir.join(WEIGHTS), src, &shards[0])?;
        let index = dir.join(WEIGHTS_INDEX);
        if index.exists() {
            std::fs::remove_file(&index).with_context(|| format!("cannot remove {}", index.display()))?;
        }
        return Ok(());
    }
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = shard_name(i, n);
        write_file(&dir.join(&name), src, shard)?;
        for e in shard {
            weight_map.insert(e.name.clone(), name.clone());
        }
    }
    let total_size: usize = entries.iter().map(TensorEntry::bytes).sum();
    let total_parameters: i64 = entries.iter().map(|e| e.shape.iter().product::<i64>()).sum();
    fsio::write_atomic(
        &dir.join(WEIGHTS_INDEX),
        index_json(total_size, total_parameters, &weight_map)?.as_bytes(),
    )
}

/// `model.safetensors.index.json` as transformers writes it
/// (`json.dumps(index, indent=2, sort_keys=True) + "\n"`).
pub fn index_json(
    total_size: usize,
    total_parameters: i64,
    weight_map: &BTreeMap<String, String>,
) -> Result<String> {
    let index = serde_json::json!({
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": weight_map,
    });
    Ok(serde_json::to_string_pretty(&index)? + "\n")
}

/// Parses a shard size as transformers does: a number of bytes, or a
/// number with a unit, `KB`/`MB`/`GB`/`TB` (powers of 1000) or
/// `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024), any case: `"5GB"`, `"500MB"`,
/// `"1.5GiB"`.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let units: [(&str, f64); 8] = [
        ("KIB", 1024.0),
        ("MIB", 1024f64.powi(2)),
        ("GIB", 1024f64.powi(3)),
        ("TIB", 1024f64.powi(4)),
        ("KB", 1e3),
        ("MB", 1e6),
        ("GB", 1e9),
        ("TB", 1e12),
    ];
    let (num, mult) = units
        .iter()
        .find(|(u, _)| upper.ends_with(u))
        .map(|(u, m)| (t[..t.len() - u.len()].trim(), *m))
        .unwrap_or((t, 1.0));
    let v: f64 = num.parse().map_err(|_| {
        anyhow!("cannot read the size {s:?}: give bytes or a number with KB, MB, GB, TB (or KiB, MiB, GiB, TiB), e.g. \"5GB\"")
    })?;
    let bytes = v * mult;
    if !(bytes.is_finite() && bytes >= 1.0) {
        bail!("the size {s:?} must be at least one byte");
    }
    Ok(bytes as usize)
}

/// One tensor's place in a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Byte range in the file (absolute offsets).
    pub start: usize,
    pub end: usize,
}

/// A memory-mapped safetensors file with its checked header.
pub struct SafetensorsFile {
    path: PathBuf,
    map: memmap2::Mmap,
    tensors: BTreeMap<String, StoredTensor>,
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{} is not a valid safetensors file: {why}", path.display())
}

impl SafetensorsFile {
    /// Maps `path` and checks its header: JSON, known dtypes, every
    /// tensor's byte range the size of its shape and inside the file (a
    /// truncated file is an error naming it).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
        if len < 8 {
            return Err(invalid(path, format!("it holds {len} bytes, fewer than the 8-byte header length")));
        }
        // SAFETY: the mapping is read-only and private to this value. It is
        // undefined behaviour only if the file is truncated or written in
        // place while mapped; align never does that to a checkpoint (every
        // file is written to a temp file and renamed over the old one, so a
        // mapped inode is never modified), and the length checks below keep
        // every access inside the file as it was when mapped.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let _ = map.advise(memmap2::Advice::Sequential);
        let n = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER || 8 + n > len {
            return Err(invalid(path, format!("a {n}-byte header in a {len}-byte file")));
        }
        let data_start = 8 + n as usize;
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&map[8..data_start]).map_err(|e| invalid(path, e))?;
        let data_len = len as usize - data_start;
        let mut tensors = BTreeMap::new();
        for (name, info) in v {
            if name == "__metadata__" {
                continue;
            }
            let bad = |why: String| invalid(path, format!("tensor {name}: {why}"));
            let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype".into()))?;
            let kind = kind_of_name(dtype).map_err(|e| bad(e.to_string()))?;
            let shape: Vec<i64> = info
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as i64)).collect::<Option<_>>())
                .ok_or_else(|| bad("no shape".into()))?;
            let offs: Vec<usize> = info
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<_>>())
                .filter(|o: &Vec<usize>| o.len() == 2)
                .ok_or_else(|| bad("no data_offsets".into()))?;
            let (s, e) = (offs[0], offs[1]);
            let want = shape.iter().try_fold(kind.elt_size_in_bytes(), |acc, &d| acc.checked_mul(d as usize));
            if s > e || Some(e - s) != want {
                return Err(bad(format!("data_offsets [{s}, {e}] do not fit shape {shape:?} of {dtype}")));
            }
            if e > data_len {
                return Err(bad(format!(
                    "its data ends at byte {e} but the file holds {data_len} bytes of data (truncated?)"
                )));
            }
            tensors.insert(name, StoredTensor { kind, shape, start: data_start + s, end: data_start + e });
        }
        Ok(SafetensorsFile { path: path.to_path_buf(), map, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors of the file by name.
    pub fn tensors(&self) -> &BTreeMap<String, StoredTensor> {
        &self.tensors
    }

    fn stored(&self, name: &str) -> Result<&StoredTensor> {
        self.tensors.get(name).ok_or_else(|| anyhow!("{} has no tensor {name}", self.path.display()))
    }

    /// Drops the mapped pages of `[start, end)` from this process (they stay
    /// in the page cache), so that resident memory does not grow with the
    /// bytes read.
    fn release(&self, start: usize, end: usize) {
        if end > start {
            // SAFETY: MADV_DONTNEED on a read-only, file-backed mapping only
            // unmaps the pages from this process; a later access reads them
            // again from the file, so no byte seen through `self.map` changes
            // and no reference into the range is invalidated. The range is
            // inside the mapping (checked at open).
            let _ = unsafe {
                self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }

    /// Copies tensor `name` into `dst` (same number of elements; any dtype,
    /// any device: the copy converts) in chunks of at most [`CHUNK_BYTES`],
    /// releasing each chunk's mapped pages after it.
    pub fn copy_into(&self, name: &str, dst: &Tensor) -> Result<()> {
        let st = self.stored(name)?;
        let numel: i64 = st.shape.iter().product();
        if dst.numel() as i64 != numel {
            bail!(
                "{}: tensor {name} has shape {:?}, the destination {:?}",
                self.path.display(),
                st.shape,
                dst.size()
            );
        }
        let _guard = tch::no_grad_guard();
        let context = || format!("{}: copying tensor {name}", self.path.display());
        if !dst.is_contiguous() {
            let src = self.read(name)?;
            dst.shallow_clone().f_copy_(&src.view_as(dst)).with_context(context)?;
            return Ok(());
        }
        if numel == 0 {
            return Ok(());
        }
        let elt = st.kind.elt_size_in_bytes();
        let flat = dst.view([-1]);
        let step = (CHUNK_BYTES / elt).max(1) as i64;
        let mut at = 0i64;
        while at < numel {
            let n = step.min(numel - at);
            let s = st.start + at as usize * elt;
            let e = s + n as usize * elt;
            let bytes = &self.map[s..e];
            if (bytes.as_ptr() as usize).is_multiple_of(elt) {
                // SAFETY: `src` views `bytes` (n elements of `st.kind`,
                // aligned, inside the mapping, which outlives it: `src` is
                // dropped at the end of this block, before the pages are
                // released) without copying; it is only
                // read, as the source of `copy_`, so the read-only mapping
                // is never written through it.
                let src = unsafe { Tensor::f_from_blob(bytes.as_ptr(), &[n], &[1], st.kind, Device::Cpu) }
                    .with_context(context)?;
                flat.narrow(0, at, n).f_copy_(&src).with_context(context)?;
            } else {
                let src = Tensor::f_from_data_size(bytes, &[n], st.kind).with_context(context)?;
                flat.narrow(0, at, n).f_copy_(&src).with_context(context)?;
            }
            self.release(s, e);
            at += n;
        }
        Ok(())
    }

    /// Tensor `name` as a new CPU tensor of its stored dtype.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let st = self.stored(name)?;
        let t = Tensor::f_from_data_size(&self.map[st.start..st.end], &st.shape, st.kind)
            .with_context(|| format!("{}: tensor {name}", self.path.display()))?;
        self.release(st.start, st.end);
        Ok(t)
    }
}

/// The safetensors files of a checkpoint (or one file), mapped, with the
/// file that holds each tensor.
pub struct WeightReader {
    files: Vec<SafetensorsFile>,
    /// Each tensor's file, by the name the model reads it under.
    which: BTreeMap<String, usize>,
    /// Names read under another name than they are stored under (the text
    /// model of a multimodal checkpoint, see [`TEXT_PREFIXES`]).
    stored: BTreeMap<String, String>,
    /// The multimodal prefix the text model was found under, if any.
    pub text_prefix: Option<String>,
}

/// Where a multimodal Gemma checkpoint (`Gemma3ForConditionalGeneration`,
/// `Gemma4ForConditionalGeneration`) keeps its text model's `model.*`
/// tensors: transformers 5 saves Gemma 3's under the legacy
/// `language_model.model.` and Gemma 4's under `model.language_model.`.
pub const TEXT_PREFIXES: &[&str] = &["language_model.model.", "model.language_model."];

/// The name the text model reads `stored` under (`model.…`, `lm_head.weight`),
/// or None for a tensor of another tower, when the text model lives under `prefix`.
pub fn text_name(stored: &str, prefix: &str) -> Option<String> {
    if let Some(rest) = stored.strip_prefix(prefix) {
        return Some(format!("model.{rest}"));
    }
    matches!(stored, "lm_head.weight" | "language_model.lm_head.weight").then(|| "lm_head.weight".to_string())
}

impl WeightReader {
    /// Opens the weights of the checkpoint directory `dir`: the shards its
    /// index names, or its `model.safetensors`.
    ///
    /// In a multimodal checkpoint, the text model's tensors are read under
    /// the names of a text-only one (`model.…`) and the other towers'
    /// tensors are not listed: [`Self::open_dir_raw`] lists them as stored.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let mut r = Self::open_files(&weight_files(dir)?, dir)?;
        let prefix = TEXT_PREFIXES.iter().find(|p| r.which.keys().any(|n| n.starts_with(*p)));
        if let Some(prefix) = prefix {
            let mut which = BTreeMap::new();
            for (name, i) in std::mem::take(&mut r.which) {
                if let Some(public) = text_name(&name, prefix) {
                    r.stored.insert(public.clone(), name);
                    which.insert(public, i);
                }
            }
            r.which = which;
            r.text_prefix = Some(prefix.to_string());
        }
        Ok(r)
    }

    /// [`Self::open_dir`] with every tensor under its stored name.
    pub fn open_dir_raw(dir: &Path) -> Result<Self> {
        Self::open_files(&weight_files(dir)?, dir)
    }

    /// Opens the given safetensors files; a tensor in two of them is an
    /// error naming `origin`.
    pub fn open_files(paths: &[PathBuf], origin: &Path) -> Result<Self> {
        let mut files = vec![];
        let mut which = BTreeMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = SafetensorsFile::open(p)?;
            for name in f.tensors().keys() {
                if which.insert(name.clone(), i).is_some() {
                    bail!("tensor {name} appears twice in the checkpoint {}", origin.display());
                }
            }
            files.push(f);
        }
        Ok(WeightReader { files, which, stored: BTreeMap::new(), text_prefix: None })
    }

    /// The names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.which.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.which.contains_key(name)
    }

    /// Where tensor `name` is stored: its file and its dtype, shape, bytes.
    pub fn get(&self, name: &str) -> Option<(&SafetensorsFile, &StoredTensor)> {
        let f = &self.files[*self.which.get(name)?];
        Some((f, &f.tensors()[self.stored_name(name)]))
    }

    fn stored_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.stored.get(name).map_or(name, String::as_str)
    }

    fn file(&self, name: &str) -> Result<&SafetensorsFile> {
        self.get(name).map(|(f, _)| f).ok_or_else(|| anyhow!("the checkpoint has no tensor {name}"))
    }

    /// See [`SafetensorsFile::copy_into`].
    pub fn copy_into(&self, name: &str, dst: &Tensor) -> Result<()> {
        self.file(name)?.copy_into(self.stored_name(name), dst)
    }

    /// See [`SafetensorsFile::read`].
    pub fn read(&self, name: &str) -> Result<Tensor> {
        self.file(name)?.read(self.stored_name(name))
    }

    /// Every tensor read onto the CPU (for small checkpoints).
    pub fn read_all(&self) -> Result<BTreeMap<String, Tensor>> {
        self.names().map(|n| self.read(n).map(|t| (n.clone(), t))).collect()
    }
}

/// Loads `reader`'s tensors into the tensors `vars` (a `VarStore`'s
/// variables), tensor by tensor: names and shapes are checked first, and
/// missing or unexpected tensors are named (`ignore`: tensors the file may
/// hold without a variable; `skip`: variables not to load, filled
/// otherwise). Each lands in its variable's dtype and device.
pub fn load_vars(
    vars: &HashMap<String, Tensor>,
    reader: &WeightReader,
    ignore: &[&str],
    skip: &[&str],
    origin: &Path,
) -> Result<()> {
    let mut names: Vec<&String> = vars.keys().filter(|n| !skip.contains(&n.as_str())).collect();
    names.sort();
    let missing: Vec<&str> = names.iter().filter(|n| !reader.contains(n)).map(|n| n.as_str()).collect();
    let unexpected: Vec<&str> = reader
        .names()
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
    for name in &names {
        let (_, st) = reader.get(name).expect("checked above");
        let var = &vars[name.as_str()];
        if var.size() != st.shape {
            bail!(
                "checkpoint {}: tensor {name} has shape {:?}, the model expects {:?}",
                origin.display(),
                st.shape,
                var.size()
            );
        }
    }
    for name in names {
        reader.copy_into(name, &vars[name.as_str()]).with_context(|| format!("copying tensor {name}"))?;
    }
    Ok(())
}
