use lsvfs::cli;

fn main() {
    if let Err(e) = cli::run(std::env::args_os()) {
        eprintln!("lsvfs: {e}");
        std::process::exit(cli::exit_code(&e));
    }
}
