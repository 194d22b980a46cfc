//! `align serve`: its flags and the process around the server (signals).

use crate::server::{start_with, Options};
use anyhow::{Context, Result};
use clap::builder::RangedU64ValueParser;
use std::path::PathBuf;

/// `align serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients send; default the directory's name.
    #[arg(long)]
    pub model_name: Option<String>,
    /// Worker threads that run requests on the model (at least 1).
    #[arg(long, default_value_t = 4, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub workers: usize,
    /// The largest `max_tokens` a request may ask for (also the most a
    /// request without `max_tokens` gets; the model's context may allow
    /// less). At least 1.
    #[arg(long, default_value_t = 512, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_tokens_limit: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// `align serve`: serves until SIGINT or SIGTERM, then answers new requests
/// with a 503, finishes those in progress and returns (exit status 0). A
/// second signal exits at once (status 130).
pub fn cli_serve(args: ServeArgs) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let name = match &args.model_name {
        Some(n) => n.clone(),
        None => args.model.file_name().and_then(|n| n.to_str()).unwrap_or("model").to_string(),
    };
    // The flags are checked before the model is loaded.
    let opts = Options::new(&name, args.port, args.workers, args.max_tokens_limit);
    opts.check()?;
    let device = lm::device::parse_device(&args.device)?;
    let kind = lm::device::parse_dtype(&args.dtype)?;
    let model = lm::checkpoint::load_causal_lm(&args.model, device, kind)?;
    // Handlers first, so that no signal can arrive between listening and them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("align serve: cannot start the signal runtime")?;
    let (mut term, mut int) = {
        let _in = rt.enter();
        let term =
            signal(SignalKind::terminate()).context("align serve: cannot install the SIGTERM handler")?;
        let int =
            signal(SignalKind::interrupt()).context("align serve: cannot install the SIGINT handler")?;
        (term, int)
    };
    let h = start_with(model, opts)?;
    eprintln!("serving {name} at {}/v1/chat/completions (Ctrl-C or SIGTERM stops)", h.url());
    let first = rt.block_on(async {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    });
    eprintln!(
        "{first}: stopped taking requests; finishing {} in progress (a second signal exits at once)",
        h.in_flight()
    );
    std::thread::spawn(move || {
        let second = rt.block_on(async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        });
        eprintln!("{second}: exiting without finishing the requests in progress");
        std::process::exit(130);
    });
    h.shutdown();
    eprintln!("align serve: stopped");
    Ok(())
}
