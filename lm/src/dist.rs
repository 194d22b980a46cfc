//! The data-parallel context of a run: one process (`WORLD_SIZE` unset or
//! 1), or one rank of a c10d process group launched by torchrun (or
//! `srun`, which sets the same variables: `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
//!
//! The group is built once per process, on first use, over the backend for
//! the training device (Gloo on the CPU, NCCL on CUDA; `ALIGN_DIST_BACKEND`
//! overrides), with a timeout for every collective (`ALIGN_DIST_TIMEOUT`,
//! seconds, default 600): a dead peer is an error, never a hang.
//!
//! What the shared training loop does with it
//! ([`crate::train::session`]): gradients are summed over ranks (bucketed)
//! after the micro-batches, loss denominators are global sums, rank 0
//! alone writes checkpoints, metrics and the final model, and every rank
//! resumes from rank 0's checkpoint files (a barrier after each save).

use anyhow::{bail, Context, Result};
use std::sync::Mutex;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

pub use align_native::{backends, Backend, DistEnv, ProcessGroup, ReduceOp};

/// Gradient buckets of 25 MB, as torch's DDP.
pub const BUCKET_BYTES: usize = 25 << 20;

/// One process's place in the run.
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Where the collectives' tensors live (the training device).
    pub device: Device,
    group: Option<Mutex<ProcessGroup>>,
}

static DIST: Mutex<Option<&'static Dist>> = Mutex::new(None);

/// This process's rank from the launch environment (0 when not launched
/// distributed, or when the variables are malformed: [`init`] reports
/// those). For what must be decided before the group exists (the output
/// directory's lock).
pub fn env_rank() -> usize {
    DistEnv::from_env().ok().flatten().map_or(0, |e| e.rank)
}

/// `cuda:LOCAL_RANK` when launched distributed on a machine with CUDA, for
/// `device = "auto"`; `None` when not launched distributed.
pub fn auto_device() -> Option<Device> {
    let env = DistEnv::from_env().ok().flatten()?;
    tch::Cuda::is_available()
        .then(|| Device::Cuda(env.local_rank % tch::Cuda::device_count().max(1) as usize))
}

fn timeout() -> Result<Duration> {
    match std::env::var("ALIGN_DIST_TIMEOUT") {
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            _ => bail!("ALIGN_DIST_TIMEOUT must be a positive number of seconds, got '{v}'"),
        },
        Err(_) => Ok(align_native::DEFAULT_TIMEOUT),
    }
}

/// The context of this process, built on the first call from the launch
/// environment for tensors on `device` (the group is joined then: every
/// rank must call it). Later calls return the same context; a call for a
/// device that needs another backend is an error.
pub fn init(device: Device) -> Result<&'static Dist> {
    let mut slot = DIST.lock().map_err(|_| anyhow::anyhow!("the distributed context is poisoned"))?;
    if let Some(d) = *slot {
        if d.world > 1 && Backend::for_device(d.device) != Backend::for_device(device) {
            bail!("this run's process group is for {:?}; a stage on {device:?} cannot join it", d.device);
        }
        return Ok(d);
    }
    let d = match DistEnv::from_env()? {
        None => Dist { rank: 0, world: 1, local_rank: 0, device, group: None },
        Some(env) if env.world_size == 1 => {
            Dist { rank: 0, world: 1, local_rank: env.local_rank, device, group: None }
        }
        Some(env) => {
            let backend = match std::env::var("ALIGN_DIST_BACKEND") {
                Ok(b) => Backend::parse(b.trim())?,
                Err(_) => Backend::for_device(device),
            };
            if backend == Backend::Nccl && !device.is_cuda() {
                bail!("backend nccl needs the model on CUDA (device = \"auto\" or \"cuda\"), it is on {device:?}");
            }
            if backend == Backend::Gloo && device.is_cuda() {
                bail!("backend gloo takes CPU tensors; a run on {device:?} needs nccl");
            }
            let t = timeout()?;
            let group = ProcessGroup::new(&env, backend, t)?;
            eprintln!(
                "rank {} of {}: joined the {} process group at {}:{}",
                env.rank,
                env.world_size,
                backend.name(),
                env.master_addr,
                env.master_port
            );
            Dist {
                rank: env.rank,
                world: env.world_size,
                local_rank: env.local_rank,
                device,
                group: Some(Mutex::new(group)),
            }
        }
    };
    let d: &'static Dist = Box::leak(Box::new(d));
    *slot = Some(d);
    Ok(d)
}

impl Dist {
    /// A single process (for tests and tools that never join a group).
    pub fn single(device: Device) -> Dist {
        Dist { rank: 0, world: 1, local_rank: 0, device, group: None }
    }

    /// Rank 0: the rank that writes.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn is_distributed(&self) -> bool {
        self.group.is_some()
    }

    fn with_group<T>(&self, what: &str, f: impl FnOnce(&ProcessGroup) -> Result<T>) -> Result<Option<T>> {
        let Some(g) = &self.group else { return Ok(None) };
        let g = g.lock().map_err(|_| anyhow::anyhow!("the process group is poisoned"))?;
        f(&g).map(Some).with_context(|| {
            format!(
                "{what}: rank {} of {} lost its peers (a rank died or stopped answering within the timeout)",
                self.rank, self.world
            )
        })
    }

    /// The sums over ranks of `v` (in f64); `v` itself on one process.
    pub fn sum(&self, v: &[f64]) -> Result<Vec<f64>> {
        self.reduce(v, ReduceOp::Sum)
    }

    /// The maxima over ranks of `v`.
    pub fn max(&self, v: &[f64]) -> Result<Vec<f64>> {
        self.reduce(v, ReduceOp::Max)
    }

    fn reduce(&self, v: &[f64], op: ReduceOp) -> Result<Vec<f64>> {
        if self.group.is_none() || v.is_empty() {
            return Ok(v.to_vec());
        }
        let out = self.with_group("all-reduce of statistics", |g| {
            let mut t = Tensor::from_slice(v).to_device(self.device);
            g.all_reduce(&mut t, op)?;
            Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double))?)
        })?;
        Ok(out.unwrap_or_default())
    }

    /// Sums `tensors` (gradients) over ranks in place, in buckets.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.with_group("all-reduce of gradients", |g| {
            g.all_reduce_bucketed(tensors, ReduceOp::Sum, BUCKET_BYTES)
        })?;
        Ok(())
    }

    /// Copies rank `root`'s `t` into every other rank's `t` (same shape
    /// and dtype on every rank); nothing to do on one process.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.with_group("broadcast", |g| g.broadcast(t, root))?;
        Ok(())
    }

    /// [`Dist::broadcast`] for many tensors, in place, in buckets (ZeRO-1's
    /// updated weights, its optimiser state at a checkpoint).
    pub fn broadcast_bucketed(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        self.with_group("broadcast", |g| g.broadcast_bucketed(tensors, root, BUCKET_BYTES))?;
        Ok(())
    }

    /// Returns when every rank has arrived.
    pub fn barrier(&self) -> Result<()> {
        self.with_group("barrier", |g| g.barrier())?;
        Ok(())
    }

    /// Every rank's `t` (same shape on every rank), concatenated along
    /// dimension 0 in rank order; `t` itself on one process.
    pub fn all_gather_cat(&self, t: &Tensor) -> Result<Tensor> {
        let src = t.to_device(self.device).contiguous();
        match self.with_group("all-gather", |g| g.all_gather(&src))? {
            None => Ok(t.shallow_clone()),
            Some(parts) => Ok(Tensor::f_cat(&parts, 0)?.to_device(t.device())),
        }
    }
}
