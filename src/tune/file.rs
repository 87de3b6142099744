//! The tuning file: per device (name, compute capability, driver, engine version, kernel
//! fingerprint) the kernel variants `blockcascade tune` measured fastest and correct there.
//!
//! JSON, written atomically (a temporary file in the same directory, then a rename), so a
//! reader never sees half a file. Rewriting keeps the entries of other devices; an entry whose
//! key does not match the device a session opens (another GPU, a driver or engine upgrade, a
//! rebuilt fatbin) is ignored.

use super::Family;
use crate::kernels::launch::AttentionTile;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Layout version of the file (a file of another version is malformed: rerun the tuner).
pub const FILE_VERSION: u32 = 1;

/// Which device and build an entry was measured on: all fields must match for it to apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TuningKey {
    /// The device's name (`cuDeviceGetName`).
    pub device: String,
    /// Compute capability `major.minor` (`emulated` for the emulated device).
    pub capability: String,
    /// The driver's CUDA version (`cuDriverGetVersion`, e.g. `13000`; `emulated`).
    pub driver: String,
    /// The crate version that measured it.
    pub engine: String,
    /// A hash of the embedded fatbin ([`kernel_fingerprint`]): a rebuilt kernel invalidates.
    pub kernels: String,
}

impl TuningKey {
    /// The key of a device named `device` with compute capability `capability` (`None`: the
    /// emulated device) under driver version `driver`, for this build.
    pub fn new(device: &str, capability: Option<(i32, i32)>, driver: Option<i32>) -> TuningKey {
        TuningKey {
            device: device.to_string(),
            capability: capability.map_or("emulated".into(), |(a, b)| format!("{a}.{b}")),
            driver: driver.map_or("emulated".into(), |d| d.to_string()),
            engine: crate::VERSION.to_string(),
            kernels: kernel_fingerprint(),
        }
    }

    /// One line for people: `NAME (cc X.Y, driver D, engine V)`.
    pub fn describe(&self) -> String {
        format!(
            "{} (cc {}, driver {}, engine {}, kernels {})",
            self.device, self.capability, self.driver, self.engine, self.kernels
        )
    }
}

/// FNV-1a (64 bits) of the embedded fatbin, as hex; `none` without kernels.
pub fn kernel_fingerprint() -> String {
    static FP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FP.get_or_init(|| match crate::kernels::fatbin() {
        Some(b) => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for &x in b {
                h ^= x as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            format!("{h:016x}")
        }
        None => "none".into(),
    })
    .clone()
}

/// The variants chosen for a device (`None`: that family was not tuned, the default stays).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choices {
    /// The Hopper attention kernel, as `BC_ATTN_WGMMA_VARIANT` names it (`pp_k128`, `ws`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<String>,
    /// Key splits of the self-attention, as `BC_ATTN_SPLIT` takes them (`auto`, `1`, `2`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// The decoders' wgmma convolution, as `BC_CONV_WGMMA_VARIANT` names it (`base`, `ws`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv: Option<String>,
    /// The persistent halo convolution for the convs that fit it (`BC_CONV_HALO=1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_halo: Option<bool>,
}

/// [`Choices`] parsed into what the backend and the decoder take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The wgmma attention tile.
    pub attention: Option<AttentionTile>,
    /// `Some(None)`: the wave-fill model (`auto`); `Some(Some(n))`: n splits.
    pub split: Option<Option<usize>>,
    /// The warp-specialized wgmma convolution (`ws`) or not (`base`).
    pub conv_ws: Option<bool>,
    /// The halo convolution.
    pub conv_halo: Option<bool>,
}

impl Choices {
    /// Parses the choices. An unknown name is an error naming the file's field and the value
    /// (`attention "fast": expected ...`), never the environment variable that takes the same
    /// names: the caller adds the file and the entry.
    pub fn parse(&self) -> std::result::Result<Parsed, String> {
        let attention = match &self.attention {
            Some(v) => Some(AttentionTile::wgmma_variant(Some(v)).map_err(|_| {
                format!(
                    "field \"attention\": {v:?} is not {}",
                    AttentionTile::WGMMA_VARIANT_NAMES
                )
            })?),
            None => None,
        };
        let split = match self.split.as_deref().map(str::trim) {
            None => None,
            Some("auto") => Some(None),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= 1 => Some(Some(n)),
                _ => {
                    return Err(format!(
                        "field \"split\": {v:?} is not auto or a number >= 1"
                    ))
                }
            },
        };
        let conv_ws = match &self.conv {
            Some(v) => Some(
                crate::kernels::launch::ConvWgmmaVariant::parse(Some(v))
                    .map_err(|_| format!("field \"conv\": {v:?} is not base or ws"))?
                    == crate::kernels::launch::ConvWgmmaVariant::Ws,
            ),
            None => None,
        };
        Ok(Parsed {
            attention,
            split,
            conv_ws,
            conv_halo: self.conv_halo,
        })
    }

    /// Sets the choice of `family` from its winning candidate's name.
    pub fn set(&mut self, family: Family, candidate: &str) {
        match family {
            Family::Attention => self.attention = Some(candidate.into()),
            Family::Split => self.split = Some(candidate.into()),
            Family::Conv => {
                let (ws, halo) = super::conv_candidate(candidate);
                self.conv = Some(if ws { "ws" } else { "base" }.into());
                self.conv_halo = Some(halo);
            }
        }
    }

    /// Forgets the choice of `family` (its defaults apply again).
    pub fn clear(&mut self, family: Family) {
        match family {
            Family::Attention => self.attention = None,
            Family::Split => self.split = None,
            Family::Conv => {
                self.conv = None;
                self.conv_halo = None;
            }
        }
    }

    /// `attention=ws split=auto conv=base conv_halo=off` (the families tuned).
    pub fn describe(&self) -> String {
        let mut v = Vec::new();
        if let Some(a) = &self.attention {
            v.push(format!("attention={a}"));
        }
        if let Some(s) = &self.split {
            v.push(format!("split={s}"));
        }
        if let Some(c) = &self.conv {
            v.push(format!("conv={c}"));
        }
        if let Some(h) = self.conv_halo {
            v.push(format!("conv_halo={}", if h { "on" } else { "off" }));
        }
        if v.is_empty() {
            "nothing".into()
        } else {
            v.join(" ")
        }
    }
}

/// One candidate's measurement as the file keeps it (for people reading it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// `attention`, `split` or `conv`.
    pub family: String,
    /// The candidate's name.
    pub candidate: String,
    /// `ok`, `differs`, `failed` or `hung`.
    pub outcome: String,
    /// Median milliseconds (`ok` and `differs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<f64>,
    /// The largest relative error against the reference (`probe::max_rel_err`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<f64>,
}

/// One device's entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Which device and build it was measured on.
    pub key: TuningKey,
    /// Seconds since the Unix epoch when it was written.
    pub tuned_at: u64,
    /// The variants chosen.
    pub choices: Choices,
    /// Every candidate's outcome.
    #[serde(default)]
    pub measured: Vec<Measured>,
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuningFile {
    /// [`FILE_VERSION`].
    pub version: u32,
    /// One entry per device key.
    pub entries: Vec<Entry>,
}

impl Default for TuningFile {
    fn default() -> Self {
        TuningFile {
            version: FILE_VERSION,
            entries: Vec::new(),
        }
    }
}

/// The error for a file that exists but cannot be used, naming it and the fix.
fn malformed(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::format(format!(
        "tuning file {}: {why}; delete or move it, then rerun `blockcascade tune` (BC_TUNING=off ignores it)",
        path.display()
    ))
}

impl TuningFile {
    /// Reads `path`: `Ok(None)` when it does not exist, an [`Error::Format`] naming the file
    /// and the fix when it cannot be read or parsed. Entries are not checked here: only the
    /// one that applies ([`TuningFile::entry`]) must hold choices this build knows, so another
    /// build's entry in a shared file does not break this one.
    pub fn load(path: &Path) -> Result<Option<TuningFile>> {
        // A FIFO or device is refused before it is opened (no read can block), a huge file
        // before it is read (files::read_regular_file).
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            _ => {}
        }
        let bytes =
            crate::files::read_regular_file(path, "a tuning file", crate::files::MAX_JSON_BYTES)
                .map_err(|e| malformed(path, format!("cannot be read: {e}")))?;
        let text = String::from_utf8(bytes).map_err(|_| malformed(path, "not UTF-8"))?;
        let f: TuningFile =
            serde_json::from_str(&text).map_err(|e| malformed(path, format!("malformed: {e}")))?;
        if f.version != FILE_VERSION {
            return Err(malformed(
                path,
                format!("version {} (this build reads {FILE_VERSION})", f.version),
            ));
        }
        Ok(Some(f))
    }

    /// The entry for `key`, if one matches exactly.
    pub fn entry(&self, key: &TuningKey) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == *key)
    }

    /// Puts `entry` in, replacing the one with the same key and any older entry of the same
    /// device and capability (a stale build's); other devices' entries stay.
    pub fn insert(&mut self, entry: Entry) {
        self.entries.retain(|e| {
            !(e.key.device == entry.key.device && e.key.capability == entry.key.capability)
        });
        self.entries.push(entry);
    }

    /// Writes the file atomically: a new temporary file beside `path` (created exclusively,
    /// so nothing already at its name, a FIFO say, is opened or written through), then a rename
    /// (the directory is created when missing). A device, FIFO or socket at `path` is refused
    /// (the rule of every output, [`crate::files::check_output_target`]); a failed write
    /// leaves nothing behind.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::files::check_output_target(path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::invalid(format!("{}: not a file name", path.display())))?;
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::Internal(e.to_string()))?;
        let (tmp, mut f) =
            crate::video::atomic::create_temp_file(&dir, Path::new(&name), "tmp", false)
                .map_err(|e| crate::video::atomic::create_error(path, e))?;
        let written = (|| {
            use std::io::Write;
            f.write_all((text + "\n").as_bytes())?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)
        })();
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }
}

/// Where the tuning file is: `out` when given, else `$BC_TUNING_FILE`, else
/// `$XDG_CACHE_HOME/blockcascade/tuning.json`, else `$HOME/.cache/blockcascade/tuning.json`;
/// `None` when none of them is set.
pub fn tuning_path(out: Option<&Path>) -> Option<PathBuf> {
    tuning_path_with(out, &|k| std::env::var_os(k).filter(|v| !v.is_empty()))
}

/// [`tuning_path`] with the environment looked up through `env`.
pub fn tuning_path_with(
    out: Option<&Path>,
    env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    if let Some(p) = out {
        return Some(p.to_path_buf());
    }
    if let Some(p) = env("BC_TUNING_FILE") {
        return Some(PathBuf::from(p));
    }
    let cache = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("blockcascade").join("tuning.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dev: &str) -> TuningKey {
        TuningKey::new(dev, Some((9, 0)), Some(13000))
    }

    fn entry(dev: &str, attention: &str) -> Entry {
        Entry {
            key: key(dev),
            tuned_at: 1,
            choices: Choices {
                attention: Some(attention.into()),
                ..Choices::default()
            },
            measured: Vec::new(),
        }
    }

    #[test]
    fn the_path_follows_out_then_the_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        let all = env(&[
            ("BC_TUNING_FILE", "/a/t.json"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ]);
        assert_eq!(
            tuning_path_with(Some(Path::new("/o.json")), &all),
            Some(PathBuf::from("/o.json"))
        );
        assert_eq!(
            tuning_path_with(None, &all),
            Some(PathBuf::from("/a/t.json"))
        );
        let xdg = env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]);
        assert_eq!(
            tuning_path_with(None, &xdg),
            Some(PathBuf::from("/x/blockcascade/tuning.json"))
        );
        let home = env(&[("HOME", "/h")]);
        assert_eq!(
            tuning_path_with(None, &home),
            Some(PathBuf::from("/h/.cache/blockcascade/tuning.json"))
        );
        assert_eq!(tuning_path_with(None, &env(&[])), None);
    }

    #[test]
    fn a_rewrite_keeps_other_devices_and_replaces_the_same_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("tuning.json");
        let mut f = TuningFile::default();
        f.insert(entry("NVIDIA H100", "ws"));
        f.insert(entry("NVIDIA H200", "pp"));
        f.save(&path).unwrap();
        let mut g = TuningFile::load(&path).unwrap().unwrap();
        assert_eq!(g, f);
        g.insert(entry("NVIDIA H200", "k128"));
        g.save(&path).unwrap();
        let h = TuningFile::load(&path).unwrap().unwrap();
        assert_eq!(h.entries.len(), 2);
        let a = |d: &str| h.entry(&key(d)).and_then(|e| e.choices.attention.clone());
        assert_eq!(a("NVIDIA H100").as_deref(), Some("ws"));
        assert_eq!(a("NVIDIA H200").as_deref(), Some("k128"));
        // Only the file itself is left in the directory (the temporary file was renamed).
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("tuning.json")]);
    }

    #[test]
    fn a_key_of_another_driver_or_build_does_not_match() {
        let mut f = TuningFile::default();
        f.insert(entry("NVIDIA H200", "ws"));
        assert!(f.entry(&key("NVIDIA H200")).is_some());
        let other_driver = TuningKey::new("NVIDIA H200", Some((9, 0)), Some(12080));
        assert!(f.entry(&other_driver).is_none());
        let other_engine = TuningKey {
            engine: "0.0.0-old".into(),
            ..key("NVIDIA H200")
        };
        assert!(f.entry(&other_engine).is_none());
        let other_kernels = TuningKey {
            kernels: "0123456789abcdef".into(),
            ..key("NVIDIA H200")
        };
        assert!(f.entry(&other_kernels).is_none());
    }

    #[test]
    fn a_malformed_file_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuning.json");
        assert!(TuningFile::load(&path).unwrap().is_none());
        for (text, why) in [
            ("{ not json", "malformed"),
            (r#"{"version": 99, "entries": []}"#, "version 99"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = TuningFile::load(&path).unwrap_err();
            let m = e.to_string();
            assert!(matches!(e, Error::Format(_)), "{m}");
            assert!(m.contains(&path.display().to_string()), "{m}");
            assert!(m.contains(why), "{m}");
            assert!(m.contains("then rerun `blockcascade tune`"), "{m}");
        }
        // A directory (or FIFO, device) is refused without being opened.
        let m = TuningFile::load(dir.path()).unwrap_err().to_string();
        assert!(m.contains("cannot be read"), "{m}");
        // An entry another build wrote (a variant this one does not know) loads: only the
        // entry that applies is checked, when it is applied (`apply::load`).
        std::fs::write(
            &path,
            r#"{"version": 1, "entries": [{"key": {"device": "d", "capability": "9.0",
            "driver": "1", "engine": "1", "kernels": "x"}, "tuned_at": 0,
            "choices": {"attention": "fast"}}]}"#,
        )
        .unwrap();
        let f = TuningFile::load(&path).unwrap().unwrap();
        let m = f.entries[0].choices.parse().unwrap_err();
        assert!(m.contains("fast"), "{m}");
    }

    /// A FIFO at the target is refused, not renamed over; a FIFO at the name the temporary
    /// file used to have (`.NAME.PID.tmp`) is neither opened (that blocked for good) nor
    /// written through; nothing is left behind.
    #[cfg(unix)]
    #[test]
    fn save_refuses_a_fifo_target_and_never_opens_one() {
        use std::os::unix::fs::FileTypeExt;
        let mkfifo = crate::files::test_mkfifo;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tuning.json");
        mkfifo(&path);
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(TuningFile::default().save(&p).map_err(|e| e.to_string()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("save blocked");
        assert!(r.unwrap_err().contains("not a regular file"));
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_fifo());
        std::fs::remove_file(&path).unwrap();
        // FIFOs at the next temporary names this process will take: the save must open none
        // of them (a plain create would block on the first), skip them and write the file.
        let next = crate::video::atomic::COUNTER.load(std::sync::atomic::Ordering::Relaxed);
        let fifos: Vec<PathBuf> = (next..next + 8)
            .map(|n| {
                let f = dir
                    .path()
                    .join(format!(".tuning.json.tmp-{}-{n}", std::process::id()));
                mkfifo(&f);
                f
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(TuningFile::default().save(&p).map_err(|e| e.to_string()));
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("save blocked opening a FIFO")
            .unwrap();
        assert!(TuningFile::load(&path).unwrap().is_some());
        for f in &fifos {
            assert!(std::fs::symlink_metadata(f).unwrap().file_type().is_fifo());
        }
        let names = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(names, fifos.len() + 1, "a temporary file was left behind");
    }

    #[test]
    fn choices_parse_to_the_variants() {
        let c = Choices {
            attention: Some("ws".into()),
            split: Some("4".into()),
            conv: Some("ws".into()),
            conv_halo: Some(true),
        };
        assert_eq!(
            c.parse(),
            Ok(Parsed {
                attention: Some(AttentionTile::WgmmaWs),
                split: Some(Some(4)),
                conv_ws: Some(true),
                conv_halo: Some(true),
            })
        );
        let auto = Choices {
            split: Some("auto".into()),
            ..Choices::default()
        };
        assert_eq!(auto.parse().map(|p| p.split), Ok(Some(None)));
        let bad = Choices {
            split: Some("0".into()),
            ..Choices::default()
        };
        assert!(bad.parse().is_err());
    }
}
