//! Applying a device's tuning entry: where the file is looked for, which device key must
//! match, and the precedence: an environment variable or a code option that picks a variant
//! always wins over the file; the file only fills in what nobody chose.
//!
//! | file choice | overridden by |
//! |---|---|
//! | attention | [`crate::backend::cuda::CudaOptions::attention_tile`] (and `BC_ATTENTION_TILE`), `BC_ATTN_WGMMA_VARIANT`, `BC_ATTN_WGMMA=0` |
//! | split | [`crate::backend::cuda::CudaOptions::attention_split`], `BC_ATTN_SPLIT`, `BC_ATTN_WGMMA=0` |
//! | conv | `BC_CONV_WGMMA_VARIANT`, `BC_CONV_WGMMA=0` |
//! | conv_halo | `BC_CONV_HALO`, `BC_CONV_WGMMA=0` |
//!
//! `BC_TUNING=off` (or [`TuningSource::Off`]) loads nothing. An emulated device loads an entry
//! only from a file named explicitly ([`TuningSource::File`]) or with `BC_TUNING_EMULATED=1`
//! (test hooks: the emulated device's entry is keyed by its own name).

use super::file::{tuning_path, Choices, Parsed, TuningFile, TuningKey};
use crate::backend::cuda::device::{self, Gpu};
use crate::kernels::launch::AttentionTile;
use crate::Result;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;

/// Where a session's tuned choices come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TuningSource {
    /// The default file ([`tuning_path`]) on a real device, unless `BC_TUNING=off`; an emulated
    /// device only with `BC_TUNING_EMULATED=1`.
    #[default]
    Auto,
    /// Nothing is loaded.
    Off,
    /// This file, on any device (the emulated one included).
    File(PathBuf),
}

impl TuningSource {
    /// [`TuningSource::Off`] when `BC_TUNING` is `off` or `0`, else [`TuningSource::Auto`].
    pub fn from_env() -> TuningSource {
        match std::env::var("BC_TUNING").ok().as_deref().map(str::trim) {
            Some("off" | "0") => TuningSource::Off,
            _ => TuningSource::Auto,
        }
    }
}

/// The entry found for a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The file it came from.
    pub path: PathBuf,
    /// The device key it matched.
    pub key: TuningKey,
    /// Its choices as written.
    pub choices: Choices,
    /// Its choices parsed.
    pub parsed: Parsed,
}

/// The key of the device `gpu` is (its name, compute capability, the driver's version).
pub fn key_of(gpu: &Gpu) -> Result<TuningKey> {
    let driver = match gpu.compute_capability() {
        Some(_) => Some(device::driver_version()?),
        None => None,
    };
    Ok(TuningKey::new(&gpu.name, gpu.compute_capability(), driver))
}

/// The tuning entry of `gpu` from `source`: `Ok(None)` when loading is off, there is no file
/// or no entry with this device's key; an [`crate::Error::Format`] naming the file when a file
/// the user named (`TuningSource::File`, `BC_TUNING_FILE`) cannot be read or parsed or its
/// entry holds a choice this build does not know. The default cache file under
/// [`TuningSource::Auto`] is only a cache: a problem with it (unreadable, a directory, another
/// build's format) is one stderr note and no entry, so a user who never ran `tune` cannot lose
/// the CUDA backend to it. Off compute capability 9.0 nothing is loaded (`tune` writes no
/// entry there).
pub fn load(gpu: &Gpu, source: &TuningSource) -> Result<Option<Applied>> {
    let (path, named) = match source {
        TuningSource::Off => return Ok(None),
        TuningSource::File(p) => (p.clone(), true),
        TuningSource::Auto => {
            if TuningSource::from_env() == TuningSource::Off
                || (gpu.is_emulated() && !device::env_flag("BC_TUNING_EMULATED"))
                || (!gpu.is_emulated() && gpu.compute_capability() != Some((9, 0)))
            {
                return Ok(None);
            }
            match tuning_path(None) {
                Some(p) => (p, env_set("BC_TUNING_FILE").is_some()),
                None => return Ok(None),
            }
        }
    };
    match load_entry(gpu, path) {
        Err(e) if !named => {
            note(&format!("tuning: {e}: ignored"));
            Ok(None)
        }
        r => r,
    }
}

/// [`load`] once the path is known.
fn load_entry(gpu: &Gpu, path: PathBuf) -> Result<Option<Applied>> {
    let Some(file) = TuningFile::load(&path)? else {
        return Ok(None);
    };
    let key = key_of(gpu)?;
    let Some(entry) = file.entry(&key) else {
        note(&format!(
            "tuning: {}: no entry for {} (run `blockcascade tune` to measure this device)",
            path.display(),
            key.describe()
        ));
        return Ok(None);
    };
    let parsed = entry.choices.parse().map_err(|m| {
        crate::Error::format(format!(
            "tuning file {}: the entry for {}: {m}; delete or move it, then rerun `blockcascade tune` (BC_TUNING=off ignores it)",
            path.display(),
            key.describe()
        ))
    })?;
    Ok(Some(Applied {
        path,
        key,
        choices: entry.choices.clone(),
        parsed,
    }))
}

/// Prints `line` to stderr once per process (a session reopened on the same device does not
/// repeat it).
pub fn note(line: &str) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen
        .get_or_insert_with(HashSet::new)
        .insert(line.to_string())
    {
        eprintln!("{line}");
    }
}

/// Whether the environment variable `k` picks something (set and not blank).
pub fn env_set(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

/// What the CUDA backend takes from an entry ([`attention_tuning`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttentionTuning {
    /// The wgmma attention tile to use when the session runs wgmma and nobody chose one.
    pub tile: Option<AttentionTile>,
    /// Key splits to force (`None`: none from the file; the model or the option decides).
    pub split: Option<usize>,
    /// What was applied and what was overridden, for people.
    pub notes: Vec<String>,
}

/// The attention choices of `p` that apply under the session's options (`tile`, `split`: what
/// [`crate::backend::cuda::CudaOptions`] chose) and the environment `env` (see the module
/// docs for the precedence).
pub fn attention_tuning(
    p: &Parsed,
    tile: Option<AttentionTile>,
    split: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> AttentionTuning {
    let mut t = AttentionTuning::default();
    // The file's attention and split were measured with the wgmma kernels; with them off the
    // session runs `mma.sync`, which neither applies to.
    let wgmma_off = env("BC_ATTN_WGMMA").is_some_and(|v| v.trim() == "0");
    if let Some(a) = p.attention {
        if wgmma_off {
            t.notes
                .push(format!("attention={} (BC_ATTN_WGMMA=0 wins)", a.name()));
        } else if tile.is_some() {
            t.notes
                .push(format!("attention={} (the session's tile wins)", a.name()));
        } else if env("BC_ATTN_WGMMA_VARIANT").is_some() {
            t.notes.push(format!(
                "attention={} (BC_ATTN_WGMMA_VARIANT wins)",
                a.name()
            ));
        } else {
            t.tile = Some(a);
            t.notes.push(format!("attention={}", a.name()));
        }
    }
    if let Some(s) = p.split {
        let name = s.map_or("auto".to_string(), |n| n.to_string());
        if wgmma_off {
            t.notes.push(format!("split={name} (BC_ATTN_WGMMA=0 wins)"));
        } else if split.is_some() {
            t.notes
                .push(format!("split={name} (the session's split wins)"));
        } else if env("BC_ATTN_SPLIT").is_some() {
            t.notes.push(format!("split={name} (BC_ATTN_SPLIT wins)"));
        } else {
            t.split = s;
            t.notes.push(format!("split={name}"));
        }
    }
    t
}

/// What a CUDA decoder takes from an entry ([`conv_tuning`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConvTuning {
    /// The warp-specialized wgmma conv on or off (`None`: not from the file).
    pub ws: Option<bool>,
    /// The halo conv on or off (`None`: not from the file).
    pub halo: Option<bool>,
    /// What was applied and what was overridden, for people.
    pub notes: Vec<String>,
}

/// The conv choices of `p` that apply under the environment `env`.
pub fn conv_tuning(p: &Parsed, env: &dyn Fn(&str) -> Option<String>) -> ConvTuning {
    let mut t = ConvTuning::default();
    let on = |b: bool| if b { "ws" } else { "base" };
    if let Some(ws) = p.conv_ws {
        if env("BC_CONV_WGMMA_VARIANT").is_some() {
            t.notes
                .push(format!("conv={} (BC_CONV_WGMMA_VARIANT wins)", on(ws)));
        } else {
            t.ws = Some(ws);
            t.notes.push(format!("conv={}", on(ws)));
        }
    }
    if let Some(h) = p.conv_halo {
        let name = if h { "on" } else { "off" };
        if env("BC_CONV_HALO").is_some() {
            t.notes
                .push(format!("conv_halo={name} (BC_CONV_HALO wins)"));
        } else {
            t.halo = Some(h);
            t.notes.push(format!("conv_halo={name}"));
        }
    }
    t
}

/// The stderr line of an applied entry: `tuning: FILE: DEVICE: NOTES`.
pub fn describe(a: &Applied, notes: &[String]) -> String {
    format!(
        "tuning: {}: {}: {}",
        a.path.display(),
        a.key.device,
        if notes.is_empty() {
            "nothing for this part".to_string()
        } else {
            notes.join(", ")
        }
    )
}

/// What `info --devices` prints about tuning: the file and, per device of `devices`, the
/// entry that applies to it (or that none does).
pub fn devices_report(devices: &[device::DeviceInfo]) -> Vec<String> {
    if TuningSource::from_env() == TuningSource::Off {
        return vec!["tuning: off (BC_TUNING=off)".into()];
    }
    devices_report_with(
        tuning_path(None).as_deref(),
        device::driver_version().ok(),
        devices,
    )
}

/// [`devices_report`] for the file `path` (`None`: no location) under driver version
/// `driver`.
pub fn devices_report_with(
    path: Option<&std::path::Path>,
    driver: Option<i32>,
    devices: &[device::DeviceInfo],
) -> Vec<String> {
    let Some(path) = path else {
        return vec!["tuning: no file location (set BC_TUNING_FILE or HOME)".into()];
    };
    let file = match TuningFile::load(path) {
        Ok(Some(f)) => f,
        Ok(None) => {
            return vec![format!(
                "tuning: {}: no file (run `blockcascade tune` on a Hopper GPU)",
                path.display()
            )]
        }
        Err(e) => return vec![format!("tuning: {e}")],
    };
    devices
        .iter()
        .map(|d| {
            let key = TuningKey::new(&d.name, Some(d.capability), driver);
            match file.entry(&key) {
                Some(e) => format!(
                    "tuning: device {}: {}: {}",
                    d.ordinal,
                    path.display(),
                    e.choices.describe()
                ),
                None => format!(
                    "tuning: device {}: {}: no entry for {} (defaults)",
                    d.ordinal,
                    path.display(),
                    key.describe()
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn parsed() -> Parsed {
        Parsed {
            attention: Some(AttentionTile::WgmmaWs),
            split: Some(Some(2)),
            conv_ws: Some(true),
            conv_halo: Some(true),
        }
    }

    #[test]
    fn the_file_fills_in_what_nobody_chose() {
        let t = attention_tuning(&parsed(), None, None, &env(&[]));
        assert_eq!(t.tile, Some(AttentionTile::WgmmaWs));
        assert_eq!(t.split, Some(2));
        let c = conv_tuning(&parsed(), &env(&[]));
        assert_eq!((c.ws, c.halo), (Some(true), Some(true)));
        // A file that says auto forces no split.
        let auto = Parsed {
            split: Some(None),
            ..parsed()
        };
        assert_eq!(attention_tuning(&auto, None, None, &env(&[])).split, None);
    }

    #[test]
    fn environment_variables_and_options_win_over_the_file() {
        let e = env(&[
            ("BC_ATTN_WGMMA_VARIANT", "pp"),
            ("BC_ATTN_SPLIT", "1"),
            ("BC_CONV_WGMMA_VARIANT", "base"),
            ("BC_CONV_HALO", "0"),
        ]);
        let t = attention_tuning(&parsed(), None, None, &e);
        assert_eq!((t.tile, t.split), (None, None));
        assert!(t
            .notes
            .iter()
            .any(|n| n.contains("BC_ATTN_WGMMA_VARIANT wins")));
        let c = conv_tuning(&parsed(), &e);
        assert_eq!((c.ws, c.halo), (None, None));
        // Options in code win too.
        let t = attention_tuning(&parsed(), Some(AttentionTile::Rows64), Some(3), &env(&[]));
        assert_eq!((t.tile, t.split), (None, None));
        // With the wgmma kernels off neither the wgmma tile nor its split applies, and the
        // line says so instead of naming a tile that does not run.
        let t = attention_tuning(&parsed(), None, None, &env(&[("BC_ATTN_WGMMA", "0")]));
        assert_eq!((t.tile, t.split), (None, None));
        assert!(
            t.notes.iter().all(|n| n.contains("BC_ATTN_WGMMA=0 wins")),
            "{:?}",
            t.notes
        );
    }

    #[test]
    fn info_devices_names_the_entry_of_each_gpu() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuning.json");
        let dev = |ordinal, name: &str| device::DeviceInfo {
            ordinal,
            name: name.into(),
            total_mem: 0,
            capability: (9, 0),
            pci_bus_id: String::new(),
        };
        let devs = [dev(0, "NVIDIA H200"), dev(1, "NVIDIA H100")];
        let none = devices_report_with(Some(&path), Some(13000), &devs);
        assert!(none.len() == 1 && none[0].contains("no file"), "{none:?}");
        let mut f = TuningFile::default();
        f.insert(crate::tune::file::Entry {
            key: TuningKey::new("NVIDIA H200", Some((9, 0)), Some(13000)),
            tuned_at: 0,
            choices: Choices {
                attention: Some("ws".into()),
                ..Choices::default()
            },
            measured: Vec::new(),
        });
        f.save(&path).unwrap();
        let lines = devices_report_with(Some(&path), Some(13000), &devs);
        assert!(lines[0].starts_with("tuning: device 0") && lines[0].ends_with("attention=ws"));
        assert!(lines[1].contains("no entry"), "{lines:?}");
        // Another driver: the entry does not apply.
        let lines = devices_report_with(Some(&path), Some(12080), &devs);
        assert!(lines[0].contains("no entry"), "{lines:?}");
        std::fs::write(&path, "garbage").unwrap();
        let bad = devices_report_with(Some(&path), Some(13000), &devs);
        assert!(bad.len() == 1 && bad[0].contains("rerun `blockcascade tune`"));
        assert!(devices_report_with(None, None, &devs)[0].contains("no file location"));
    }

    /// An unknown choice in the file is reported under the file, the device's entry and the
    /// field, not under the environment variable that takes the same names (the user set
    /// none).
    #[test]
    fn a_bad_choice_in_the_file_names_the_file_entry_and_field() {
        let g = Gpu::open_emulated().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuning.json");
        for (choices, field, value) in [
            (
                Choices {
                    attention: Some("fast".into()),
                    ..Choices::default()
                },
                "attention",
                "fast",
            ),
            (
                Choices {
                    conv: Some("turbo".into()),
                    ..Choices::default()
                },
                "conv",
                "turbo",
            ),
            (
                Choices {
                    split: Some("0".into()),
                    ..Choices::default()
                },
                "split",
                "0",
            ),
        ] {
            let mut f = TuningFile::default();
            f.insert(crate::tune::file::Entry {
                key: key_of(&g).unwrap(),
                tuned_at: 0,
                choices,
                measured: Vec::new(),
            });
            f.save(&path).unwrap();
            let e = load(&g, &TuningSource::File(path.clone())).unwrap_err();
            let m = e.to_string();
            assert!(matches!(e, crate::Error::Format(_)), "{m}");
            assert!(m.contains(&path.display().to_string()), "{m}");
            assert!(m.contains(&format!("the entry for {}", g.name)), "{m}");
            assert!(
                m.contains(&format!("field \"{field}\": \"{value}\"")),
                "{m}"
            );
            // (`BC_TUNING=off` in the advice is the one variable it may name.)
            let vars = m.replace("BC_TUNING=off", "");
            assert!(!vars.contains("BC_"), "named an environment variable: {m}");
        }
    }

    #[test]
    fn off_loads_nothing_and_a_missing_file_is_no_entry() {
        let g = Gpu::open_emulated().unwrap();
        assert_eq!(load(&g, &TuningSource::Off).unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        let missing = TuningSource::File(dir.path().join("none.json"));
        assert_eq!(load(&g, &missing).unwrap(), None);
    }
}
