//! `moe-train` (the command line is in the library).

fn main() {
    std::process::exit(moe_train::cli::main_with(std::env::args_os()));
}
