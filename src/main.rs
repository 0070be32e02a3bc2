fn main() {
    std::process::exit(covnoise_cli_main());
}

fn covnoise_cli_main() -> i32 {
    0
}
