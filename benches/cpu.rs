//! CPU benchmark: time per forward and per block (tiny and medium built-in models, every lag).
//! `cargo bench --bench cpu` prints a table on stderr and JSON on stdout.

fn main() {
    let models: Vec<String> = std::env::var("BC_BENCH_MODELS")
        .unwrap_or_else(|_| "tiny,medium".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let names: Vec<&str> = models.iter().map(String::as_str).collect();
    match blockcascade::bench::run_cpu(&names, 3, true) {
        Ok(r) => {
            eprint!("{}", blockcascade::bench::table(&r));
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
