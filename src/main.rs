fn main() {
    std::process::exit(kmsfs::cli::main());
}
