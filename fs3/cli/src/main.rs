//! `fs3`: the one binary of the fs3 file system (the command line is in the library).

fn main() {
    std::process::exit(fs3::main_with(std::env::args_os()));
}
