use lsvfs::cli;

/// The file system allocates and frees many small buffers per request (B+tree
/// nodes, entries): mimalloc's thread-local free lists serve them far faster
/// than glibc's malloc does under two request threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Before any key is loaded: no core dumps, no ptrace by the same user.
    lsvfs_keyserver::secret::harden_process();
    // The TPM library (libtss2) writes its own warnings to stderr; lsvfs
    // reports TPM failures itself. Set while the process has one thread.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+NONE");
    }
    if let Err(e) = cli::run(std::env::args_os()) {
        eprintln!("lsvfs: {e}");
        std::process::exit(e.exit_code());
    }
}
