//! `confab-load`: see the library's documentation and `confab-load --help`.

fn main() -> std::process::ExitCode {
    match confab_load::cli::main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("confab-load: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
