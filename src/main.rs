use lsvfs::cli;

/// The file system allocates and frees many small buffers per request (B+tree
/// nodes, entries): mimalloc's thread-local free lists serve them far faster
/// than glibc's malloc does under two request threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Before any key is loaded: no core dumps, no ptrace by the same user.
    lsvfs_keyserver::secret::harden_process();
    if let Err(e) = cli::run(std::env::args_os()) {
        eprintln!("lsvfs: {e}");
        std::process::exit(e.exit_code());
    }
}
