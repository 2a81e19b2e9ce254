//! NCCL between GPUs (`--features nccl`): gradients on CUDA devices are summed by NCCL on the
//! device, with no copy through the host. The communicator is bootstrapped through the MPI world,
//! as llm.c does: rank 0 creates the NCCL unique id and broadcasts its 128 bytes over MPI, then
//! every rank joins with its rank and the world size. MPI still carries the small host-side
//! collectives (losses, counts, stop decisions).
//!
//! The all-reduce is a candle custom op: candle gives no mutable access to a tensor's device
//! buffer, so the op reads the input slice and returns NCCL's result in a new one, on the stream
//! candle queues the device's work on (so it is ordered after the backward pass that made the
//! gradients).

use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, DeviceLocation, Layout, Shape, Tensor};

use super::{Collective, buckets};

/// One communicator per process, for the GPU it was made on.
struct Held {
    location: DeviceLocation,
    comm: Comm,
}

// SAFETY: NCCL communicators may be used from any thread as long as calls on one communicator do not
// overlap; every use goes through the `COMM` mutex.
unsafe impl Send for Held {}

static COMM: Mutex<Option<Held>> = Mutex::new(None);

/// Runs `f` with this process's communicator for `device`, creating it the first time (every rank
/// must get here together: it is a collective call).
fn with_comm<R>(world: &dyn Collective, device: &Device, f: impl FnOnce(&Comm) -> Result<R>) -> Result<R> {
    let Device::Cuda(cuda) = device else {
        bail!("NCCL needs CUDA tensors, got tensors on {:?}", device.location());
    };
    let mut held = COMM.lock().unwrap_or_else(|e| e.into_inner());
    if held.as_ref().map(|h| h.location) != Some(device.location()) {
        let mut id = if world.rank() == 0 {
            let id = Id::new().map_err(|e| anyhow::anyhow!("creating the NCCL id: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            vec![]
        };
        world
            .broadcast_bytes(&mut id)
            .context("broadcasting the NCCL id over MPI")?;
        let internal: [std::ffi::c_char; 128] = std::array::from_fn(|i| id.get(i).copied().unwrap_or(0) as _);
        let comm =
            Comm::from_rank(cuda.cuda_stream(), world.rank(), world.size(), Id::uninit(internal)).map_err(|e| {
                anyhow::anyhow!(
                    "joining the NCCL communicator as rank {} of {}: {e:?}",
                    world.rank(),
                    world.size()
                )
            })?;
        *held = Some(Held {
            location: device.location(),
            comm,
        });
    }
    f(&held.as_ref().expect("set above").comm)
}

/// The element-wise sum over all ranks of a contiguous f32 CUDA tensor.
struct AllReduce<'a>(&'a Comm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor")
        };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let device = s.device().clone();
        // SAFETY: every element is written by the all-reduce before the slice is read.
        let mut dst = unsafe { device.alloc::<f32>(end - start) }?;
        self.0
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, device), l.shape().clone()))
    }
}

/// Sums `tensors` (on one CUDA device) over all ranks with NCCL, in buckets of at most
/// [`super::BUCKET`] floats, each flattened into one buffer for one NCCL call.
pub fn all_reduce(world: &dyn Collective, tensors: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let Some(first) = tensors.first() else {
        return Ok(tensors);
    };
    let device = first.device().clone();
    with_comm(world, &device, |comm| {
        let mut out = Vec::with_capacity(tensors.len());
        for bucket in buckets(&tensors) {
            let flat: Vec<Tensor> = tensors[bucket.clone()]
                .iter()
                .map(|t| t.flatten_all()?.to_dtype(DType::F32))
                .collect::<candle_core::Result<_>>()?;
            let summed = Tensor::cat(&flat, 0)?
                .contiguous()?
                .apply_op1_no_bwd(&AllReduce(comm))?;
            let mut offset = 0;
            for t in &tensors[bucket] {
                let len = t.elem_count();
                out.push(summed.narrow(0, offset, len)?.reshape(t.shape())?.to_dtype(t.dtype())?);
                offset += len;
            }
        }
        Ok(out)
    })
}
