//! Streamed safetensors writes and memory-mapped loads: sharding and the
//! index as transformers writes them, bit-exact round trips, dtype
//! conversion on load, clear errors for damaged files, and the optimizer
//! state streamed back into its tensors.

mod common;
use common::*;
use lm::checkpoint::{self, SaveOptions, TensorSource};
use lm::safetensors_io::{self, parse_size, SafetensorsFile, WeightReader};
use lm::train::{AdamW, OptimConfig};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn assert_same_weights(a: &nn::VarStore, b: &nn::VarStore) {
    let (va, vb) = (a.variables(), b.variables());
    assert_eq!(va.len(), vb.len());
    for (name, t) in &va {
        let u = &vb[name];
        assert_eq!(t.kind(), u.kind(), "{name}");
        assert!(t.equal(u), "{name} differs");
    }
}

#[test]
fn sharded_save_round_trips_bit_exact_with_the_index_transformers_writes() {
    let m = load("mqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sharded");
    let max = 60_000;
    let opts = SaveOptions { max_shard_bytes: max, ..Default::default() };
    checkpoint::save(&out, &m.vs, &m.model.cfg, &m.tokenizer, &opts).unwrap();

    let text = std::fs::read_to_string(out.join(checkpoint::WEIGHTS_INDEX)).unwrap();
    let index: serde_json::Value = serde_json::from_str(&text).unwrap();
    // json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert_eq!(text, serde_json::to_string_pretty(&index).unwrap() + "\n");
    let entries = m.vs.entries().unwrap();
    let total: usize = entries.iter().map(|e| e.bytes()).sum();
    let params: i64 = entries.iter().map(|e| e.shape.iter().product::<i64>()).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(index["metadata"]["total_parameters"], params);
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), entries.len());

    let files = checkpoint::weight_files(&out).unwrap();
    let n = files.len();
    assert!(n >= 3, "expected several shards, got {files:?}");
    for (i, f) in files.iter().enumerate() {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(name, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        // Read with the safetensors crate: an independent check of the format.
        let bytes = std::fs::read(f).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0, "{name}: data not 8-byte aligned");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut size = 0;
        for (t, view) in st.tensors() {
            assert_eq!(map[&t], name.as_str(), "{t} is in {name} but the index says otherwise");
            size += view.data().len();
        }
        assert!(size <= max || st.len() == 1, "{name} holds {size} bytes");
    }
    assert!(!out.join(checkpoint::WEIGHTS).exists());

    let again = checkpoint::load_causal_lm(&out, Device::Cpu, Kind::Float).unwrap();
    assert_same_weights(&m.vs, &again.vs);

    // Saved again whole into the same weights directory: the stale index goes.
    checkpoint::write_tensors(&out, &checkpoint::read_tensors(&out).unwrap(), usize::MAX).unwrap();
    assert!(!out.join(checkpoint::WEIGHTS_INDEX).exists());
    assert_eq!(checkpoint::weight_files(&out).unwrap(), vec![out.join(checkpoint::WEIGHTS)]);
}

#[test]
fn shards_split_as_huggingface_hub_does() {
    let e =
        |name: &str, n: i64| checkpoint::TensorEntry { name: name.into(), kind: Kind::Float, shape: vec![n] };
    // 40 + 40 bytes, then 100 (over the limit: a shard of its own while the
    // open one stays open), then 40 (would tip 80 over 90: a new shard) + 20.
    let entries = vec![e("a", 10), e("b", 10), e("big", 25), e("c", 10), e("d", 5)];
    let shards = safetensors_io::split_shards(&entries, 90);
    let names: Vec<Vec<&str>> = shards.iter().map(|s| s.iter().map(|e| e.name.as_str()).collect()).collect();
    assert_eq!(names, vec![vec!["big"], vec!["a", "b"], vec!["c", "d"]]);
    assert_eq!(safetensors_io::split_shards(&entries, usize::MAX).len(), 1);
}

#[test]
fn bf16_and_f32_checkpoints_load_in_the_other_dtype_as_to_kind_gives() {
    let m = load("mqa");
    let tmp = tempfile::tempdir().unwrap();
    // f32 on disk, loaded as bf16.
    let f32_dir = tmp.path().join("f32");
    checkpoint::save(&f32_dir, &m.vs, &m.model.cfg, &m.tokenizer, &SaveOptions::default()).unwrap();
    let as_bf16 = checkpoint::load_causal_lm(&f32_dir, Device::Cpu, Kind::BFloat16).unwrap();
    for (name, t) in m.vs.variables() {
        let u = &as_bf16.vs.variables()[&name];
        assert_eq!(u.kind(), Kind::BFloat16);
        assert!(u.equal(&t.to_kind(Kind::BFloat16)), "{name}");
    }
    // bf16 on disk (several shards), loaded as f32.
    let bf16_dir = tmp.path().join("bf16");
    let opts = SaveOptions { max_shard_bytes: 50_000, ..Default::default() };
    checkpoint::save(&bf16_dir, &as_bf16.vs, &m.model.cfg, &m.tokenizer, &opts).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert!(checkpoint::read_tensors(&bf16_dir).unwrap().values().all(|t| t.kind() == Kind::BFloat16));
    let as_f32 = checkpoint::load_causal_lm(&bf16_dir, Device::Cpu, Kind::Float).unwrap();
    for (name, t) in as_bf16.vs.variables() {
        let u = &as_f32.vs.variables()[&name];
        assert_eq!(u.kind(), Kind::Float);
        assert!(u.equal(&t.to_kind(Kind::Float)), "{name}");
    }
}

#[test]
fn tensors_larger_than_a_chunk_stream_both_ways() {
    let n = ((safetensors_io::CHUNK_BYTES / 4 + 12_345) / 5 * 5) as i64;
    let big = Tensor::arange(n, (Kind::Float, Device::Cpu)).reshape([n / 5, 5]);
    let mut t = BTreeMap::new();
    t.insert("big".to_string(), big.shallow_clone());
    // A non-contiguous source is written as its logical layout.
    t.insert("odd".to_string(), Tensor::arange(12, (Kind::Int64, Device::Cpu)).reshape([3, 4]).tr());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.safetensors");
    checkpoint::write_tensors_file(&path, &t).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    let dst = Tensor::zeros([n / 5, 5], (Kind::Double, Device::Cpu));
    f.copy_into("big", &dst).unwrap();
    assert!(dst.equal(&big.to_kind(Kind::Double)));
    let back = f.read("odd").unwrap();
    assert_eq!(back.size(), vec![4, 3]);
    assert!(back.equal(&t["odd"]));
}

#[test]
fn truncated_or_corrupt_weights_are_errors_naming_the_file() {
    let m = load("mqa");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ckpt");
    let opts = SaveOptions { max_shard_bytes: 60_000, ..Default::default() };
    checkpoint::save(&out, &m.vs, &m.model.cfg, &m.tokenizer, &opts).unwrap();
    let files = checkpoint::weight_files(&out).unwrap();
    let victim = &files[1];
    let good = std::fs::read(victim).unwrap();
    let err = |dir: &Path| match checkpoint::load_causal_lm(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => format!("{e:#}"),
    };
    // Truncated in the data.
    std::fs::write(victim, &good[..good.len() - 100]).unwrap();
    let e = err(&out);
    assert!(
        e.contains(&victim.display().to_string()) && e.contains("is not a valid safetensors file"),
        "{e}"
    );
    assert!(e.contains("truncated"), "{e}");
    // Truncated in the header.
    std::fs::write(victim, &good[..20]).unwrap();
    let e = err(&out);
    assert!(
        e.contains(&victim.display().to_string()) && e.contains("is not a valid safetensors file"),
        "{e}"
    );
    // Shorter than the length prefix.
    std::fs::write(victim, &good[..3]).unwrap();
    let e = err(&out);
    assert!(
        e.contains(&victim.display().to_string()) && e.contains("is not a valid safetensors file"),
        "{e}"
    );
    // A header whose offsets do not fit the shape.
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(good[8..8 + header_len].to_vec()).unwrap();
    let bad = header.replacen("\"F32\"", "\"F64\"", 1);
    let mut bytes = good[..8].to_vec();
    bytes.extend_from_slice(bad.as_bytes());
    bytes.extend_from_slice(&good[8 + header_len..]);
    std::fs::write(victim, &bytes).unwrap();
    let e = err(&out);
    assert!(e.contains(&victim.display().to_string()) && e.contains("do not fit shape"), "{e}");
    // A shard the index names is gone.
    std::fs::remove_file(victim).unwrap();
    let e = err(&out);
    assert!(e.contains(&victim.display().to_string()), "{e}");
}

#[test]
fn names_and_shapes_are_checked_before_anything_is_copied() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir("mqa"), tmp.path());
    let mut t = checkpoint::read_tensors(tmp.path()).unwrap();
    t.insert("model.norm.weight".into(), Tensor::zeros([3], (Kind::Float, Device::Cpu)));
    t.remove("model.layers.0.mlp.up_proj.weight");
    checkpoint::write_tensors(tmp.path(), &t, usize::MAX).unwrap();
    let e = match checkpoint::load_causal_lm(tmp.path(), Device::Cpu, Kind::Float) {
        Ok(_) => panic!("should fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("missing tensors: model.layers.0.mlp.up_proj.weight"), "{e}");
    let reader = WeightReader::open_dir(tmp.path()).unwrap();
    assert!(reader.contains("model.norm.weight"));
}

fn optimizer_after_steps(kind: Kind) -> (nn::VarStore, AdamW) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _ = (&root / "layer").var("weight", &[4, 3], nn::Init::Uniform { lo: -1.0, up: 1.0 });
    let _ = (&root / "layer" / "norm").var("weight", &[4], nn::Init::Const(0.5));
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    let mut opt = AdamW::new(&vs, &OptimConfig { weight_decay: 0.1, ..Default::default() });
    let (w, b) =
        (vs.variables()["layer.weight"].shallow_clone(), vs.variables()["layer.norm.weight"].shallow_clone());
    for step in 0..3 {
        opt.zero_grad();
        let x = Tensor::ones([2, 3], (kind, Device::Cpu)) * (step + 1) as f64;
        let loss = (x.matmul(&w.tr()) + &b).pow_tensor_scalar(2).sum(Kind::Float);
        loss.backward();
        opt.step(1e-2).unwrap();
    }
    (vs, opt)
}

#[test]
fn optimizer_state_round_trips_through_the_streaming_reader() {
    for kind in [Kind::Float, Kind::BFloat16] {
        let (_vs, opt) = optimizer_after_steps(kind);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(lm::train::OPTIMIZER_FILE);
        checkpoint::write_tensors_file(&path, &opt.state_tensors()).unwrap();

        let (vs2, _) = optimizer_after_steps(kind);
        let mut fresh = AdamW::new(&vs2, &OptimConfig { weight_decay: 0.1, ..Default::default() });
        let reader = WeightReader::open_files(std::slice::from_ref(&path), &path).unwrap();
        fresh.load_state_from(&reader, opt.t).unwrap();
        assert_eq!(fresh.t, opt.t);
        let (a, b) = (opt.state_tensors(), fresh.state_tensors());
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, t) in &a {
            assert!(t.equal(&b[k]), "{kind:?}: {k}");
        }
        if kind == Kind::BFloat16 {
            // The masters also overwrite the bf16 variables.
            let master = &a["layer.weight.master"];
            assert!(vs2.variables()["layer.weight"].equal(&master.to_kind(Kind::BFloat16)));
        }
        // The same as the whole-map path.
        let mut whole = AdamW::new(&vs2, &OptimConfig::default());
        whole.load_state(checkpoint::read_tensors_file(&path).unwrap(), opt.t).unwrap();
        for (k, t) in whole.state_tensors() {
            assert!(t.equal(&a[&k]), "{k}");
        }
        // A state without some tensor is refused, naming it.
        let mut partial = opt.state_tensors();
        partial.remove("layer.weight.exp_avg_sq");
        checkpoint::write_tensors_file(&path, &partial).unwrap();
        let reader = WeightReader::open_files(std::slice::from_ref(&path), &path).unwrap();
        let e = fresh.load_state_from(&reader, 1).unwrap_err().to_string();
        assert!(e.contains("optimizer state lacks layer.weight.exp_avg_sq"), "{e}");
    }
}

#[test]
fn sizes_parse_as_transformers_reads_them() {
    assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
    assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
    assert_eq!(parse_size("10kb").unwrap(), 10_000);
    assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
    assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
    assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
    assert_eq!(parse_size("123456").unwrap(), 123_456);
    assert_eq!(parse_size(" 1 TB ").unwrap(), 1_000_000_000_000);
    for bad in ["", "GB", "five GB", "-1MB", "0"] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn the_default_shard_limit_is_transformers_5gb() {
    assert_eq!(SaveOptions::default().max_shard_bytes, 5_000_000_000);
}

#[test]
fn a_tensor_at_an_unaligned_offset_loads() {
    // 3 bf16 values (6 bytes) put the f32 tensor after them off 4-byte alignment.
    let mut t = BTreeMap::new();
    t.insert("a".to_string(), Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_kind(Kind::BFloat16));
    t.insert("b".to_string(), Tensor::from_slice(&[0.5f32, -1.25, 3.0, 4.5, 1e-3]));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.safetensors");
    checkpoint::write_tensors_file(&path, &t).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.tensors()["b"].start % 4, 2);
    let dst = Tensor::zeros([5], (Kind::Float, Device::Cpu));
    f.copy_into("b", &dst).unwrap();
    assert!(dst.equal(&t["b"]));
    let a = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    f.copy_into("a", &a).unwrap();
    assert!(a.equal(&t["a"].to_kind(Kind::Float)));
}
