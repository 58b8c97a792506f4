//! `fireflyer`: the whole stack in one program (see the library for how it dispatches).

fn main() {
    std::process::exit(fireflyer::main_with(std::env::args_os().collect()));
}
