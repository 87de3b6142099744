//! Model directories: config, weight and index mutations, sizes too large for memory.

use super::*;

#[test]
fn model_config_mutations() {
    let d = model_copy();
    let cfg_path = d.path().join("config.json");
    Weights::load(d.path()).unwrap();
    let fields = [
        "dim",
        "ffn_dim",
        "freq_dim",
        "num_heads",
        "num_layers",
        "in_dim",
        "out_dim",
        "text_len",
        "text_dim",
        "patch_size",
        "eps",
        "model_type",
    ];
    let values = [
        "-1",
        "0",
        "1.5",
        "\"x\"",
        "null",
        "1e30",
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
        "[]",
        "{}",
        "true",
        "[1, 2]",
        "-0.0",
        "65",
    ];
    for field in fields {
        for value in values {
            let mut c = golden_config();
            c[field] = serde_json::from_str(value).unwrap();
            std::fs::write(&cfg_path, c.to_string()).unwrap();
            let case = format!("{field} = {value}");
            match no_panic(&case, || Weights::load(d.path())) {
                // text_len is in no weight's shape: any value in range is a valid config.
                Ok(_) => assert_eq!((field, value), ("text_len", "65"), "{case} loaded"),
                // Wrong types and values name the field, or the tensor whose shape no longer
                // matches the config.
                Err(e) => {
                    let m = e.to_string();
                    assert!(
                        m.contains(field)
                            || m.contains("has shape")
                            || m.contains("missing tensor"),
                        "{case}: `{m}` names neither the field nor a tensor"
                    );
                }
            }
        }
        // A required field missing is named; the others have Wan's defaults.
        let mut c = golden_config();
        c.as_object_mut().unwrap().remove(field);
        std::fs::write(&cfg_path, c.to_string()).unwrap();
        let r = no_panic(field, || Weights::load(d.path()));
        if ["dim", "ffn_dim", "num_heads", "num_layers"].contains(&field) {
            expect_err(r, &format!("missing field `{field}`"), field);
        } else if field == "text_dim" {
            // The default (4096) does not match this tiny model's weights.
            expect_err(r, "has shape", field);
        } else {
            r.unwrap_or_else(|e| panic!("{field} missing: {e}"));
        }
    }
    // Absurd combinations.
    for (edit, needle) in [
        (serde_json::json!({"dim": 65}), "heads"),
        (
            serde_json::json!({"dim": 66, "num_heads": 2}),
            "heads of even size",
        ),
        (serde_json::json!({"num_layers": 0}), "num_layers"),
        (serde_json::json!({"num_heads": 0}), "num_heads"),
        (serde_json::json!({"eps": 0.0}), "eps"),
        (serde_json::json!({"eps": -1e-6}), "eps"),
        (serde_json::json!({"eps": 1e300}), "eps"),
        (serde_json::json!({"freq_dim": 255}), "freq_dim"),
        (serde_json::json!({"text_len": 0}), "text_len"),
        (serde_json::json!({"model_type": "i2v"}), "t2v"),
        (serde_json::json!({"dim": 1u64 << 40}), "at most"),
        (serde_json::json!({"ffn_dim": 1u64 << 40}), "at most"),
        (serde_json::json!({"num_layers": 1u64 << 40}), "at most"),
        (serde_json::json!({"text_dim": 1u64 << 40}), "at most"),
        // Within the limits but far from the weights: a shape error, nothing allocated.
        (
            serde_json::json!({"dim": 65536, "num_heads": 1024, "ffn_dim": 262144, "num_layers": 1024}),
            "has shape",
        ),
    ] {
        let mut c = golden_config();
        for (k, v) in edit.as_object().unwrap() {
            c[k] = v.clone();
        }
        std::fs::write(&cfg_path, c.to_string()).unwrap();
        let case = edit.to_string();
        expect_err(no_panic(&case, || Weights::load(d.path())), needle, &case);
    }
    // Not JSON, not an object, empty, a directory, missing.
    for (text, needle) in [
        ("{ not json", "malformed config"),
        ("[]", "malformed config"),
        ("", "malformed config"),
        ("\u{feff}{}", "malformed config"),
        ("null", "malformed config"),
    ] {
        std::fs::write(&cfg_path, text).unwrap();
        expect_err(Weights::load(d.path()), needle, text);
    }
    std::fs::remove_file(&cfg_path).unwrap();
    expect_err(Weights::load(d.path()), "config.json", "missing config");
    std::fs::create_dir(&cfg_path).unwrap();
    expect_err(Weights::load(d.path()), "config.json", "config dir");
    expect_err(
        Weights::load(&d.path().join("diffusion_pytorch_model.safetensors")),
        "not a directory",
        "model is a file",
    );
}

/// Every tensor of the golden model.
fn golden_weights() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let f =
        TensorFile::open(&golden_dir().join("model/diffusion_pytorch_model.safetensors")).unwrap();
    f.tensors()
        .iter()
        .map(|(k, i)| (k.clone(), (i.shape.clone(), f.convert(i))))
        .collect()
}

fn write_weights(path: &Path, m: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
    let ts: Vec<(&str, Vec<usize>, &[f32])> = m
        .iter()
        .map(|(k, (s, v))| (k.as_str(), s.clone(), v.as_slice()))
        .collect();
    write_f32(path, &ts, &BTreeMap::new()).unwrap();
}

#[test]
fn model_weight_mutations() {
    let all = golden_weights();
    let names: Vec<String> = all.keys().cloned().collect();
    let d = model_copy();
    let wpath = d.path().join("diffusion_pytorch_model.safetensors");
    let mut rng = Rng::new(0x3E1_6475);
    for case in 0..60 {
        let mut m = all.clone();
        let name = pick(&mut rng, &names);
        let what = below(&mut rng, 5);
        let needle = match what {
            0 => {
                m.remove(&name);
                format!("missing tensor `{name}`")
            }
            1 => {
                // Same element count, another shape.
                let e = m.get_mut(&name).unwrap();
                let n = e.1.len();
                e.0 = vec![1, n];
                format!("`{name}` has shape [1, {n}]")
            }
            2 => {
                let e = m.get_mut(&name).unwrap();
                e.1.push(0.0);
                e.0 = vec![e.1.len()];
                format!("`{name}` has shape")
            }
            3 => {
                let e = m.get_mut(&name).unwrap();
                let i = below(&mut rng, e.1.len());
                e.1[i] = pick(&mut rng, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
                format!("`{name}` contains NaN or infinite")
            }
            _ => {
                // Renamed: missing under its own name, the stray name ignored.
                let v = m.remove(&name).unwrap();
                m.insert(format!("{name}.x"), v);
                format!("missing tensor `{name}`")
            }
        };
        write_weights(&wpath, &m);
        let c = format!("weights {case}");
        expect_err(no_panic(&c, || Weights::load(d.path())), &needle, &c);
    }
    // Mixed dtypes: one tensor stored as BF16.
    let mut m = all.clone();
    let (shape, vals) = m.remove("head.head.bias").unwrap();
    write_weights(&wpath, &m);
    std::fs::write(
        d.path().join("extra.safetensors"),
        one_tensor("head.head.bias", "BF16", &shape, &vals),
    )
    .unwrap();
    expect_err(Weights::load(d.path()), "mixed dtypes", "mixed");
    // The same tensor in two files.
    std::fs::write(
        d.path().join("extra.safetensors"),
        one_tensor("head.modulation", "F32", &[1, 2, 64], &[0.0; 128]),
    )
    .unwrap();
    write_weights(&wpath, &all);
    expect_err(Weights::load(d.path()), "is in both", "duplicate");
    std::fs::remove_file(d.path().join("extra.safetensors")).unwrap();
    // No weights at all.
    std::fs::remove_file(&wpath).unwrap();
    expect_err(Weights::load(d.path()), "no *.safetensors", "none");
}

#[test]
fn model_index_mutations() {
    let d = model_copy();
    let idx = d.path().join("model.safetensors.index.json");
    let good = "diffusion_pytorch_model.safetensors";
    std::fs::create_dir(d.path().join("sub")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(
        d.path().join(good),
        outside.path().join("stolen.safetensors"),
    )
    .unwrap();
    let abs = outside
        .path()
        .join("stolen.safetensors")
        .display()
        .to_string();
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (serde_json::json!({"weight_map": {"dim": good}}), ""),
        (
            serde_json::json!({"weight_map": {"a": "missing.safetensors"}}),
            "missing.safetensors",
        ),
        (
            serde_json::json!({"weight_map": {"a": "../stolen.safetensors"}}),
            "plain file name",
        ),
        (
            serde_json::json!({"weight_map": {"a": abs}}),
            "plain file name",
        ),
        (
            serde_json::json!({"weight_map": {"a": ""}}),
            "plain file name",
        ),
        (
            serde_json::json!({"weight_map": {"a": "."}}),
            "plain file name",
        ),
        (
            serde_json::json!({"weight_map": {"a": "sub/x.safetensors"}}),
            "plain file name",
        ),
        (
            serde_json::json!({"weight_map": {"a": "sub"}}),
            "not a regular file",
        ),
        (serde_json::json!({"weight_map": {"a": 5}}), "file names"),
        (serde_json::json!({"weight_map": {"a": null}}), "file names"),
        (serde_json::json!({"weight_map": []}), "weight_map"),
        (serde_json::json!({"weight_map": "x"}), "weight_map"),
        (serde_json::json!({}), "weight_map"),
        (serde_json::json!([]), "weight_map"),
        (serde_json::json!({"weight_map": {}}), "missing tensor"),
    ];
    for (i, (v, needle)) in cases.iter().enumerate() {
        std::fs::write(&idx, v.to_string()).unwrap();
        let c = format!("index {i}: {v}");
        let r = no_panic(&c, || Weights::load(d.path()));
        if needle.is_empty() {
            r.unwrap_or_else(|e| panic!("{c}: {e}"));
        } else {
            expect_err(r, needle, &c);
        }
    }
    std::fs::write(&idx, "{ not json").unwrap();
    expect_err(Weights::load(d.path()), "malformed index", "bad json");
    std::fs::remove_file(&idx).unwrap();
    std::fs::create_dir(&idx).unwrap();
    expect_err(Weights::load(d.path()), "index.json", "index dir");
}

/// Header of a sparse safetensors file that declares every weight of `cfg` as BF16.
fn sparse_model(dir: &Path, cfg: &ModelConfig) -> std::io::Result<()> {
    let mut h = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape) in blockcascade::config::weight_shapes(cfg) {
        let n = 2 * shape.iter().product::<usize>();
        h.insert(
            name,
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let h = serde_json::to_vec(&h).unwrap();
    let f = std::fs::File::create(dir.join("model.safetensors"))?;
    use std::io::Write;
    (&f).write_all(&(h.len() as u64).to_le_bytes())?;
    (&f).write_all(&h)?;
    f.set_len((8 + h.len() + off) as u64)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string(cfg).unwrap())
}

#[test]
fn models_and_inputs_too_large_for_memory_are_clean_errors() {
    // A valid 4.4 TB (f32) model as a sparse file: refused before anything is converted.
    let mut cfg = builtin_config("tiny").unwrap();
    (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers) = (16384, 65536, 128, 1024);
    let d = tempfile::tempdir().unwrap();
    match sparse_model(d.path(), &cfg) {
        Ok(()) => match Weights::load(d.path()) {
            Err(Error::OutOfMemory(m)) => assert!(m.contains("f32 weights"), "{m}"),
            // Where the address space is limited (ulimit -v), mapping the file already fails.
            Err(e @ Error::Io { .. }) => eprintln!("huge model: {e}"),
            r => panic!("huge model: {:?}", r.map(|_| ())),
        },
        Err(e) => eprintln!("no sparse file here ({e}); huge model case skipped"),
    }
    // A prompt with 2^32 rows (sparse): refused by its row count, not converted.
    let cfgt = builtin_config("tiny").unwrap();
    let p = d.path().join("prompt.safetensors");
    let rows = 1usize << 32;
    let h = serde_json::json!({"prompt_embeds": {"dtype": "F32", "shape": [rows, 32], "data_offsets": [0, rows * 128]}});
    let hb = h.to_string();
    let mut bytes = (hb.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(hb.as_bytes());
    std::fs::write(&p, &bytes).unwrap();
    if std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .and_then(|f| f.set_len((bytes.len() + rows * 128) as u64))
        .is_ok()
    {
        expect_err(PromptEmbeds::load(&p, &cfgt), "text_len", "huge prompt");
        // Noise of 2^28 frames of 16x8x8 (sparse 1 TB): refused by the memory check.
        let frames = 1usize << 28;
        let n = frames * 16 * 64 * 4;
        let h = serde_json::json!({"noise": {"dtype": "F32", "shape": [frames, 16, 8, 8], "data_offsets": [0, n]},
            "renoise": {"dtype": "F32", "shape": [frames, 0, 16, 8, 8], "data_offsets": [n, n]}});
        let hb = h.to_string();
        let np = d.path().join("noise.safetensors");
        let mut bytes = (hb.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(hb.as_bytes());
        std::fs::write(&np, &bytes).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&np)
            .and_then(|f| f.set_len((bytes.len() + n) as u64))
            .unwrap();
        match RecordedNoise::load(&np, frames, 16, 8, 8, 1) {
            Err(Error::OutOfMemory(m)) => assert!(m.contains("`noise`"), "{m}"),
            Err(e @ Error::Io { .. }) => eprintln!("huge noise: {e}"),
            r => panic!("huge noise: {:?}", r.map(|_| ())),
        }
    }
}
