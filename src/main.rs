//! The `bsa` binary: parse the command line, hand it to the library, report errors.

use clap::Parser;

fn main() {
    let cli = bsa::cli::Cli::parse();
    if let Err(e) = bsa::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
