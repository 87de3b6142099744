//! AFL++ harness: `bc-fuzz TARGET` fuzzes the entry point `TARGET` of
//! `blockcascade::fuzz_targets` (see docs/fuzzing.md). A panic, an abort, an internal error or
//! an allocation larger than the input justifies is a crash.

use blockcascade::fuzz_targets::{check, find, AllocGuard, TARGETS};

/// 64 MiB plus 64 bytes per input byte per allocation.
#[global_allocator]
static ALLOC: AllocGuard = AllocGuard::new(64 << 20, 64);

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = find(&name) else {
        let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        eprintln!("usage: bc-fuzz TARGET (one of: {})", names.join(", "));
        std::process::exit(2);
    };
    // Outside AFL (one input on stdin), BC_FUZZ_PRINT=1 prints the entry point's result.
    let print = std::env::var_os("BC_FUZZ_PRINT").is_some();
    // Every panic aborts (a crash for AFL), even one a `catch_unwind` would stop (the C ABI's),
    // except inside the tokenizers crate, whose panics the library contains and reports as a
    // format error by design.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if blockcascade::text::tokenizer::in_tokenizers_call() {
            return;
        }
        hook(info);
        std::process::abort();
    }));
    afl::fuzz_nohook!(|data: &[u8]| {
        if print {
            eprintln!("{:?}", (target.entry)(data));
        }
        ALLOC.set_input_len(data.len());
        if let Err(bug) = check(target, data) {
            panic!("{bug}");
        }
    });
}
