//! The `bsa` binary: parse the command line and hand it to [`cli`], which calls the library;
//! report errors.

mod cli;

use clap::Parser;

fn main() {
    // candle's elementwise ops hand large tensors to its own barrier pool, whose workers spin
    // for ~25k iterations after each op. Our kernels run on rayon's threads, so on a machine with
    // few cores that spinning worker takes CPU from them (7% of batched decode on 2 cores, and
    // decode ran 10-15% faster without it). One thread means no pool: candle's small
    // elementwise ops run on the calling thread. Set before any thread exists; a user's own
    // CANDLE_NUM_THREADS wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let cli = cli::Cli::parse();
    if let Err(e) = cli::run(cli) {
        // The causes, without the backtraces candle writes into them under RUST_BACKTRACE.
        eprintln!("error: {}", cli::error_chain(&e));
        std::process::exit(1);
    }
}
