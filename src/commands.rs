//! The model commands: generate, chat, inspect, init, merge, tokenizer train.

use crate::{RunOpts, SamplingOpts};
use anyhow::{bail, Context, Result};
use lm::chat::{self, Message};
use lm::checkpoint::{self, Loaded};
use lm::device::{parse_device, parse_dtype};
use lm::{GemmaConfig, GenerationConfig, Tokenizer};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

fn load(model: &Path, run: &RunOpts) -> Result<Loaded> {
    let device = parse_device(&run.device)?;
    let kind = parse_dtype(&run.dtype)?;
    checkpoint::load_causal_lm(model, device, kind)
}

/// Refuses sampling flags that cannot work, before a model is loaded.
fn check_sampling(s: &SamplingOpts) -> Result<()> {
    if s.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1: 0 would generate nothing");
    }
    let cfg = GenerationConfig {
        max_new_tokens: s.max_new_tokens,
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        seed: s.seed,
        eos_id: 0,
        end_of_turn_id: None,
        pad_id: 0,
    };
    cfg.validate().map_err(|e| anyhow::anyhow!("--{}", e.to_string().replacen('_', "-", 1)))
}

fn gen_config(s: &SamplingOpts, tok: &Tokenizer) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: s.max_new_tokens,
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        seed: s.seed,
        eos_id: tok.special.eos,
        end_of_turn_id: Some(tok.special.end_of_turn),
        pad_id: tok.special.pad,
    }
}

pub fn generate(
    model: &Path,
    prompt: &str,
    system: Option<&str>,
    sampling: &SamplingOpts,
    run: &RunOpts,
    json: bool,
    logprobs: bool,
) -> Result<()> {
    check_sampling(sampling)?;
    let m = load(model, run)?;
    let prompt_ids = chat::prompt_ids(&m.tokenizer, &chat::single_turn(system, prompt))?;
    let cfg = gen_config(sampling, &m.tokenizer);
    let out = lm::generate(&m.model, std::slice::from_ref(&prompt_ids), &cfg)?;
    let g = &out[0];
    let text = m.tokenizer.decode(g.content(), true)?;
    if json {
        let mut v = serde_json::json!({
            "prompt_ids": prompt_ids,
            "token_ids": g.content(),
            "text": text,
            "stop_reason": g.stop_reason,
        });
        if logprobs {
            // One per entry of token_ids (the stop token's is left out).
            v["logprobs"] = serde_json::json!(g.logprobs[..g.content().len()]);
        }
        println!("{v}");
    } else {
        println!("{text}");
    }
    Ok(())
}

pub fn chat(model: &Path, system: Option<&str>, sampling: &SamplingOpts, run: &RunOpts) -> Result<()> {
    check_sampling(sampling)?;
    let m = load(model, run)?;
    let cfg = gen_config(sampling, &m.tokenizer);
    let mut history: Vec<Message> = system.map(|s| vec![Message::new("system", s)]).unwrap_or_default();
    let start = history.len();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("align chat with {} — /reset clears the history, /quit leaves", model.display());
    let mut turn = 0u64;
    let wt = lm::InferenceWeights::for_model(&m.model); // once for the whole chat
    loop {
        write!(out, "you> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.truncate(start);
                println!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::user(line));
        let ids = chat::prompt_ids(&m.tokenizer, &history)?;
        let mut c = cfg.clone();
        c.seed = cfg.seed.wrapping_add(turn);
        turn += 1;
        let g =
            lm::generate::generate_using(&m.model, wt.as_ref(), std::slice::from_ref(&ids), &c, |_, _| true)?
                .remove(0);
        let text = m.tokenizer.decode(g.content(), true)?;
        println!("model> {text}");
        history.push(Message::model(&text));
    }
    Ok(())
}

/// Reads a conversation: a JSON list of messages or an object with `messages`.
pub fn read_messages(path: &Path) -> Result<Vec<Message>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let list = match &v {
        serde_json::Value::Object(o) => o
            .get("messages")
            .cloned()
            .with_context(|| format!("{}: the object has no \"messages\" field", path.display()))?,
        other => other.clone(),
    };
    serde_json::from_value(list).with_context(|| {
        format!("{}: expected a list of {{\"role\": ..., \"content\": ...}} messages", path.display())
    })
}

pub fn inspect(model: &Path, messages: &Path, tokens: bool) -> Result<()> {
    let tok = Tokenizer::from_file(&model.join(checkpoint::TOKENIZER))?;
    let msgs = read_messages(messages)?;
    let rendered = chat::render_for(&tok, &msgs, false)
        .with_context(|| format!("conversation in {}", messages.display()))?;
    let enc = chat::encode(&tok, &msgs, false)?;
    println!("── chat template: {} ──", tok.describe_chat_template());
    println!("── rendered (trained spans between ⟦ and ⟧) ──");
    let mut text = String::new();
    let mut pos = 0;
    for sp in &rendered.trained {
        text.push_str(&rendered.text[pos..sp.start]);
        text.push('⟦');
        text.push_str(&rendered.text[sp.clone()]);
        text.push('⟧');
        pos = sp.end;
    }
    text.push_str(&rendered.text[pos..]);
    println!("{text}");
    let trained = enc.loss_mask.iter().filter(|&&m| m).count();
    println!("── {} tokens, {} trained, {} not trained ──", enc.ids.len(), trained, enc.ids.len() - trained);
    if tokens {
        for (i, (&id, &m)) in enc.ids.iter().zip(&enc.loss_mask).enumerate() {
            println!("{i:>5} {id:>7} {} {:?}", if m { "T" } else { "." }, tok.id_to_token(id));
        }
    }
    Ok(())
}

/// `align init`: a freshly initialised checkpoint in `out`, which must be
/// new or empty unless `force` (it is replaced whole). The weights are
/// built in `dtype` (`f32` or `bf16`) without a first random draw,
/// filled from `seed` tensor by tensor, and streamed to shards of at most
/// `max_shard_size` (`"5GB"`, `"500MB"`, bytes): a gemma-2b needs its
/// weights' size in memory and little more.
pub fn init(
    preset: &str,
    tokenizer: &Path,
    out: &Path,
    seed: i64,
    force: bool,
    dtype: &str,
    max_shard_size: &str,
) -> Result<()> {
    let kind = parse_dtype(dtype)?;
    let max_shard_bytes = lm::safetensors_io::parse_size(max_shard_size).context("--max-shard-size")?;
    let tok = Tokenizer::from_file(tokenizer)?;
    let mut cfg = GemmaConfig::preset_for_tokenizer(preset, tok.vocab_size())?;
    if lm::fsio::same_file(out, tokenizer)
        || lm::fsio::canonical(tokenizer).starts_with(lm::fsio::canonical(out))
    {
        bail!(
            "--out {} holds the --tokenizer file {}; write the model elsewhere",
            out.display(),
            tokenizer.display()
        );
    }
    if !force {
        if out.is_file() {
            bail!("--out {} is a file; give a new or empty directory", out.display());
        }
        let n = std::fs::read_dir(out).map(|d| d.count()).unwrap_or(0);
        if n > 0 {
            bail!(
                "--out {} is not empty ({n} entr{}); init writes a new directory and would delete them. Give a new or empty directory, or --force to replace it",
                out.display(),
                if n == 1 { "y" } else { "ies" }
            );
        }
    }
    cfg.pad_token_id = Some(tok.special.pad);
    cfg.bos_token_id = Some(tok.special.bos);
    cfg.eos_token_id = Some(serde_json::json!(tok.special.eos));
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    vs.set_kind(kind);
    let _model = lm::Gemma::with_init(&vs.root(), &cfg, lm::WeightInit::Zeros)?;
    lm::init::init_seeded(&vs, cfg.initializer_range, seed as u64)?;
    let opts = checkpoint::SaveOptions { max_shard_bytes, ..Default::default() };
    checkpoint::save(out, &vs, &cfg, &tok, &opts)?;
    eprintln!(
        "wrote {} ({preset}, {:.2}M parameters, vocab {})",
        out.display(),
        cfg.num_parameters() as f64 / 1e6,
        cfg.vocab_size
    );
    Ok(())
}

/// `align merge`: the adapter in `adapter` merged into the base in `base`,
/// written to `out` (new or empty, and neither input).
pub fn merge(base: &Path, adapter: &Path, out: &Path, dtype: Option<&str>) -> Result<()> {
    let kind = dtype.map(parse_dtype).transpose()?;
    for (input, flag) in [(base, "--base"), (adapter, "--adapter")] {
        let (o, i) = (lm::fsio::canonical(out), lm::fsio::canonical(input));
        if o == i || i.starts_with(&o) {
            bail!(
                "--out {} overlaps the {flag} directory {}; write the merged model elsewhere",
                out.display(),
                input.display()
            );
        }
    }
    if out.is_file() {
        bail!("--out {} is a file; give a new or empty directory", out.display());
    }
    let n = std::fs::read_dir(out).map(|d| d.count()).unwrap_or(0);
    if n > 0 {
        bail!(
            "--out {} is not empty ({n} entr{}); give a new or empty directory",
            out.display(),
            if n == 1 { "y" } else { "ies" }
        );
    }
    let r = lm::peft::merge_dirs(base, adapter, out, kind)?;
    eprintln!(
        "wrote {}: {} adapter merged into {} ({} projections, {})",
        out.display(),
        r.task_type.as_str(),
        base.display(),
        r.merged,
        if r.kind == tch::Kind::BFloat16 { "bf16" } else { "f32" }
    );
    Ok(())
}

pub fn train_tokenizer(inputs: &[PathBuf], vocab_size: usize, out: &Path) -> Result<()> {
    let mut lines = Vec::new();
    for p in inputs {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        lines.extend(text.lines().filter(|l| !l.trim().is_empty()).map(String::from));
    }
    if lines.is_empty() {
        bail!("no text to train on in {:?}", inputs);
    }
    let tok = Tokenizer::train_bpe(lines.iter(), vocab_size)?;
    tok.save(out)?;
    eprintln!("wrote {} ({} tokens, trained on {} lines)", out.display(), tok.vocab_size(), lines.len());
    Ok(())
}

pub fn sft(config: &Path) -> Result<()> {
    let mut cfg = sft::SftConfig::from_toml_file(config)?;
    let base = config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    cfg.resolve_paths(&base);
    let s = sft::run(&cfg, &base)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// Prints the runtime: libtorch build, CUDA devices, threads; fails when
/// `ALIGN_REQUIRE_CUDA=1` and CUDA is not usable (the GPU smoke check).
pub fn info() -> Result<()> {
    let cuda = tch::Cuda::is_available();
    let v = serde_json::json!({
        "align": env!("CARGO_PKG_VERSION"),
        "cuda_available": cuda,
        "cuda_devices": tch::Cuda::device_count(),
        "cudnn_available": tch::Cuda::cudnn_is_available(),
        "threads": tch::get_num_threads(),
        "mkldnn": tch::utils::has_mkldnn(),
        "libtorch_has_cuda": tch::utils::has_cuda(),
        // c10d backends compiled into the C++ bridge (native/): gloo, nccl.
        "distributed_backends": align_native::backends().names(),
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    if std::env::var("ALIGN_REQUIRE_CUDA").is_ok_and(|v| v == "1") && !cuda {
        bail!("ALIGN_REQUIRE_CUDA=1 but libtorch sees no CUDA device (is libtorch_cuda.so linked?)");
    }
    if cuda {
        let t = tch::Tensor::ones([2, 2], (tch::Kind::BFloat16, tch::Device::Cuda(0)));
        let s = t.matmul(&t).sum(tch::Kind::Float).double_value(&[]);
        if s != 8.0 {
            bail!("a bf16 matmul on CUDA gave {s}, expected 8");
        }
    }
    Ok(())
}

/// Oracle accuracy of greedy answers to built-in task prompts, overall and
/// per category.
pub fn eval_tasks(
    model: &Path,
    prompts: &str,
    max_new_tokens: usize,
    batch: usize,
    run: &RunOpts,
    out: Option<&Path>,
) -> Result<serde_json::Value> {
    let m = load(model, run)?;
    let opts = datasets::ReadOptions { kind: Some(datasets::RecordKind::PromptOnly), ..Default::default() };
    let ds = datasets::read_dataset(Path::new(prompts), &opts)?;
    let cfg = GenerationConfig {
        max_new_tokens,
        ..gen_config(
            &SamplingOpts { max_new_tokens, temperature: 0.0, top_k: None, top_p: None, seed: 0 },
            &m.tokenizer,
        )
    };
    let mut per: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let mut rows = vec![];
    let wt = lm::InferenceWeights::for_model(&m.model); // once for all chunks
    for chunk in ds.examples.chunks(batch.max(1)) {
        let msgs: Vec<Vec<Message>> = chunk.iter().map(|e| e.record.messages()).collect();
        let ids = msgs.iter().map(|c| chat::prompt_ids(&m.tokenizer, c)).collect::<Result<Vec<_>>>()?;
        let gens = lm::generate::generate_using(&m.model, wt.as_ref(), &ids, &cfg, |_, _| true)?;
        for (e, g) in chunk.iter().zip(gens) {
            let prompt = e.record.messages().last().map(|x| x.content.clone()).unwrap_or_default();
            let answer = m.tokenizer.decode(g.content(), true)?;
            let ok = datasets::tasks::check(&prompt, &answer)
                .with_context(|| format!("{prompt:?} is not a built-in task prompt"))?;
            let cat = e.category.clone().unwrap_or_else(|| "all".into());
            let c = per.entry(cat.clone()).or_default();
            c.0 += ok as usize;
            c.1 += 1;
            rows.push(
                serde_json::json!({"prompt": prompt, "answer": answer, "correct": ok, "category": cat}),
            );
        }
    }
    let (right, n) = per.values().fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1));
    if let Some(p) = out {
        let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
        lm::fsio::write_atomic(p, (text.join("\n") + "\n").as_bytes())?;
    }
    let cats: serde_json::Map<String, serde_json::Value> =
        per.iter().map(|(k, (r, n))| (k.clone(), serde_json::json!(*r as f64 / *n as f64))).collect();
    Ok(
        serde_json::json!({"model": model, "n": n, "accuracy": right as f64 / n.max(1) as f64, "per_category": cats}),
    )
}
