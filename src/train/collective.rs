//! Data parallelism's few collective operations (rank, world size, all-reduce, all-gather,
//! broadcast, barrier)
//! over an existing engine: MPI through rsmpi with `--features mpi`, one process otherwise; with
//! `--features nccl`, gradients on GPUs are summed by NCCL (bootstrapped through MPI, `nccl.rs`).
//!
//! `mpirun -np N talaria pretrain ...` starts N copies of the binary; [`init`] joins them into one
//! MPI world, and the training loop (src/train/trainer.rs) uses [`world`] to broadcast rank 0's
//! weights and to sum gradients each step. docs/scale-out.md says how to launch and what is sent.

use std::sync::OnceLock;

use anyhow::{Result, bail};
use candle_core::{Tensor, Var};

/// The operations data-parallel training needs, in the order-independent form MPI gives them.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size()`; rank 0 writes checkpoints, metrics and progress.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Replaces `buf` on every rank with its element-wise sum over all ranks.
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()>;
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Every rank's `mine` (of any length), in rank order, on every rank.
    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<Vec<f64>>>;
    /// Replaces `buf` on every rank with rank 0's (every rank passes the same length).
    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Replaces `buf` on every rank with rank 0's, whatever its length on the others.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()>;
    fn barrier(&self);
    /// Ends every rank of the job at once (the launcher reports it), so that an error on one rank
    /// never leaves the others waiting in a collective.
    fn abort(&self, code: i32) -> !;
}

/// The single-process world: every operation is the identity.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<Vec<f64>>> {
        Ok(vec![mine.to_vec()])
    }
    fn broadcast_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// The world this process belongs to: the MPI job after [`init`] under a launcher, else [`Solo`].
pub fn world() -> &'static dyn Collective {
    WORLD.get_or_init(|| Box::new(Solo)).as_ref()
}

/// Whether this process is rank 0, the one that writes files and prints progress.
pub fn is_main() -> bool {
    world().rank() == 0
}

/// The number of processes the launcher (mpirun, mpiexec, srun) started, from the variables it
/// sets; `None` outside a launcher.
fn launched_size() -> Option<usize> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let pmix_or_pmi = std::env::var_os("PMIX_RANK").is_some() || std::env::var_os("PMI_RANK").is_some();
    var("OMPI_COMM_WORLD_SIZE")
        .or_else(|| var("PMI_SIZE"))
        .or_else(|| if pmix_or_pmi { var("SLURM_NTASKS") } else { None })
}

/// The processes the launcher started on this machine (for the default thread count).
fn local_size() -> Option<usize> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    var("OMPI_COMM_WORLD_LOCAL_SIZE")
        .or_else(|| var("MPI_LOCALNRANKS"))
        .or_else(|| var("SLURM_NTASKS_PER_NODE"))
}

/// This process's index among the launcher's processes on its machine (which GPU it takes).
pub fn local_rank() -> Option<usize> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    var("OMPI_COMM_WORLD_LOCAL_RANK")
        .or_else(|| var("MPI_LOCALRANKID"))
        .or_else(|| var("SLURM_LOCALID"))
}

/// Kept by `main` for the whole run: finalizes MPI when dropped.
pub struct Guard {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Joins the MPI job when the binary runs under a launcher. Call once, first thing in `main`,
/// before any thread starts. With several processes on one machine and no `RAYON_NUM_THREADS`,
/// each one's thread pool gets its share of the cores instead of all of them.
pub fn init() -> Result<Guard> {
    let Some(size) = launched_size().filter(|&n| n > 1) else {
        return Ok(Guard {
            #[cfg(feature = "mpi")]
            _universe: None,
        });
    };
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_rank = (cores / local_size().unwrap_or(size).max(1)).max(1);
        // SAFETY: called at the top of `main`, before any other thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", per_rank.to_string()) };
    }
    #[cfg(feature = "mpi")]
    {
        let universe = mpi_world::join()?;
        Ok(Guard {
            _universe: Some(universe),
        })
    }
    #[cfg(not(feature = "mpi"))]
    bail!(
        "started as one of {size} processes (mpirun/srun), but this binary was built without MPI: build it with \
         `cargo build --release --features mpi` (docs/scale-out.md)"
    )
}

#[cfg(feature = "nccl")]
mod nccl;

/// Floats per all-reduce: bounds the staging copy of the gradients (16 MiB).
const BUCKET: usize = 1 << 22;

/// Sums `tensors` (gradients, say) over all ranks, in buckets of at most [`BUCKET`] floats.
/// candle's backward pass returns every gradient at once, with no per-parameter hook, so the
/// buckets are sent after it rather than overlapping it.
pub fn all_reduce_tensors(world: &dyn Collective, tensors: Vec<Tensor>) -> Result<Vec<Tensor>> {
    if world.size() == 1 {
        return Ok(tensors);
    }
    Ok(sum_over_ranks(world, tensors)?.0)
}

/// Which engine sums tensors on `device`: NCCL for CUDA tensors in a `--features nccl` build,
/// else MPI through the host (the identity in a one-process world).
fn engine_for(world: &dyn Collective, device: &candle_core::Device) -> &'static str {
    if cfg!(feature = "nccl") && device.is_cuda() {
        "nccl"
    } else if world.size() > 1 {
        "mpi"
    } else {
        "none (one process)"
    }
}

/// [`all_reduce_tensors`] without its one-process shortcut, so that a one-rank NCCL communicator is
/// really made and used (`talaria bench allreduce` checks it); with the engine's name.
pub fn sum_over_ranks(world: &dyn Collective, tensors: Vec<Tensor>) -> Result<(Vec<Tensor>, &'static str)> {
    let Some(first) = tensors.first() else {
        return Ok((tensors, "none (nothing to sum)"));
    };
    let engine = engine_for(world, first.device());
    #[cfg(feature = "nccl")]
    if engine == "nccl" {
        return Ok((nccl::all_reduce(world, tensors)?, engine));
    }
    let mut out = Vec::with_capacity(tensors.len());
    for bucket in buckets(&tensors) {
        let mut flat = vec![];
        for t in &tensors[bucket.clone()] {
            flat.extend(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?);
        }
        world.all_reduce_f32(&mut flat)?;
        let mut offset = 0;
        for t in &tensors[bucket] {
            let len = t.elem_count();
            let summed = Tensor::from_slice(&flat[offset..offset + len], t.shape(), t.device())?;
            out.push(summed.to_dtype(t.dtype())?);
            offset += len;
        }
    }
    Ok((out, engine))
}

/// Consecutive runs of `tensors` of at most [`BUCKET`] floats together (a larger tensor alone),
/// each summed in one call.
fn buckets(tensors: &[Tensor]) -> Vec<std::ops::Range<usize>> {
    let mut out = vec![];
    let mut start = 0;
    while start < tensors.len() {
        let mut end = start + 1;
        let mut n = tensors[start].elem_count();
        while end < tensors.len() && n + tensors[end].elem_count() <= BUCKET {
            n += tensors[end].elem_count();
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// Gives every rank rank 0's values of `vars`, so that all start from the same weights.
pub fn broadcast_vars(world: &dyn Collective, vars: &[(String, Var)]) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    for (_, v) in vars {
        let t = v.as_tensor();
        let mut flat = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        world.broadcast_f32(&mut flat)?;
        v.set(&Tensor::from_vec(flat, t.shape(), t.device())?.to_dtype(t.dtype())?)?;
    }
    Ok(())
}

/// Fails unless `bytes` is the same on every rank, naming `what`.
pub fn ensure_same(world: &dyn Collective, bytes: &[u8], what: &str) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    let mut root = bytes.to_vec();
    world.broadcast_bytes(&mut root)?;
    let mut differ = [f64::from(u8::from(root != bytes))];
    world.all_reduce_f64(&mut differ)?;
    if differ[0] > 0.0 {
        bail!(
            "{} of {} ranks disagree with rank 0 about {what}",
            differ[0],
            world.size()
        );
    }
    Ok(())
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use std::sync::Mutex;

    use anyhow::{Result, bail, ensure};
    use mpi::Threading;
    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use super::{Collective, WORLD};

    /// MPI_COMM_WORLD. MPI is initialised for serialized use (any thread, one call at a time),
    /// which the lock enforces: the training loop runs on a rayon worker, not the main thread.
    struct Mpi {
        rank: usize,
        size: usize,
        lock: Mutex<()>,
    }

    impl Mpi {
        fn call<R>(&self, f: impl FnOnce(&SimpleCommunicator) -> R) -> R {
            let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            f(&SimpleCommunicator::world())
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
            let send = buf.to_vec();
            self.call(|w| w.all_reduce_into(&send[..], buf, SystemOperation::sum()));
            Ok(())
        }
        fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()> {
            let send = buf.to_vec();
            self.call(|w| w.all_reduce_into(&send[..], buf, SystemOperation::sum()));
            Ok(())
        }
        fn all_gather_f64(&self, mine: &[f64]) -> Result<Vec<Vec<f64>>> {
            let mut counts = vec![0 as mpi::Count; self.size];
            let n = mine.len() as mpi::Count;
            self.call(|w| w.all_gather_into(&n, &mut counts[..]));
            let displs: Vec<mpi::Count> = counts
                .iter()
                .scan(0, |at, &c| {
                    let d = *at;
                    *at += c;
                    Some(d)
                })
                .collect();
            let mut all = vec![0f64; counts.iter().map(|&c| c as usize).sum()];
            {
                let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                self.call(|w| w.all_gather_varcount_into(mine, &mut parts));
            }
            Ok(counts
                .iter()
                .zip(&displs)
                .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
                .collect())
        }
        fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
            self.call(|w| w.process_at_rank(0).broadcast_into(buf));
            Ok(())
        }
        fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
            let mut len = [buf.len() as u64];
            self.call(|w| w.process_at_rank(0).broadcast_into(&mut len[..]));
            buf.resize(len[0] as usize, 0);
            self.call(|w| w.process_at_rank(0).broadcast_into(&mut buf[..]));
            Ok(())
        }
        fn barrier(&self) {
            self.call(|w| w.barrier());
        }
        fn abort(&self, code: i32) -> ! {
            SimpleCommunicator::world().abort(code)
        }
    }

    /// MPI_Init_thread, and the world stored for [`super::world`].
    pub(super) fn join() -> Result<Universe> {
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized) else {
            bail!("MPI was already initialised in this process");
        };
        ensure!(
            matches!(threading, Threading::Serialized | Threading::Multiple),
            "the MPI library offers thread level {threading:?}; Talaria needs at least Serialized"
        );
        let w = universe.world();
        let mpi = Mpi {
            rank: w.rank() as usize,
            size: w.size() as usize,
            lock: Mutex::new(()),
        };
        if WORLD.set(Box::new(mpi)).is_err() {
            bail!("the collective world was used before MPI was joined");
        }
        Ok(universe)
    }
}
