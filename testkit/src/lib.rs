//! Test-only helpers shared by the stage crates' integration tests. It is a
//! dev-dependency of `sft`, `reward` and `rl` and of nothing else: it may
//! panic (`unwrap`, `assert!`) as tests do.
//!
//! - [`ddp`]: multi-process data-parallel tests over Gloo on loopback. The
//!   test binary re-executes its own `rank_process` test as each rank, with
//!   torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//!   MASTER_PORT), and the test compares what the ranks wrote with a
//!   single-process run ([`ddp::max_diff`]).

pub mod ddp;
