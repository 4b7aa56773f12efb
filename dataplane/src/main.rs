fn main() {
    eprintln!("weft-dp: not built yet");
    std::process::exit(2);
}
