//! `hai`: the scheduler's one binary (the command line is in the library).

fn main() {
    std::process::exit(hai::main_with(std::env::args_os()));
}
