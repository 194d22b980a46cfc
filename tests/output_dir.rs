//! Outputs never destroy what align did not create, an output directory is
//! one run's at a time, crash debris goes, and a finished stage is not
//! rewritten (issue 17, items 3–6 and 14).

mod common;
use common::{align, fixture, kill_once_checkpointed, stderr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// An SFT config in `dir` (file `name`) writing to `out`; `extra` lines go
/// into the `[sft]` table.
fn sft_config(dir: &Path, name: &str, out: &Path, data: &Path, extra: &str) -> PathBuf {
    let toml = format!(
        r#"[sft]
model = "{}"
output_dir = "{}"
max_seq_len = 64
batch_size = 8
device = "cpu"
seed = 5
{extra}
[sft.optim]
lr = 2e-3
[sft.data]
seed = 2
held_out = {{ fraction = 0.1 }}
[[sft.data.sources]]
name = "reverse"
path = "{}"
"#,
        fixture("mqa").display(),
        out.display(),
        data.display()
    );
    let p = dir.join(name);
    std::fs::write(&p, toml).unwrap();
    p
}

fn sft(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_align"));
    c.args(["sft", "--config", config.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Every file under `dir` with its contents.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn init_into_a_non_empty_foreign_directory_refuses_and_keeps_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mine");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    std::fs::write(out.join("thesis.tex"), "years of work").unwrap();
    std::fs::write(out.join("sub/data.csv"), "a,b\n1,2\n").unwrap();
    let before = snapshot(&out);
    let tok = fixture("mqa").join("tokenizer.json");
    let args =
        ["init", "--preset", "tiny", "--tokenizer", tok.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let o = align(&args);
    assert!(!o.status.success(), "init into a non-empty directory succeeded");
    let err = stderr(&o);
    assert!(err.contains("is not empty") && err.contains("--force"), "{err}");
    assert_eq!(snapshot(&out), before, "the directory's files changed");
    // A new directory works; --force replaces a non-empty one on request.
    let fresh = tmp.path().join("fresh");
    let o = align(&[
        "init",
        "--preset",
        "tiny",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        fresh.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut forced = args.to_vec();
    forced.push("--force");
    let o = align(&forced);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("config.json").exists() && !out.join("thesis.tex").exists());
}

#[test]
fn score_with_out_equal_to_data_refuses_and_keeps_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = tmp.path().join("rm");
    let l =
        lm::reward_model::load(&fixture("mqa"), tch::Device::Cpu, tch::Kind::Float, Some(0.5), 3).unwrap();
    lm::reward_model::save(&rm, &l.vs, &l.model, &l.tokenizer, None).unwrap();
    let data = tmp.path().join("rows.jsonl");
    let text = "{\"prompt\": \"hi\", \"response\": \"hello\"}\n{\"prompt\": \"a\", \"response\": \"b\"}\n";
    std::fs::write(&data, text).unwrap();
    // The same file, spelled differently.
    let same = tmp.path().join(".").join("rows.jsonl");
    let o = align(&[
        "score",
        "--reward-model",
        rm.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        same.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "score overwrote its input");
    assert!(stderr(&o).contains("is the input file (--data)"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&data).unwrap(), text);
}

#[test]
fn data_mix_refuses_an_output_that_is_one_of_its_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::write_reverse_data(tmp.path(), 10);
    let before = std::fs::read(&data).unwrap();
    let cfg = tmp.path().join("mix.toml");
    std::fs::write(&cfg, "seed = 1\n[[sources]]\nname = \"r\"\npath = \"data.jsonl\"\n").unwrap();
    let o = align(&["data", "mix", cfg.to_str().unwrap(), "--out", data.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is the input file (source \"r\")"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&data).unwrap(), before);
}

#[test]
fn a_stage_refuses_an_output_dir_of_foreign_files_or_its_own_input() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::write_reverse_data(tmp.path(), 20);
    let foreign = tmp.path().join("photos");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("cat.jpg"), "meow").unwrap();
    let c = sft_config(tmp.path(), "a.toml", &foreign, &data, "max_steps = 2");
    let o = sft(&c).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("was not made by align"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1, "files were added to the foreign directory");
    // output_dir = the model it starts from.
    let c = sft_config(tmp.path(), "b.toml", &fixture("mqa"), &data, "max_steps = 2");
    let o = sft(&c).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is the stage's input model"), "{}", stderr(&o));
}

#[test]
fn two_concurrent_runs_on_one_output_dir_one_proceeds_the_other_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::write_reverse_data(tmp.path(), 120);
    let out = tmp.path().join("out");
    let ca = sft_config(tmp.path(), "a.toml", &out, &data, "max_steps = 40\nsave_every = 10");
    let cb = sft_config(tmp.path(), "b.toml", &out, &data, "max_steps = 40\nsave_every = 10\ngrad_accum = 2");
    let mut a = sft(&ca).spawn().unwrap();
    let mut b = sft(&cb).spawn().unwrap();
    // The first to exit is the one refused, at once.
    let t0 = Instant::now();
    let (loser, winner, winner_pid) = loop {
        if a.try_wait().unwrap().is_some() {
            let pid = b.id();
            break (a, b, pid);
        }
        if b.try_wait().unwrap().is_some() {
            let pid = a.id();
            break (b, a, pid);
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "neither run ended");
        std::thread::sleep(Duration::from_millis(5));
    };
    let lo = loser.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&lo.stderr).to_string();
    assert!(!lo.status.success(), "both runs proceeded: {err}");
    assert!(err.contains("in use by another align run"), "{err}");
    assert!(err.contains(&format!("pid {winner_pid} on host")), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(60), "the refusal was not at once");
    let wo = winner.wait_with_output().unwrap();
    assert!(wo.status.success(), "{}", String::from_utf8_lossy(&wo.stderr));
    assert!(!out.join(lm::output_dir::LOCK_FILE).exists(), "the lock outlived its run");
    assert!(out.join("model/model.safetensors").exists());
}

#[test]
fn no_partial_or_tmp_debris_remains_after_kill_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::write_reverse_data(tmp.path(), 120);
    let out = tmp.path().join("out");
    let c = sft_config(tmp.path(), "sft.toml", &out, &data, "max_steps = 60\nsave_every = 10\nkeep_last = 2");
    let mut child = sft(&c).spawn().unwrap();
    let ckpts = out.join("checkpoints");
    kill_once_checkpointed(&mut child, &ckpts, 20, Duration::from_secs(300), "checkpoint", "sft");
    // What a kill in the middle of a write leaves (fsio's temp names), on
    // top of whatever this kill left: a checkpoint being assembled, a model
    // directory being assembled, temp files, a checkpoint cut off before
    // its state file, and the dead run's lock.
    let last = lm::train::list_checkpoints(&ckpts).unwrap().pop().unwrap().1;
    let planted = [
        ckpts.join(".step-00000099.partial-AbC123"),
        out.join(".model.partial-XyZ789"),
        ckpts.join("step-00000099"),
    ];
    for d in &planted {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    }
    std::fs::write(out.join(".tmpQw3rTy"), "half a summary").unwrap();
    std::fs::write(last.join(".tmpAAAAAA"), "half an optimizer").unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    assert!(out.join(lm::output_dir::LOCK_FILE).exists(), "the killed run left no lock");
    let o = sft(&c).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming from"), "{err}");
    let debris: Vec<PathBuf> = snapshot(&out)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| {
            p.strip_prefix(&out).unwrap().components().any(|c| {
                let n = c.as_os_str().to_string_lossy();
                n.contains(".partial-") || n.starts_with(".tmp") || n.contains(".old-")
            })
        })
        .collect();
    assert!(debris.is_empty(), "debris left: {debris:?}");
    assert!(!ckpts.join("step-00000099").exists(), "the cut-off checkpoint is still there");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    assert!(!out.join(lm::output_dir::LOCK_FILE).exists());
}

#[test]
fn rerun_of_a_finished_stage_leaves_summary_and_metrics_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::write_reverse_data(tmp.path(), 60);
    let out = tmp.path().join("out");
    let c = sft_config(tmp.path(), "sft.toml", &out, &data, "max_steps = 12\neval_every = 6\nsave_every = 6");
    let o = sft(&c).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = lm::train::read_metrics(&out.join("metrics.jsonl")).unwrap();
    let evals: Vec<u64> = metrics
        .iter()
        .filter(|r| r.get("eval_loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![6, 12], "each evaluation step is logged once");
    let summary = std::fs::read(out.join("summary.json")).unwrap();
    let metrics = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let o = sft(&c).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing to do"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("summary.json")).unwrap(), summary, "summary.json was rewritten");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics, "metrics.jsonl changed");
}
