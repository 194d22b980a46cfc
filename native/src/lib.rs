//! A C++ bridge to the parts of libtorch that tch does not bind.
//!
//! `src/bridge.cpp` is compiled by the build script against the same libtorch
//! that torch-sys links. It exposes a narrow C ABI: tensors cross it as tch's
//! `C_tensor*` (an `at::Tensor*`), every C++ exception is caught on the C++
//! side and comes back as an error string. This module wraps that ABI in a
//! safe API:
//!
//! - [`fused_adamw_step`]: libtorch's fused AdamW kernel (`at::_fused_adamw_`,
//!   what `torch.optim.AdamW(fused=True)` runs), one step over lists of
//!   parameters, gradients and moments.
//! - [`ProcessGroup`]: a c10d process group (PyTorch's own distributed
//!   engine, the one `torch.distributed` uses) over a `TCPStore` rendezvous,
//!   with the Gloo backend on CPU and NCCL on CUDA, and the collectives
//!   `all_reduce` (sum, avg, max, min), `all_reduce_bucketed` (gradients
//!   flattened into buckets), `broadcast`, `barrier`, `all_gather` and
//!   `reduce_scatter`. Every rendezvous and collective is bounded by the
//!   group's timeout: a dead or missing peer is an error, not a hang.
//! - [`DistEnv`]: the launch environment torchrun (or SLURM's `srun`) sets:
//!   `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
//! - [`backends`]: which backends this build has. Gloo needs Gloo's headers
//!   (Debian's libgloo-dev) at build time, NCCL a CUDA libtorch and `nccl.h`;
//!   without them the bridge still builds, and asking for the missing backend
//!   is an error saying why.

use anyhow::{anyhow, bail, Context, Result};
use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;
use tch::{Device, Tensor};
use torch_sys::C_tensor;

mod ffi {
    use super::*;
    extern "C" {
        pub fn align_native_free_error(e: *mut c_char);
        pub fn align_native_backends() -> u32;
        pub fn align_native_fused_adamw(
            params: *const *mut C_tensor,
            grads: *const *mut C_tensor,
            exp_avgs: *const *mut C_tensor,
            exp_avg_sqs: *const *mut C_tensor,
            n: usize,
            step: f64,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
        ) -> *mut c_char;
        #[allow(clippy::too_many_arguments)]
        pub fn align_native_group_new(
            backend: *const c_char,
            master_addr: *const c_char,
            port: u16,
            rank: i32,
            world: i32,
            device: i64,
            store_is_external: i32,
            prefix: *const c_char,
            timeout_ms: i64,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn align_native_group_free(group: *mut c_void);
        pub fn align_native_all_reduce(group: *mut c_void, t: *mut C_tensor, op: i32) -> *mut c_char;
        pub fn align_native_broadcast(group: *mut c_void, t: *mut C_tensor, root: i32) -> *mut c_char;
        pub fn align_native_barrier(group: *mut c_void) -> *mut c_char;
        pub fn align_native_all_gather(
            group: *mut c_void,
            input: *mut C_tensor,
            outputs: *const *mut C_tensor,
            n: usize,
        ) -> *mut c_char;
        pub fn align_native_reduce_scatter(
            group: *mut c_void,
            output: *mut C_tensor,
            inputs: *const *mut C_tensor,
            n: usize,
            op: i32,
        ) -> *mut c_char;
    }
}

/// Turns the bridge's error convention (NULL or a malloc'd message) into a Result.
fn check(e: *mut c_char) -> Result<()> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string the bridge
    // allocated with malloc; it is read once and freed by the bridge.
    let msg = unsafe { CStr::from_ptr(e) }.to_string_lossy().trim().to_string();
    unsafe { ffi::align_native_free_error(e) };
    Err(anyhow!(msg))
}

fn ptr(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

fn ptrs(ts: &[Tensor]) -> Vec<*mut C_tensor> {
    ts.iter().map(ptr).collect()
}

/// The distributed backends compiled into this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backends {
    pub gloo: bool,
    pub nccl: bool,
}

impl Backends {
    /// The names of the compiled backends, e.g. `["gloo", "nccl"]`.
    pub fn names(&self) -> Vec<&'static str> {
        [(self.gloo, "gloo"), (self.nccl, "nccl")].into_iter().filter(|b| b.0).map(|b| b.1).collect()
    }
}

/// Which distributed backends the bridge was built with.
pub fn backends() -> Backends {
    // SAFETY: no arguments, returns a constant.
    let b = unsafe { ffi::align_native_backends() };
    Backends { gloo: b & 1 != 0, nccl: b & 2 != 0 }
}

/// One AdamW step with libtorch's fused kernel (`at::_fused_adamw_`), as
/// `torch.optim.AdamW(fused=True)` computes it:
///
/// ```text
/// w ← w·(1 − lr·weight_decay)
/// m ← β1·m + (1 − β1)·g
/// v ← β2·v + (1 − β2)·g²
/// w ← w − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)
/// ```
///
/// `params`, `exp_avgs` and `exp_avg_sqs` are updated in place (tch tensors
/// share storage, so shallow clones of the optimiser's tensors will do).
/// `step_count` is the 1-based number of this step (t above). All tensors of
/// one index have the same shape, dtype and device and are contiguous
/// (checked: an error otherwise); the kernel runs on CPU and CUDA, on f32,
/// bf16 and f16 parameters. Gradients are read, not changed. One call takes one
/// `weight_decay`: call it once per parameter group.
#[allow(clippy::too_many_arguments)]
pub fn fused_adamw_step(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step_count: u64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
    eps: f64,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || exp_avgs.len() != n || exp_avg_sqs.len() != n {
        bail!(
            "fused_adamw_step: {n} params but {} grads, {} exp_avgs, {} exp_avg_sqs",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len()
        );
    }
    if step_count == 0 {
        bail!("fused_adamw_step: step_count is 1-based, got 0");
    }
    if let Some(i) = grads.iter().position(|g| !g.defined()) {
        bail!("fused_adamw_step: gradient {i} is undefined (leave such parameters out)");
    }
    if let Some(i) = params.iter().position(|p| !p.defined()) {
        bail!("fused_adamw_step: parameter {i} is undefined");
    }
    // The kernel trusts its inputs (a short gradient would be read past its
    // end): shapes, dtypes, devices and layout are checked here.
    for i in 0..n {
        let p = &params[i];
        for (what, t) in [("gradient", &grads[i]), ("exp_avg", &exp_avgs[i]), ("exp_avg_sq", &exp_avg_sqs[i])]
        {
            if !t.defined() || t.size() != p.size() || t.kind() != p.kind() || t.device() != p.device() {
                bail!(
                    "fused_adamw_step: {what} {i} is {:?} {:?} on {:?}, its parameter {:?} {:?} on {:?}",
                    t.kind(),
                    t.size(),
                    t.device(),
                    p.kind(),
                    p.size(),
                    p.device()
                );
            }
            if !t.is_contiguous() {
                bail!("fused_adamw_step: {what} {i} is not contiguous");
            }
        }
        if !p.is_contiguous() {
            bail!("fused_adamw_step: parameter {i} is not contiguous");
        }
    }
    if n == 0 {
        return Ok(());
    }
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    // SAFETY: four arrays of n live at::Tensor pointers (borrowed for the call).
    check(unsafe {
        ffi::align_native_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            step_count as f64,
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
        )
    })
    .context("fused AdamW step (at::_fused_adamw_)")
}

/// A c10d backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors, TCP between processes.
    Gloo,
    /// NCCL: CUDA tensors.
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }

    /// `"gloo"` or `"nccl"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            _ => bail!("unknown distributed backend '{s}' (gloo or nccl)"),
        }
    }

    /// Whether this build has the backend.
    pub fn compiled(self) -> bool {
        let b = backends();
        match self {
            Backend::Gloo => b.gloo,
            Backend::Nccl => b.nccl,
        }
    }

    /// The backend for tensors on `device`: NCCL on CUDA, Gloo on CPU.
    pub fn for_device(device: Device) -> Self {
        if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }
}

/// A reduction for [`ProcessGroup::all_reduce`] and
/// [`ProcessGroup::reduce_scatter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The mean over ranks (Gloo: a sum divided by the world size).
    Avg,
    Max,
    Min,
}

impl ReduceOp {
    fn code(self) -> i32 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Avg => 1,
            ReduceOp::Max => 2,
            ReduceOp::Min => 3,
        }
    }
}

/// The launch environment of one process of a distributed run, as torchrun
/// sets it (`srun` scripts set the same variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// The rank within this machine (the CUDA device NCCL uses).
    pub local_rank: usize,
    /// Where the rendezvous `TCPStore` listens.
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already serves the store at `master_addr:master_port`
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank connects as a client.
    pub agent_store: bool,
    /// torchrun's restart count (`TORCHELASTIC_RESTART_COUNT`): keys of a
    /// restarted run do not collide with the previous attempt's in the
    /// agent's store.
    pub restart_count: u64,
}

impl DistEnv {
    /// Reads the process environment; `None` when neither `RANK` nor
    /// `WORLD_SIZE` is set (a single-process run).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`DistEnv::from_env`], with the variables from `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let get = |k: &str| var(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let (rank, world) = match (get("RANK"), get("WORLD_SIZE")) {
            (None, None) => return Ok(None),
            (Some(_), None) => bail!("RANK is set but WORLD_SIZE is not (launch with torchrun, or set both)"),
            (None, Some(_)) => bail!("WORLD_SIZE is set but RANK is not (launch with torchrun, or set both)"),
            (Some(r), Some(w)) => (r, w),
        };
        let world_size: usize =
            world.parse().map_err(|_| anyhow!("WORLD_SIZE must be a positive integer, got '{world}'"))?;
        if world_size == 0 {
            bail!("WORLD_SIZE must be a positive integer, got 0");
        }
        let rank: usize = rank.parse().map_err(|_| anyhow!("RANK must be an integer >= 0, got '{rank}'"))?;
        if rank >= world_size {
            bail!("RANK {rank} is out of range for WORLD_SIZE {world_size} (ranks are 0..{world_size})");
        }
        let local_rank = match get("LOCAL_RANK").or_else(|| get("SLURM_LOCALID")) {
            Some(l) => l.parse().map_err(|_| anyhow!("LOCAL_RANK must be an integer >= 0, got '{l}'"))?,
            None => 0,
        };
        let master_addr = get("MASTER_ADDR").with_context(|| {
            format!("MASTER_ADDR is not set (rank {rank} of {world_size}: where rank 0 listens)")
        })?;
        let port = get("MASTER_PORT")
            .with_context(|| format!("MASTER_PORT is not set (rank {rank} of {world_size})"))?;
        let master_port: u16 = match port.parse() {
            Ok(p) if p > 0 => p,
            _ => bail!("MASTER_PORT must be a port number 1-65535, got '{port}'"),
        };
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let restart_count = get("TORCHELASTIC_RESTART_COUNT").and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            agent_store,
            restart_count,
        }))
    }
}

/// How long a rendezvous or a collective may wait for a peer when the caller
/// does not say: 10 minutes, NCCL's default in torch.distributed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// A c10d process group: rendezvous over a `TCPStore`, then one backend.
///
/// Collectives are blocking: each returns when this rank's part is done, or
/// an error after the group's timeout (a peer died or never arrived). After
/// an error the group is unusable; drop it and exit.
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    world_size: usize,
    backend: Backend,
    timeout: Duration,
}

// SAFETY: c10d backends may be used from any thread (they run collectives on
// their own worker threads); the handle is not shared between threads
// (no Sync).
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group described by `env` (rank 0 serves the `TCPStore`
    /// unless torchrun's agent does). Waits at most `timeout` for every rank
    /// to arrive, and uses `timeout` for every collective after.
    pub fn new(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<Self> {
        let who = format!("rank {} of {}", env.rank, env.world_size);
        if !backend.compiled() {
            bail!(
                "{who}: the {} backend is not compiled into align ({})",
                backend.name(),
                match backend {
                    Backend::Gloo => "Gloo's headers (Debian's libgloo-dev) were missing at build time; install libgloo-dev and rebuild",
                    Backend::Nccl => "it needs a CUDA build of libtorch and nccl.h at build time",
                }
            );
        }
        if backend == Backend::Nccl {
            if !tch::Cuda::is_available() {
                bail!("{who}: backend nccl needs CUDA, and libtorch sees no CUDA device (use gloo on CPU)");
            }
            let n = tch::Cuda::device_count() as usize;
            if env.local_rank >= n {
                bail!("{who}: LOCAL_RANK {} but this machine has {n} CUDA device(s)", env.local_rank);
            }
        }
        if env.rank >= env.world_size || env.world_size > i32::MAX as usize {
            bail!("{who}: rank out of range");
        }
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX).max(1);
        let name = CString::new(backend.name())?;
        let addr = CString::new(env.master_addr.as_str()).context("MASTER_ADDR contains a NUL byte")?;
        let prefix = CString::new(format!("align/{}/", env.restart_count))?;
        let device = if backend == Backend::Nccl { env.local_rank as i64 } else { -1 };
        let mut raw: *mut c_void = std::ptr::null_mut();
        // SAFETY: NUL-terminated strings borrowed for the call; `raw` receives
        // an owned handle on success.
        check(unsafe {
            ffi::align_native_group_new(
                name.as_ptr(),
                addr.as_ptr(),
                env.master_port,
                env.rank as i32,
                env.world_size as i32,
                device,
                env.agent_store as i32,
                prefix.as_ptr(),
                timeout_ms,
                &mut raw,
            )
        })
        .with_context(|| {
            format!(
                "{who}: creating the {} process group (rendezvous at {}:{}, timeout {:?})",
                backend.name(),
                env.master_addr,
                env.master_port,
                timeout
            )
        })?;
        if raw.is_null() {
            bail!("{who}: the bridge returned no process group");
        }
        Ok(ProcessGroup { raw, rank: env.rank, world_size: env.world_size, backend, timeout })
    }

    /// Joins the group described by the process environment (torchrun's
    /// variables); an error when they are not set.
    pub fn from_env(backend: Backend, timeout: Duration) -> Result<Self> {
        let env =
            DistEnv::from_env()?.context("RANK and WORLD_SIZE are not set (not launched by torchrun)")?;
        Self::new(&env, backend, timeout)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn ctx(&self, what: &str) -> String {
        format!("{what} on rank {} of {} ({})", self.rank, self.world_size, self.backend.name())
    }

    fn check_tensor(&self, t: &Tensor, what: &str) -> Result<()> {
        if !t.defined() {
            bail!("{}: undefined tensor", self.ctx(what));
        }
        let dev = t.device();
        match self.backend {
            Backend::Gloo if dev != Device::Cpu => {
                bail!("{}: gloo takes CPU tensors, got one on {dev:?}", self.ctx(what))
            }
            Backend::Nccl if !dev.is_cuda() => {
                bail!("{}: nccl takes CUDA tensors, got one on {dev:?}", self.ctx(what))
            }
            _ => {}
        }
        if !t.is_contiguous() {
            bail!("{}: the tensor must be contiguous", self.ctx(what));
        }
        Ok(())
    }

    /// Reduces `t` over all ranks, in place: every rank ends with the result.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check_tensor(t, "all_reduce")?;
        // SAFETY: a live handle and a live tensor, borrowed for the call.
        check(unsafe { ffi::align_native_all_reduce(self.raw, t.as_mut_ptr(), op.code()) })
            .with_context(|| self.ctx("all_reduce"))
    }

    /// All-reduces many tensors (gradients) in few collectives: consecutive
    /// tensors of one dtype and device are flattened into buckets of at most
    /// `bucket_bytes` (a larger tensor is a bucket of its own), each bucket
    /// is all-reduced, and the results are copied back in place. Every rank
    /// passes the same list (same shapes, same order).
    pub fn all_reduce_bucketed(&self, tensors: &[Tensor], op: ReduceOp, bucket_bytes: usize) -> Result<()> {
        bucketed(tensors, bucket_bytes, |b| self.all_reduce(b, op))
    }

    /// [`ProcessGroup::broadcast`] for many tensors (the initial weights), in
    /// buckets as [`ProcessGroup::all_reduce_bucketed`].
    pub fn broadcast_bucketed(&self, tensors: &[Tensor], root: usize, bucket_bytes: usize) -> Result<()> {
        bucketed(tensors, bucket_bytes, |b| self.broadcast(b, root))
    }

    /// Copies `root`'s `t` into every other rank's `t` (same shape and dtype).
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.check_tensor(t, "broadcast")?;
        if root >= self.world_size {
            bail!("{}: root {root} is not a rank", self.ctx("broadcast"));
        }
        // SAFETY: as in all_reduce.
        check(unsafe { ffi::align_native_broadcast(self.raw, t.as_mut_ptr(), root as i32) })
            .with_context(|| self.ctx("broadcast"))
    }

    /// Returns when every rank has reached the barrier.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live handle.
        check(unsafe { ffi::align_native_barrier(self.raw) }).with_context(|| self.ctx("barrier"))
    }

    /// Every rank's `t` (same shape and dtype on every rank), indexed by rank.
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        self.check_tensor(t, "all_gather")?;
        let outs: Vec<Tensor> = (0..self.world_size).map(|_| t.empty_like()).collect();
        let p = ptrs(&outs);
        // SAFETY: a live handle, input and world_size output tensors.
        check(unsafe { ffi::align_native_all_gather(self.raw, ptr(t), p.as_ptr(), p.len()) })
            .with_context(|| self.ctx("all_gather"))?;
        Ok(outs)
    }

    /// `inputs` holds one tensor per rank (all the same shape); rank r
    /// receives the reduction over ranks of their `inputs[r]`.
    pub fn reduce_scatter(&self, inputs: &[Tensor], op: ReduceOp) -> Result<Tensor> {
        if inputs.len() != self.world_size {
            bail!("{}: {} inputs for {} ranks", self.ctx("reduce_scatter"), inputs.len(), self.world_size);
        }
        for t in inputs {
            self.check_tensor(t, "reduce_scatter")?;
        }
        let mut out = inputs[self.rank].empty_like();
        let p = ptrs(inputs);
        // SAFETY: a live handle, an output and world_size input tensors.
        check(unsafe {
            ffi::align_native_reduce_scatter(self.raw, out.as_mut_ptr(), p.as_ptr(), p.len(), op.code())
        })
        .with_context(|| self.ctx("reduce_scatter"))?;
        Ok(out)
    }
}

/// Runs `collective` on buckets of `tensors` (consecutive tensors of one
/// dtype and device, flattened, at most `bucket_bytes` unless one tensor is
/// larger) and copies each bucket's result back into its tensors.
fn bucketed(
    tensors: &[Tensor],
    bucket_bytes: usize,
    mut collective: impl FnMut(&mut Tensor) -> Result<()>,
) -> Result<()> {
    let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let mut i = 0;
    while i < tensors.len() {
        let (kind, device) = (tensors[i].kind(), tensors[i].device());
        let mut j = i + 1;
        let mut size = bytes(&tensors[i]);
        while j < tensors.len()
            && tensors[j].kind() == kind
            && tensors[j].device() == device
            && size + bytes(&tensors[j]) <= bucket_bytes
        {
            size += bytes(&tensors[j]);
            j += 1;
        }
        tch::no_grad(|| -> Result<()> {
            let flat: Vec<Tensor> = tensors[i..j].iter().map(|t| t.reshape([-1])).collect();
            let mut bucket = Tensor::f_cat(&flat, 0)?;
            collective(&mut bucket)?;
            let mut offset = 0;
            for t in &tensors[i..j] {
                let n = t.numel() as i64;
                t.shallow_clone().f_copy_(&bucket.f_narrow(0, offset, n)?.f_view_as(t)?)?;
                offset += n;
            }
            Ok(())
        })?;
        i = j;
    }
    Ok(())
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from align_native_group_new and is freed once.
        unsafe { ffi::align_native_group_free(self.raw) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_bridge_and_the_build_script_agree_on_the_backends() {
        let b = backends();
        assert_eq!(b.gloo, cfg!(align_gloo));
        assert_eq!(b.nccl, cfg!(align_nccl));
        assert_eq!(Backend::Gloo.compiled(), b.gloo);
        assert_eq!(Backend::parse("nccl").unwrap(), Backend::Nccl);
        assert!(Backend::parse("mpi").is_err());
    }

    #[test]
    fn no_launch_variables_is_a_single_process_run() {
        assert_eq!(DistEnv::from_vars(vars(&[])).unwrap(), None);
    }

    #[test]
    fn torchrun_variables_are_read() {
        let e = DistEnv::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                master_addr: "10.0.0.1".into(),
                master_port: 29500,
                agent_store: true,
                restart_count: 2
            }
        );
    }

    #[test]
    fn bad_launch_variables_are_clear_errors() {
        let base = [("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")];
        let err = |extra: &[(&str, &str)]| {
            let mut all: Vec<(&str, &str)> = base.to_vec();
            all.extend_from_slice(extra);
            format!("{:#}", DistEnv::from_vars(vars(&all)).unwrap_err())
        };
        assert!(
            err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("RANK 2 is out of range for WORLD_SIZE 2")
        );
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "0")]).contains("WORLD_SIZE must be a positive integer"));
        assert!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "two")]).contains("WORLD_SIZE must be a positive integer")
        );
        assert!(err(&[("RANK", "-1"), ("WORLD_SIZE", "2")]).contains("RANK must be an integer"));
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE is not"));
        let e = DistEnv::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]))
            .unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR is not set"));
        let e = DistEnv::from_vars(vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT must be a port number"));
    }

    #[test]
    fn nccl_without_cuda_is_a_clear_error() {
        if tch::Cuda::is_available() {
            return;
        }
        let env = DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 1,
            agent_store: false,
            restart_count: 0,
        };
        let e =
            format!("{:#}", ProcessGroup::new(&env, Backend::Nccl, Duration::from_secs(1)).err().unwrap());
        assert!(e.contains("nccl"), "{e}");
        assert!(e.contains("CUDA") || e.contains("not compiled"), "{e}");
    }
}
