//! `align bench generate --family gemma2|gemma3`: a long prompt through a
//! model with sliding-window layers, against transformers' `generate` on the
//! same weights.
//!
//! align makes a random model of the family's bench shapes
//! ([`bench_config`]), writes it as a checkpoint (`config.json` and
//! `model.safetensors`) into a temporary directory, and transformers loads
//! that checkpoint: both sides run identical weights on identical prompts.
//! Besides tokens/s (whole `generate` calls, and the prefill and decoding
//! parts apart), the command reports each side's KV-cache bytes after
//! generation against the bound a window gives (sliding layers hold the
//! window, full layers the whole sequence), and checks that align's greedy
//! ids, decoded over its ring cache, are transformers' ids.

use super::args::GenerateBench;
use super::floor::MatmulFloor;
use super::util::python;
use super::util::{median, scripts_dir};
use anyhow::{bail, Context, Result};
use lm::device::{parse_device, parse_dtype};
use lm::family::{layer_specs, Span};
use lm::reference::Reference;
use lm::{GemmaConfig, GenerationConfig, KvCache};
use std::time::Instant;

/// The families `--family` takes besides `gemma` (which keeps the preset
/// path of [`super::bench_generate`]).
pub const FAMILIES: &[&str] = &["gemma2", "gemma3"];

/// The bench model of `family`: Gemma 3 270M's layer shapes (hidden 640,
/// 4 query heads over 1 key/value head of 256, MLP 2048, window 512) with 6
/// layers and a 32k vocabulary, so that a 2048-token prompt runs on a
/// 2-core CPU in seconds. Gemma 3: 5 sliding layers then 1 full, RoPE θ
/// 10k / 1M, no soft-capping. Gemma 2: the same shapes, sliding and full
/// alternating, attention-logit soft-cap 50 and final 30.
pub fn bench_config(family: &str) -> Result<GemmaConfig> {
    let sliding = "sliding_attention";
    let full = "full_attention";
    let mut cfg = serde_json::json!({
        "vocab_size": 32768,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "attention_bias": false,
        "tie_word_embeddings": true,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "initializer_range": 0.02,
    });
    let extra = match family {
        "gemma3" => serde_json::json!({
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "layer_types": [sliding, sliding, sliding, sliding, sliding, full],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        }),
        "gemma2" => serde_json::json!({
            "model_type": "gemma2",
            "architectures": ["Gemma2ForCausalLM"],
            "layer_types": [sliding, full, sliding, full, sliding, full],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        }),
        other => bail!("--family {other:?}: the generate bench knows gemma, {}", FAMILIES.join(", ")),
    };
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let cfg: GemmaConfig = serde_json::from_value(cfg).context("the bench config")?;
    cfg.validate()?;
    Ok(cfg)
}

/// Bytes of keys and values for `slots` positions of one layer.
fn layer_kv_bytes(cfg: &GemmaConfig, batch: i64, slots: i64, kind: tch::Kind) -> i64 {
    2 * batch * cfg.num_kv_heads() * cfg.head_dim() * slots * kind.elt_size_in_bytes() as i64
}

/// The first index where `a` and `b` differ (the shorter length when one is
/// a prefix of the other), or None when they are equal.
fn first_mismatch(a: &[i64], b: &[i64]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

pub fn run(b: &GenerateBench, family: &str) -> Result<()> {
    let device = parse_device(&b.device)?;
    let kind = parse_dtype(&b.dtype)?;
    let cfg = bench_config(family)?;
    let (batch, prompt_len, new_tokens) =
        (b.batch.unwrap_or(1), b.prompt_len.unwrap_or(2048), b.new_tokens.unwrap_or(256));
    if b.repeats == 0 || batch < 1 || prompt_len < 1 || new_tokens < 1 {
        bail!("--repeats, --batch, --prompt-len and --new-tokens must be at least 1");
    }
    if b.preset.is_some() {
        bail!("--preset is for --family gemma; --family {family} runs its own bench shapes");
    }
    let specs = layer_specs(&cfg, cfg.family()?)?;
    let window = cfg.sliding_window.unwrap_or(0);
    let n_sliding = specs.iter().filter(|s| matches!(s.span, Span::Sliding(_))).count() as i64;
    let n_full = specs.len() as i64 - n_sliding;

    tch::manual_seed(0);
    let mut vs = tch::nn::VarStore::new(device);
    let model = lm::Gemma::new(&vs.root(), &cfg)?;
    vs.set_kind(kind);
    let prompts: Vec<Vec<i64>> = (0..batch)
        .map(|r| (0..prompt_len).map(|i| 10 + (r * 7919 + i * 104729) % (cfg.vocab_size - 10)).collect())
        .collect();

    // The checkpoint transformers loads: the same weights, the same config.
    let dir = tempfile::Builder::new().prefix("align-bench-generate-").tempdir()?;
    let mut hf_cfg = cfg.clone();
    let dtype_name = if kind == tch::Kind::BFloat16 { "bfloat16" } else { "float32" };
    hf_cfg.extra.insert("dtype".into(), serde_json::json!(dtype_name));
    lm::safetensors_io::write_sharded(dir.path(), &vs, lm::checkpoint::DEFAULT_MAX_SHARD_BYTES)?;
    // transformers' strict config classes want `query_pre_attn_scalar` an
    // int; GemmaConfig holds it as f64 (256.0).
    let mut hf_json = serde_json::to_value(&hf_cfg)?;
    if let Some(x) = hf_json.get_mut("query_pre_attn_scalar") {
        if let Some(f) = x.as_f64().filter(|f| f.fract() == 0.0) {
            *x = serde_json::json!(f as i64);
        }
    }
    let hf_json = serde_json::to_string_pretty(&hf_json)?;
    lm::fsio::write_atomic(&dir.path().join(lm::checkpoint::CONFIG), hf_json.as_bytes())?;
    let prompts_file = dir.path().join("prompts.json");
    lm::fsio::write_atomic(&prompts_file, serde_json::to_string(&prompts)?.as_bytes())?;

    let gcfg = GenerationConfig {
        max_new_tokens: new_tokens as usize,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
        eos_id: -1, // never stop early: every run generates exactly new_tokens
        end_of_turn_id: None,
        pad_id: 0,
    };
    let mut reference = match b.python.as_deref() {
        Some("none") => None,
        other => {
            let args = serde_json::json!({
                "family": family, "checkpoint": dir.path(), "prompts_file": prompts_file,
                "new_tokens": new_tokens,
                "device": if device.is_cuda() { "cuda" } else { "cpu" },
                "dtype": b.dtype, "threads": tch::get_num_threads(),
            });
            Some(Reference::start(&python(other), &scripts_dir().join("bench_generate.py"), &args)?)
        }
    };
    // One generate call: its seconds, the prefill's (until the first
    // token is chosen) and the generated ids.
    let timed = || -> Result<(f64, f64, Vec<Vec<i64>>)> {
        let t0 = Instant::now();
        let mut prefill = f64::NAN;
        let out = lm::generate::generate_with(&model, &prompts, &gcfg, |step, _| {
            if step == 0 {
                prefill = t0.elapsed().as_secs_f64();
            }
            true
        })?;
        Ok((t0.elapsed().as_secs_f64(), prefill, out.into_iter().map(|g| g.tokens).collect()))
    };
    timed()?; // warm-up
    if b.profile {
        profile(&model, &prompts, new_tokens, window)?;
    }
    let floor = MatmulFloor::new(&cfg, batch, prompt_len, new_tokens as usize, device, kind);
    floor.time()?; // warm-up

    // Interleaved (align, the matmuls alone, transformers, again).
    let (mut times, mut prefills, mut floor_times, mut ref_times) = (vec![], vec![], vec![], vec![]);
    let mut ids = vec![];
    for _ in 0..b.repeats {
        let (t, p, out) = timed()?;
        times.push(t);
        prefills.push(p);
        ids = out;
        floor_times.push(floor.time()?);
        if let Some(r) = reference.as_mut() {
            ref_times.push(r.time()?);
        }
    }
    let tokens = (batch * new_tokens) as f64;
    let decode_tokens = (batch * (new_tokens - 1)) as f64;
    let (t, p) = (median(times.clone()), median(prefills.clone()));
    let decode_s = median(times.iter().zip(&prefills).map(|(t, p)| t - p).collect());
    let align_tps = tokens / t;
    let floor_tps = tokens / median(floor_times);
    let layer_list: Vec<&str> =
        specs.iter().map(|s| if matches!(s.span, Span::Full) { "full" } else { "sliding" }).collect();
    println!(
        "model {family} ({} {:.1}M params: vocab {}, hidden {}, MLP {}, {} layers [{}], {} query heads over {} \
         key/value head(s) of {}, window {window}{}), batch {batch}, prompt {prompt_len}, new {new_tokens} greedy, \
         {:?} {}, threads {}, {} interleaved rounds",
        cfg.model_type,
        cfg.num_parameters() as f64 / 1e6,
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        layer_list.join(" "),
        cfg.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.head_dim(),
        match (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) {
            (None, None) => String::new(),
            (a, f) => format!(", soft-caps attention {a:?} final {f:?}"),
        },
        device,
        b.dtype,
        tch::get_num_threads(),
        b.repeats
    );
    println!(
        "align        {:>8.1} tokens/s  (prefill {:.2} s, decoding {:.1} tokens/s; {:.0}% of the matmul-only rate)",
        align_tps,
        p,
        decode_tokens / decode_s,
        100.0 * align_tps / floor_tps
    );
    println!(
        "matmul only  {:>8.1} tokens/s  (the same projections and head alone, libtorch kernels)",
        floor_tps
    );

    // The caches: align's as generate allocates it, and the bound.
    let capacity = prompt_len + new_tokens;
    let align_bytes = KvCache::new(&cfg, batch, capacity, kind, device)?.bytes();
    let bound = layer_kv_bytes(&cfg, batch, window.min(capacity), kind) * n_sliding
        + layer_kv_bytes(&cfg, batch, capacity, kind) * n_full;
    let unbounded = layer_kv_bytes(&cfg, batch, capacity, kind) * (n_sliding + n_full);
    let mib = |x: i64| x as f64 / (1 << 20) as f64;
    println!(
        "align KV cache        {:>7.2} MiB  ({} sliding layers × {} slots + {} full × {capacity})",
        mib(align_bytes),
        n_sliding,
        window.min(capacity),
        n_full
    );
    println!(
        "bound                 {:>7.2} MiB  (window {window} × {n_sliding} sliding layers + {capacity} × {n_full} full; \
         {:.2} MiB if every layer kept the whole sequence)",
        mib(bound),
        mib(unbounded)
    );
    if align_bytes > bound {
        println!("  align's cache exceeds the bound by {} bytes", align_bytes - bound);
    }
    let Some(r) = reference else { return Ok(()) };
    let v = r.finish()?;
    let ref_t = median(ref_times.clone());
    let ref_prefills: Vec<f64> = v["prefill_seconds"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    // The reference's list starts with its warm-up, which align did not time.
    let ref_prefills = &ref_prefills[ref_prefills.len().saturating_sub(ref_times.len())..];
    let ref_tps = tokens / ref_t;
    let (ref_p, ref_decode) = if ref_prefills.len() == ref_times.len() && !ref_times.is_empty() {
        (
            median(ref_prefills.to_vec()),
            median(ref_times.iter().zip(ref_prefills).map(|(t, p)| t - p).collect()),
        )
    } else {
        (f64::NAN, f64::NAN)
    };
    println!(
        "transformers {:>8.1} tokens/s  (prefill {:.2} s, decoding {:.1} tokens/s; attn_implementation {}, \
         transformers {}, torch {})",
        ref_tps,
        ref_p,
        decode_tokens / ref_decode,
        v["attn_implementation"].as_str().unwrap_or("?"),
        v["transformers"].as_str().unwrap_or("?"),
        v["torch"].as_str().unwrap_or("?")
    );
    println!(
        "ratio        {:>8.2}x  (prefill {:.2}x, decoding {:.2}x; target 1.3x)",
        align_tps / ref_tps,
        ref_p / p,
        ref_decode / decode_s
    );
    let ref_bytes = v["cache_bytes"].as_i64().unwrap_or(-1);
    println!(
        "transformers KV cache {:>7.2} MiB  ({}; {:.2} MiB of storage held)",
        mib(ref_bytes),
        v["cache_layout"].as_str().unwrap_or("?"),
        mib(v["cache_storage_bytes"].as_i64().unwrap_or(-1))
    );

    // Greedy ids: align's over its ring cache against transformers'.
    let ref_ids: Vec<Vec<i64>> = serde_json::from_value(v["ids"].clone()).context("the reference's ids")?;
    if ref_ids.len() != ids.len() {
        bail!("transformers returned {} rows of ids for {} prompts", ref_ids.len(), ids.len());
    }
    let mut all_equal = true;
    for (row, (a, t)) in ids.iter().zip(&ref_ids).enumerate() {
        if let Some(i) = first_mismatch(a, t) {
            all_equal = false;
            let at = |v: &[i64]| v.get(i).map_or("none".into(), |x| x.to_string());
            println!(
                "greedy ids   row {row}: first mismatch at new token {i} (align {}, transformers {}); \
                 {i} of {} equal before it",
                at(a),
                at(t),
                a.len()
            );
        }
    }
    if all_equal {
        println!("greedy ids   equal: align's {} × {new_tokens} ids are transformers' (ring cache over window {window})", ids.len());
    }
    Ok(())
}

/// Seconds of `f`, the best of three.
fn best_of_3(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        f()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// `--profile`: align's parts of one generate call, timed apart.
fn profile(model: &lm::Gemma, prompts: &[Vec<i64>], new_tokens: i64, window: i64) -> Result<()> {
    use tch::{Kind, Tensor};
    let _g = tch::no_grad_guard();
    let (b, p) = (prompts.len() as i64, prompts[0].len() as i64);
    let dev = model.device();
    let ids = Tensor::from_slice(&prompts.concat()).view([b, p]).to_device(dev);
    let pos = Tensor::arange(p, (Kind::Int64, dev)).unsqueeze(0).expand([b, p], true);
    let cap = p + new_tokens;
    let t_wt = best_of_3(|| {
        drop(lm::InferenceWeights::for_model(model));
        Ok(())
    })?;
    let wt = lm::InferenceWeights::for_model(model);
    let wt = wt.as_ref();
    let last = |h: &Tensor| model.logits_with(&h.narrow(1, h.size()[1] - 1, 1), wt).to_kind(Kind::Float);
    let mut whole = None;
    let t_whole = best_of_3(|| {
        let mut cache = KvCache::new(&model.cfg, b, cap, model.kind(), dev)?;
        let h = model.forward_hidden_with(&ids, &pos, None, Some(&mut cache), wt)?;
        whole = Some(last(&h));
        Ok(())
    })?;
    let mut no_cache = None;
    let t_nocache = best_of_3(|| {
        let h = model.forward_hidden_with(&ids, &pos, None, None, wt)?;
        no_cache = Some(last(&h));
        Ok(())
    })?;
    let chunk = window.max(1);
    let mut chunked = None;
    let mut cache_after = None;
    let t_chunked = best_of_3(|| {
        let mut cache = KvCache::new(&model.cfg, b, cap, model.kind(), dev)?;
        let mut h = None;
        let mut c0 = 0;
        while c0 < p {
            let n = chunk.min(p - c0);
            h = Some(model.forward_hidden_with(
                &ids.narrow(1, c0, n),
                &pos.narrow(1, c0, n),
                None,
                Some(&mut cache),
                wt,
            )?);
            c0 += n;
        }
        chunked = h.as_ref().map(last);
        cache_after = Some(cache);
        Ok(())
    })?;
    let diff = |a: &Option<Tensor>, b: &Option<Tensor>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs().max().double_value(&[]),
        _ => f64::NAN,
    };
    // Decoding steps after the prefill.
    let mut cache = cache_after.context("no cache")?;
    let steps = 16.min(new_tokens - 1).max(1);
    let x = Tensor::from_slice(&vec![10i64; b as usize]).view([b, 1]).to_device(dev);
    let t0 = Instant::now();
    for s in 0..steps {
        let pos = Tensor::full([b, 1], p + s, (Kind::Int64, dev));
        let h = model.forward_hidden_with(&x, &pos, None, Some(&mut cache), wt)?;
        let _ = model.logits_with(&h, wt).argmax(-1, false).int64_value(&[0, 0]);
    }
    let t_step = t0.elapsed().as_secs_f64() / steps as f64;
    println!(
        "profile      inference layout {:.3} s; prefill of {p} tokens: one pass through the cache {:.2} s, \
         one pass without a cache {:.2} s, in chunks of {chunk} through the cache (generate's way) {:.2} s \
         (last logits differ from the first's by {:.1e} and {:.1e}); one decoding step {:.1} ms",
        t_wt,
        t_whole,
        t_nocache,
        t_chunked,
        diff(&whole, &no_cache),
        diff(&whole, &chunked),
        1e3 * t_step
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_configs_build_with_windows_shorter_than_the_prompt() {
        for f in FAMILIES {
            let cfg = bench_config(f).unwrap();
            assert_eq!(cfg.sliding_window, Some(512));
            let specs = layer_specs(&cfg, cfg.family().unwrap()).unwrap();
            assert!(specs.iter().any(|s| s.span == Span::Full));
            assert!(specs.iter().any(|s| s.span == Span::Sliding(512)));
        }
        assert!(bench_config("gemma4").is_err());
    }

    #[test]
    fn first_mismatch_finds_the_first_differing_index() {
        assert_eq!(first_mismatch(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_mismatch(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_mismatch(&[1, 2], &[1, 2, 3]), Some(2));
    }
}
