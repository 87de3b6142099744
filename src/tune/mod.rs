//! `blockcascade tune`: measures the kernel variants that have alternatives (the Hopper
//! attention kernels, the self-attention's key splits, the decoders' wgmma convolutions) on
//! the user's own GPU and writes the fastest one that is correct there to a tuning file, which
//! the CUDA backend and the CUDA decoder then apply (docs/cuda.md, "Tuning").
//!
//! - [`probe`]: the child side: one candidate measured against the reference (the default) on
//!   fresh random inputs.
//! - [`child`]: runs a probe in a child process of the same executable with a timeout, so a
//!   faulting or hanging kernel costs only that child.
//! - [`mod@file`]: the tuning file, its keys and atomic writes.
//! - [`apply`]: loading the entry of a device and the precedence of environment variables and
//!   code options over it.
//!
//! Families are tuned in order: [`Family::Attention`], then [`Family::Split`] with the
//! attention winner, then [`Family::Conv`]. A candidate is chosen only with outcome
//! [`probe::Outcome::Ok`]; another than the default only when it is at least [`MARGIN`]
//! faster than the default (timing noise never moves a default).

pub mod apply;
pub mod child;
pub mod file;
pub mod probe;

use crate::config::ModelConfig;
use crate::{Error, Result};
use file::{Choices, Entry, Measured, TuningFile, TuningKey};
use probe::{AttnShape, ConvLayer, Outcome, ProbeResult, ProbeSpec};
use std::path::PathBuf;
use std::time::Duration;

/// How much faster than the default another candidate must be to be chosen (relative).
pub const MARGIN: f64 = 0.02;

/// A group of interchangeable kernel variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// The Hopper attention kernel (`BC_ATTN_WGMMA_VARIANT`).
    Attention,
    /// Key splits of the self-attention (`BC_ATTN_SPLIT`), with the attention winner.
    Split,
    /// The decoders' wgmma convolution (`BC_CONV_WGMMA_VARIANT`, `BC_CONV_HALO`).
    Conv,
}

impl Family {
    /// Every family, in the order they are tuned.
    pub const ALL: [Family; 3] = [Family::Attention, Family::Split, Family::Conv];

    /// `attention`, `split`, `conv`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Attention => "attention",
            Family::Split => "split",
            Family::Conv => "conv",
        }
    }

    /// Parses [`Self::name`].
    pub fn parse(s: &str) -> Option<Family> {
        Self::ALL.into_iter().find(|f| f.name() == s.trim())
    }

    /// The candidates, the default first.
    pub fn candidates(self) -> &'static [&'static str] {
        match self {
            Family::Attention => &["pp_k128", "ws", "ws_deep", "base", "k128", "pp"],
            // No fixed counts: one measured on the bench shape would be forced on every launch
            // (short windows included), where the model chooses per launch.
            Family::Split => &["auto", "1"],
            Family::Conv => &["base", "ws", "halo", "ws_halo"],
        }
    }

    /// The default (the reference every candidate is compared with).
    pub fn default_candidate(self) -> &'static str {
        self.candidates()[0]
    }
}

/// A conv candidate's flags: (warp-specialized, halo).
pub fn conv_candidate(c: &str) -> (bool, bool) {
    match c {
        "ws" => (true, false),
        "halo" => (false, true),
        "ws_halo" => (true, true),
        _ => (false, false),
    }
}

/// `FAMILY=CANDIDATE` (the hidden `--probe` argument) into its parts; an error for an unknown
/// family or candidate.
pub fn parse_probe(s: &str) -> Result<(Family, String)> {
    let bad = || {
        Error::invalid(format!(
            "--probe {s:?}: expected FAMILY=CANDIDATE, e.g. attention=ws"
        ))
    };
    let (f, c) = s.split_once('=').ok_or_else(bad)?;
    let family = Family::parse(f).ok_or_else(bad)?;
    let c = c.trim();
    if !family.candidates().contains(&c) {
        return Err(bad());
    }
    Ok((family, c.to_string()))
}

/// The attention problem of a real run: a block of 3 latent frames at 480x832 (30x52 patches
/// a frame: 4680 query rows) over a full window of 21 frames (32760 keys), with the heads of
/// `config` (default: Wan-1.3B, 12 x 128), as the benchmarks time it.
pub fn real_attention(config: Option<&ModelConfig>) -> AttnShape {
    let (heads, head_dim) = config.map_or((12, 128), |c| (c.num_heads, c.head_dim()));
    AttnShape {
        heads,
        head_dim,
        q_rows: 3 * 1560,
        keys: 21 * 1560,
    }
}

fn layer(
    name: &str,
    cin: usize,
    cout: usize,
    sources: usize,
    time_taps: bool,
    h: usize,
    w: usize,
) -> ConvLayer {
    ConvLayer {
        name: name.into(),
        cin,
        cout,
        sources,
        time_taps,
        h,
        w,
        up: false,
        parity: false,
    }
}

/// A conv after TAEHV's `Upsample` (sources at `h/2 x w/2`), dense or in the parity form.
fn up_layer(name: &str, cin: usize, h: usize, w: usize, parity: bool) -> ConvLayer {
    ConvLayer {
        up: true,
        parity,
        ..layer(name, cin, 64, 1, false, h, w)
    }
}

/// The decoder convolutions of a 480x832 decode that the conv variants differ on: TAEHV's
/// 64 -> 64 and its MemBlock's 128 -> 64, and the convs after its last two `Upsample`s (64 ->
/// 64 in the parity form and dense, 128 -> 64 dense): every body of the halo conv a decode can
/// launch runs here, so a halo choice never enables one that the tune did not run; the Wan
/// VAE's causal 3x3x3 convs at 96, 192 and 384 channels at the resolutions they run at.
pub fn real_convs() -> Vec<ConvLayer> {
    vec![
        layer("taehv 64->64 @480x832", 64, 64, 1, false, 480, 832),
        layer("taehv mem 128->64 @480x832", 64, 64, 2, false, 480, 832),
        up_layer("taehv up 64->64 parity @480x832", 64, 480, 832, true),
        up_layer("taehv up 64->64 dense @480x832", 64, 480, 832, false),
        up_layer("taehv up 128->64 dense @240x416", 128, 240, 416, false),
        layer("wan 96 @480x832", 96, 96, 3, true, 480, 832),
        layer("wan 192 @240x416", 192, 192, 3, true, 240, 416),
        layer("wan 384 @120x208", 384, 384, 3, true, 120, 208),
    ]
}

/// Tiny shapes for the emulated device (tests): the same kernels, a few tiles each.
pub fn tiny_spec() -> (AttnShape, Vec<ConvLayer>) {
    (
        AttnShape {
            heads: 1,
            head_dim: 128,
            q_rows: 128,
            keys: 192,
        },
        vec![
            layer("taehv 64->64", 64, 64, 1, false, 8, 16),
            layer("taehv mem 128->64", 64, 64, 2, false, 8, 8),
            up_layer("taehv up 64->64 parity", 64, 8, 16, true),
            up_layer("taehv up 128->64", 128, 8, 16, false),
            layer("wan 96", 96, 96, 3, true, 8, 8),
        ],
    )
}

/// What `blockcascade tune` is asked.
#[derive(Clone, Debug)]
pub struct TuneOptions {
    /// Device ordinal.
    pub device: usize,
    /// The emulated device (tests; its entry applies only where the tuning file is named
    /// explicitly, see [`apply`]).
    pub emulate: bool,
    /// Tiny shapes instead of a real run's (tests).
    pub tiny: bool,
    /// The model whose attention heads are timed (`None`: Wan-1.3B).
    pub model: Option<ModelConfig>,
    /// Wall-clock limit of each probe child.
    pub timeout: Duration,
    /// Timed launches per measurement.
    pub reps: usize,
    /// The families to tune (empty: all).
    pub families: Vec<Family>,
    /// Where to write (`None`: [`file::tuning_path`]).
    pub out: Option<PathBuf>,
    /// The executable the probes run (`std::env::current_exe()` for the CLI).
    pub exe: PathBuf,
}

/// One row of the table: a candidate and how it fared.
#[derive(Clone, Debug)]
pub struct Row {
    /// Its family.
    pub family: Family,
    /// Its name.
    pub candidate: String,
    /// Its measurement.
    pub result: ProbeResult,
    /// Whether it was chosen.
    pub chosen: bool,
}

/// What a tune did.
#[derive(Clone, Debug)]
pub struct TuneReport {
    /// The file written.
    pub path: PathBuf,
    /// The entry written for the device.
    pub entry: Entry,
    /// Every candidate.
    pub rows: Vec<Row>,
}

/// The environment variables a probe child runs without (each child picks its kernels from its
/// arguments alone, and a user's tuning file must not steer the reference).
pub const CHILD_ENV_REMOVE: &[&str] = &[
    "BC_ATTN_WGMMA",
    "BC_ATTN_WGMMA_VARIANT",
    "BC_ATTN_SPLIT",
    "BC_ATTENTION_TILE",
    "BC_CONV_WGMMA",
    "BC_CONV_WGMMA_VARIANT",
    "BC_CONV_HALO",
    "BC_CONV_TMA",
    "BC_TUNING",
    "BC_TUNING_FILE",
    "BC_CUDA_EMULATE",
];

/// Of the measured `(candidate, result)` pairs, the one to choose: the fastest with outcome
/// ok, unless it is the default or less than [`MARGIN`] faster than an ok default (then the
/// default); `None` when none is ok.
pub fn choose(default: &str, rows: &[(String, ProbeResult)]) -> Option<String> {
    let ok = |r: &ProbeResult| r.outcome == Outcome::Ok && r.ms.is_some_and(f64::is_finite);
    let fastest = rows.iter().filter(|(_, r)| ok(r)).min_by(|a, b| {
        a.1.ms
            .unwrap_or(f64::INFINITY)
            .total_cmp(&b.1.ms.unwrap_or(f64::INFINITY))
    })?;
    let default_ms = rows
        .iter()
        .find(|(c, r)| c == default && ok(r))
        .and_then(|(_, r)| r.ms);
    match (default_ms, fastest.1.ms) {
        (Some(d), Some(f)) if f > d * (1.0 - MARGIN) => Some(default.to_string()),
        _ => Some(fastest.0.clone()),
    }
}

/// The key of the device `opts` tunes, without opening a context on it (the driver's device
/// list; the emulated device's own name).
fn device_key(opts: &TuneOptions) -> Result<TuningKey> {
    if opts.emulate {
        let g = crate::backend::cuda::device::Gpu::open_emulated()?;
        return Ok(TuningKey::new(&g.name, None, None));
    }
    let (devs, _) = crate::backend::cuda::info::list_devices()?;
    let d = devs
        .iter()
        .find(|d| d.ordinal == opts.device)
        .ok_or_else(|| {
            Error::invalid(format!(
                "--device {}: there are {} CUDA devices",
                opts.device,
                devs.len()
            ))
        })?;
    let driver = crate::backend::cuda::device::driver_version()?;
    Ok(TuningKey::new(&d.name, Some(d.capability), Some(driver)))
}

/// Tunes the device of `opts` (see the module docs): every candidate of every family in its
/// own child process, progress through `progress`, the winners written to the tuning file
/// (other devices' entries kept). Candidates that differ, fail or hang are never chosen; a
/// family none of whose candidates ran correctly is left out of the entry (defaults stay).
pub fn tune(opts: &TuneOptions, progress: &mut dyn FnMut(&str)) -> Result<TuneReport> {
    let path = file::tuning_path(opts.out.as_deref()).ok_or_else(|| {
        Error::invalid("no place for the tuning file: pass --out, or set BC_TUNING_FILE or HOME")
    })?;
    // A malformed existing file is reported before any measurement (and not overwritten).
    let mut tf = TuningFile::load(&path)?.unwrap_or_default();
    let key = device_key(opts)?;
    if !opts.emulate && key.capability != "9.0" {
        return Err(Error::Unsupported(format!(
            "{}: the tuned variants are Hopper (compute capability 9.0) kernels; this device has {}",
            key.device, key.capability
        )));
    }
    let (attention, convs) = if opts.tiny {
        tiny_spec()
    } else {
        (real_attention(opts.model.as_ref()), real_convs())
    };
    let mut spec = ProbeSpec {
        device: opts.device,
        emulate: opts.emulate,
        attention,
        convs,
        reps: opts.reps.max(1),
        split_tile: Family::Attention.default_candidate().into(),
    };
    let families: Vec<Family> = if opts.families.is_empty() {
        Family::ALL.to_vec()
    } else {
        Family::ALL
            .into_iter()
            .filter(|f| opts.families.contains(f))
            .collect()
    };
    // With some families only, the device's other choices (and measurements) stay.
    let previous = tf.entry(&key).cloned();
    let mut choices = previous
        .as_ref()
        .map_or_else(Choices::default, |e| e.choices.clone());
    // The choices kept must be ones this build knows (the split family is measured with the
    // kept attention tile): a bad one is reported here, under the file and the field, not by
    // every child under the environment variable that takes the same names.
    let mut kept = choices.clone();
    for f in &families {
        kept.clear(*f);
    }
    kept.parse().map_err(|m| {
        Error::format(format!(
            "tuning file {}: the entry for {}: {m}; `--only` keeps it: tune that family too, \
             or delete or move the file",
            path.display(),
            key.describe()
        ))
    })?;
    progress(&format!("tuning {} -> {}", key.describe(), path.display()));
    if let Some(a) = &choices.attention {
        spec.split_tile = a.clone();
    }
    let mut rows = Vec::new();
    for family in families {
        let mut measured = Vec::new();
        for &c in family.candidates() {
            let spec_json =
                serde_json::to_string(&spec).map_err(|e| Error::Internal(e.to_string()))?;
            let args = vec![
                "tune".to_string(),
                "--probe".into(),
                format!("{}={c}", family.name()),
                "--spec".into(),
                spec_json,
            ];
            let r = child::run_child(
                &opts.exe,
                &args,
                CHILD_ENV_REMOVE,
                &[("BC_TUNE_PARENT", &std::process::id().to_string())],
                opts.timeout,
            );
            progress(&format!(
                "  {}={c}: {}{}{}",
                family.name(),
                r.outcome.name(),
                r.ms.map_or(String::new(), |m| format!(" {m:.3} ms")),
                r.message
                    .as_deref()
                    .map_or(String::new(), |m| format!(" ({m})"))
            ));
            measured.push((c.to_string(), r));
        }
        let winner = choose(family.default_candidate(), &measured);
        match &winner {
            Some(w) => choices.set(family, w),
            None => choices.clear(family),
        }
        if family == Family::Attention {
            spec.split_tile = winner
                .clone()
                .unwrap_or_else(|| family.default_candidate().into());
        }
        rows.extend(measured.into_iter().map(|(candidate, result)| Row {
            family,
            chosen: winner.as_deref() == Some(candidate.as_str()),
            candidate,
            result,
        }));
    }
    let entry = Entry {
        key,
        tuned_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        choices,
        measured: previous
            .iter()
            .flat_map(|e| e.measured.iter())
            .filter(|m| !rows.iter().any(|r| r.family.name() == m.family))
            .cloned()
            .chain(rows.iter().map(|r| Measured {
                family: r.family.name().into(),
                candidate: r.candidate.clone(),
                outcome: r.result.outcome.name().into(),
                ms: r.result.ms,
                err: r.result.err,
            }))
            .collect(),
    };
    // Read again: another tune (another device) may have written it while this one measured.
    if let Some(now) = TuningFile::load(&path)? {
        tf = now;
    }
    tf.insert(entry.clone());
    tf.save(&path)?;
    Ok(TuneReport { path, entry, rows })
}

/// The table `blockcascade tune` prints: family, candidate, outcome, ms, TFLOP/s, error,
/// chosen.
pub fn table(rows: &[Row]) -> String {
    let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    let mut s = format!(
        "{:<10} {:<9} {:<8} {:>10} {:>9} {:>9}  chosen\n",
        "family", "candidate", "outcome", "ms", "TFLOP/s", "err"
    );
    for r in rows {
        s += &format!(
            "{:<10} {:<9} {:<8} {:>10} {:>9} {:>9}  {}\n",
            r.family.name(),
            r.candidate,
            r.result.outcome.name(),
            opt(r.result.ms, 3),
            opt(r.result.tflops, 1),
            r.result.err.map_or("-".into(), |e| format!("{e:.1e}")),
            if r.chosen { "*" } else { "" }
        );
    }
    s
}

/// The hidden `tune --probe FAMILY=CANDIDATE --spec JSON`: runs the probe and returns the line
/// to print and whether the child should exit successfully.
pub fn probe_main(probe: &str, spec: &str) -> (String, bool) {
    die_with_parent();
    let r = match (parse_probe(probe), serde_json::from_str::<ProbeSpec>(spec)) {
        (Ok((family, c)), Ok(spec)) => probe::run_probe(family, &c, &spec),
        (Err(e), _) => ProbeResult::failed(e.to_string()),
        (_, Err(e)) => ProbeResult::failed(format!("--spec: {e}")),
    };
    let ok = r.outcome != Outcome::Failed;
    let json = serde_json::to_string(&r).unwrap_or_else(|_| "{\"outcome\":\"failed\"}".into());
    (format!("{}{json}", probe::RESULT_PREFIX), ok)
}

/// A probe child dies with its parent (an interrupted tune leaves no child behind: the
/// children run in their own process group, out of reach of the terminal's Ctrl-C). The parent
/// passes its process id in `BC_TUNE_PARENT`: a child whose parent is already another one
/// (the tune died before the `prctl`) exits at once.
#[cfg(target_os = "linux")]
fn die_with_parent() {
    // SAFETY: plain prctl/getppid calls on this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // The parent died before the prctl: we were reparented.
        let parent = std::env::var("BC_TUNE_PARENT")
            .ok()
            .and_then(|p| p.parse::<i32>().ok());
        if parent.is_some_and(|p| p != libc::getppid()) {
            std::process::exit(1);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent() {}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(outcome: Outcome, ms: f64) -> ProbeResult {
        ProbeResult {
            outcome,
            ms: Some(ms),
            tflops: None,
            err: Some(0.0),
            message: None,
        }
    }

    #[test]
    fn the_fastest_ok_candidate_wins_and_never_a_broken_one() {
        let rows = |v: &[(&str, Outcome, f64)]| -> Vec<(String, ProbeResult)> {
            v.iter()
                .map(|(c, o, ms)| (c.to_string(), r(*o, *ms)))
                .collect()
        };
        // Faster but differs / failed / hung: never chosen.
        for bad in [Outcome::Differs, Outcome::Failed, Outcome::Hung] {
            let v = rows(&[("pp_k128", Outcome::Ok, 2.0), ("ws", bad, 0.5)]);
            assert_eq!(choose("pp_k128", &v).as_deref(), Some("pp_k128"));
        }
        let v = rows(&[
            ("pp_k128", Outcome::Ok, 2.0),
            ("ws", Outcome::Ok, 1.5),
            ("pp", Outcome::Ok, 1.7),
            ("base", Outcome::Differs, 1.0),
        ]);
        assert_eq!(choose("pp_k128", &v).as_deref(), Some("ws"));
        // Within the margin: the default stays.
        let v = rows(&[("pp_k128", Outcome::Ok, 2.0), ("ws", Outcome::Ok, 1.99)]);
        assert_eq!(choose("pp_k128", &v).as_deref(), Some("pp_k128"));
        // The default broken: the fastest correct one.
        let v = rows(&[("base", Outcome::Failed, 1.0), ("ws", Outcome::Ok, 3.0)]);
        assert_eq!(choose("base", &v).as_deref(), Some("ws"));
        let v = rows(&[("base", Outcome::Hung, 1.0)]);
        assert_eq!(choose("base", &v), None);
    }

    #[test]
    fn probe_arguments_parse_or_fail_clearly() {
        assert_eq!(
            parse_probe("attention=ws").unwrap(),
            (Family::Attention, "ws".into())
        );
        assert_eq!(parse_probe("conv=ws_halo").unwrap().0, Family::Conv);
        for bad in ["attention", "attention=fast", "gemm=ws", ""] {
            assert!(parse_probe(bad).is_err(), "{bad}");
        }
        let (line, ok) = probe_main("attention=ws", "{not json");
        assert!(!ok);
        assert!(line.starts_with(probe::RESULT_PREFIX) && line.contains("failed"));
    }

    #[test]
    fn a_conv_winner_sets_both_flags() {
        let mut c = Choices::default();
        c.set(Family::Conv, "ws_halo");
        assert_eq!(c.conv.as_deref(), Some("ws"));
        assert_eq!(c.conv_halo, Some(true));
        c.set(Family::Conv, "halo");
        assert_eq!((c.conv.as_deref(), c.conv_halo), (Some("base"), Some(true)));
    }
}
