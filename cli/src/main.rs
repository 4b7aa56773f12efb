//! `weftctl`: parse the command line, run it, exit. Everything else lives in the library.

fn main() -> std::process::ExitCode {
    weftctl::main()
}
