//! The `talaria` binary: the entry point. Argument parsing lives in `cli/`, the work in the library.

mod cli;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`; libmimalloc-sys names no
/// constant for it). -1 keeps freed memory mapped instead of returning it to the OS: a training
/// step frees and reallocates the same large activation buffers every step, and re-faulting
/// them in cost ~15% of a step (`perf`: the kernel's `clear_page`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // SAFETY: sets a process-wide allocator option; mimalloc allows this at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // A write past the file-size limit (`ulimit -f`) then fails with a clear error naming the file
    // instead of killing the process.
    #[cfg(unix)]
    // SAFETY: ignoring a signal touches no memory; done before any other thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // candle's own pool for large element-wise ops keeps a thread spinning after each op, which on
    // a small machine takes a core from the kernels' rayon pool; with one thread it runs them
    // inline. Measured in BENCHMARKS.md ("Micro-batches side by side").
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    // Joins the MPI job first (under mpirun/srun), before any thread starts.
    // Finalizes MPI when `main` returns.
    let _mpi = talaria::train::collective::init().unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    });
    let cli = cli::Cli::parse();
    // The work runs on the kernels' thread pool, except the server's, whose async runtime must not
    // hold a worker: it gives its scheduler thread to the pool itself.
    let result = if cli.is_server() {
        cli.run()
    } else {
        talaria::model::fused::on_pool(|| cli.run())
    };
    if let Err(e) = result {
        let world = talaria::train::collective::world();
        if world.size() > 1 {
            // The other ranks may be waiting in a collective: end them all now.
            eprintln!("error on rank {} of {}: {e:#}", world.rank(), world.size());
            world.abort(1);
        }
        eprintln!("error: {e:#}");
        // Any failure after a Ctrl-C (normally the stop after a checkpoint) exits as SIGINT asks,
        // so a script can tell an interrupted run from one that failed on its own.
        let by_ctrl_c = talaria::train::trainer::interrupt_flag().load(std::sync::atomic::Ordering::SeqCst);
        std::process::exit(if by_ctrl_c { 130 } else { 1 });
    }
}
