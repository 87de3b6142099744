//! Safetensors files: byte flips, truncations, header mutations and random headers.

use super::*;

#[test]
fn safetensors_byte_flips_and_truncations() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_file(dir.path());
    let p = dir.path().join("mutated.safetensors");
    let f = open_checked(&p, &good, "valid").unwrap();
    assert_eq!(f.tensor_f32("beta", None).unwrap()[1], -2.0);
    assert_eq!(f.metadata()["k"], "v");
    let hlen = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    // Random flips of 1..=3 bytes in the length and the header.
    let mut rng = Rng::new(0xF1_1F);
    let mut opened = 0;
    for case in 0..400 {
        let mut b = good.clone();
        for _ in 0..1 + below(&mut rng, 3) {
            let at = below(&mut rng, 8 + hlen);
            b[at] ^= 1 + below(&mut rng, 255) as u8;
        }
        opened += open_checked(&p, &b, &format!("flip {case}")).is_ok() as usize;
    }
    // Most flips break the header; some (in a name, in the padding) legitimately do not.
    assert!(opened < 200, "{opened} of 400 flipped headers opened");
    // Truncation at every offset.
    for cut in 0..good.len() {
        let r = open_checked(&p, &good[..cut], &format!("cut at {cut}"));
        assert!(r.is_err(), "truncated at {cut} of {} opened", good.len());
    }
    // The 8-byte length: huge, zero, just past the file, one short.
    let total = good.len() as u64;
    for (n, needle) in [
        (u64::MAX, "exceeds the file size"),
        (1 << 63, "exceeds the file size"),
        ((100 << 20) + 1, "exceeds the file size"),
        (total - 7, "exceeds the file size"),
        (0, "header JSON"),
        (hlen as u64 - 1, "header JSON"),
        (2, "header JSON"),
    ] {
        let mut b = good.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        expect_err(open_checked(&p, &b, "len"), needle, &format!("length {n}"));
    }
    // Empty files, directories and FIFOs.
    expect_err(open_checked(&p, &[], "empty"), "too short", "empty");
    expect_err(TensorFile::open(dir.path()), "not a regular file", "dir");
    let fifo = dir.path().join("fifo.safetensors");
    if Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        // Opening a FIFO for reading would block until a writer comes: refused up front.
        expect_err(TensorFile::open(&fifo), "not a regular file", "fifo");
    }
    expect_err(
        TensorFile::open(&dir.path().join("missing.safetensors")),
        "missing.safetensors",
        "missing",
    );
}

#[test]
fn safetensors_header_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.safetensors");
    let data = f32_bytes(&[0.5; 10]); // 40 bytes
    let ok = r#""a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}"#;
    let t = |dtype: &str, shape: &str, off: &str| {
        format!(r#"{{"a":{{"dtype":{dtype},"shape":{shape},"data_offsets":{off}}}}}"#)
    };
    let big = format!("[{}]", u64::MAX);
    let cases: Vec<(String, &str)> = vec![
        (t(r#""f32""#, "[2,3]", "[0,24]"), "unsupported dtype f32"),
        (t(r#""I64""#, "[2,3]", "[0,48]"), "unsupported dtype I64"),
        (t(r#""F64""#, "[2,3]", "[0,48]"), "unsupported dtype F64"),
        (t("5", "[2,3]", "[0,24]"), "unsupported dtype 5"),
        (t("null", "[2,3]", "[0,24]"), "unsupported dtype null"),
        (t(r#""F32""#, "[-2,3]", "[0,24]"), "no valid shape"),
        (t(r#""F32""#, "[2.0,3]", "[0,24]"), "no valid shape"),
        (t(r#""F32""#, r#""2,3""#, "[0,24]"), "no valid shape"),
        (t(r#""F32""#, r#"["2",3]"#, "[0,24]"), "no valid shape"),
        (t(r#""F32""#, "null", "[0,24]"), "no valid shape"),
        (
            t(r#""F32""#, "[4611686018427387904,4]", "[0,24]"),
            "overflows",
        ),
        (t(r#""F32""#, &big, "[0,24]"), "overflows"),
        (
            t(
                r#""F32""#,
                "[0,4611686018427387904,4611686018427387904]",
                "[0,0]",
            ),
            "overflows",
        ),
        (t(r#""F32""#, "[2,3]", "[24,0]"), "reversed"),
        (t(r#""F32""#, "[2,3]", "[16,36]"), "holds 20 bytes"),
        (
            t(r#""F32""#, "[2,3]", "[24,48]"),
            "outside the 40 data bytes",
        ),
        (
            t(r#""F32""#, "[2,3]", &format!("[0,{}]", u64::MAX)),
            "outside",
        ),
        (t(r#""F32""#, "[2,3]", "[0,24,40]"), "no valid data_offsets"),
        (t(r#""F32""#, "[2,3]", "[0]"), "no valid data_offsets"),
        (
            t(r#""F32""#, "[2,3]", r#"["0","24"]"#),
            "no valid data_offsets",
        ),
        (
            t(r#""F32""#, "[2,3]", "[0.0,24.0]"),
            "no valid data_offsets",
        ),
        (t(r#""F32""#, "[2,3]", "[-24,0]"), "no valid data_offsets"),
        (t(r#""F32""#, "[2,3]", "null"), "no valid data_offsets"),
        (
            r#"{"a":{"shape":[2,3],"data_offsets":[0,24]}}"#.into(),
            "no dtype",
        ),
        (r#"{"a":5}"#.into(), "must be an object"),
        (r#"{"a":[1,2]}"#.into(), "must be an object"),
        (r#"{"a":"F32"}"#.into(), "must be an object"),
        (format!("{{{ok},{ok}}}"), "appears twice"),
        (
            format!(r#"{{{ok},"b":{{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}}}"#),
            "overlap",
        ),
        (
            format!(r#"{{{ok},"b":{{"dtype":"F16","shape":[2],"data_offsets":[20,24]}}}}"#),
            "overlap",
        ),
        (r#"[]"#.into(), "header JSON"),
        (r#""a""#.into(), "header JSON"),
        (r#"5"#.into(), "header JSON"),
        (r#"null"#.into(), "header JSON"),
        (r#"{"a":"#.into(), "header JSON"),
        (format!("{{{ok}}}xyz"), "header JSON"),
        (
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
            "header JSON",
        ),
        (
            format!(
                r#"{{"a":{{"x":{}1{}}}}}"#,
                "[".repeat(5000),
                "]".repeat(5000)
            ),
            "header JSON",
        ),
        (format!(r#"{{"__metadata__":5,{ok}}}"#), "__metadata__"),
        (format!(r#"{{"__metadata__":[],{ok}}}"#), "__metadata__"),
        (
            format!(r#"{{"__metadata__":{{"k":5}},{ok}}}"#),
            "__metadata__",
        ),
        (
            format!(r#"{{"__metadata__":{{}},"__metadata__":{{}},{ok}}}"#),
            "__metadata__",
        ),
    ];
    for (i, (h, needle)) in cases.iter().enumerate() {
        let r = open_checked(&p, &raw_file(h.as_bytes(), &data), &format!("json {i}"));
        expect_err(r, needle, &format!("json {i}: {}", &h[..h.len().min(120)]));
    }
    // Invalid UTF-8 in a name and in the padding.
    let mut h = format!("{{{ok}}}").into_bytes();
    h[2] = 0xFF;
    expect_err(
        open_checked(&p, &raw_file(&h, &data), "utf8"),
        "header JSON",
        "utf8",
    );
    let mut h = format!("{{{ok}}}  ").into_bytes();
    let n = h.len();
    h[n - 1] = 0xC3;
    expect_err(
        open_checked(&p, &raw_file(&h, &data), "utf8 pad"),
        "header JSON",
        "utf8 pad",
    );
    // Still valid: a scalar, a zero-sized tensor, gaps, unknown fields, empty header.
    for (i, h) in [
        r#"{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"BF16","shape":[0,7],"data_offsets":[4,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[36,40]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":true},"__metadata__":{"format":"pt"}}"#,
        r#"{}"#,
        r#"  {}  "#,
    ]
    .iter()
    .enumerate()
    {
        open_checked(&p, &raw_file(h.as_bytes(), &data), &format!("valid {i}"))
            .unwrap_or_else(|e| panic!("valid header {i} `{h}` refused: {e}"));
    }
}

/// Random headers assembled from interesting pieces: whatever opens passes every invariant.
#[test]
fn safetensors_random_headers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.safetensors");
    let mut rng = Rng::new(0x5AFE_7E45);
    let names = ["a", "b", "a", "__metadata__", "", "é", "a\\u0000b"];
    let dtypes = [
        r#""F32""#,
        r#""BF16""#,
        r#""F16""#,
        r#""f16""#,
        r#""I8""#,
        "7",
        "null",
        "[]",
    ];
    let dims = [
        "0",
        "1",
        "2",
        "3",
        "7",
        "-1",
        "1.5",
        r#""2""#,
        "4294967296",
        "4611686018427387904",
        "18446744073709551615",
        "18446744073709551616",
    ];
    let offs = [
        "0",
        "4",
        "8",
        "12",
        "16",
        "24",
        "64",
        "65",
        "-4",
        "2.5",
        "18446744073709551615",
        "1e3",
    ];
    let mut opened = 0;
    for case in 0..500 {
        let mut entries = Vec::new();
        for _ in 0..below(&mut rng, 4) {
            let name = pick(&mut rng, &names);
            let shape: Vec<&str> = (0..below(&mut rng, 4))
                .map(|_| pick(&mut rng, &dims))
                .collect();
            let (o1, o2) = if below(&mut rng, 2) == 0 {
                // Consistent offsets for the shape (when numeric), so that some cases open.
                let n: Option<u64> = shape
                    .iter()
                    .map(|d| d.parse::<u64>().ok())
                    .try_fold(1u64, |a, b| b.and_then(|b| a.checked_mul(b)));
                let start = 4 * below(&mut rng, 8) as u64;
                let len = n.and_then(|n| n.checked_mul(2 + 2 * below(&mut rng, 2) as u64));
                (
                    start.to_string(),
                    len.and_then(|l| l.checked_add(start))
                        .map_or("0".to_string(), |e| e.to_string()),
                )
            } else {
                (
                    pick(&mut rng, &offs).to_string(),
                    pick(&mut rng, &offs).to_string(),
                )
            };
            let mut off = vec![o1, o2];
            if below(&mut rng, 10) == 0 {
                off.push("8".into());
            }
            entries.push(format!(
                r#""{name}":{{"dtype":{},"shape":[{}],"data_offsets":[{}]}}"#,
                pick(&mut rng, &dtypes),
                shape.join(","),
                off.join(",")
            ));
        }
        let h = format!("{{{}}}", entries.join(","));
        let data = vec![0x3Cu8; below(&mut rng, 80)];
        let r = open_checked(
            &p,
            &raw_file(h.as_bytes(), &data),
            &format!("random {case}: {h}"),
        );
        if let Ok(f) = r {
            opened += 1;
            for t in f.tensors().values() {
                let bytes = t.shape.iter().product::<usize>() * t.dtype.size();
                assert!(bytes <= data.len(), "{h}");
            }
        }
    }
    assert!(
        opened > 20,
        "only {opened} random headers opened: the fuzzer is too harsh"
    );
}

/// A name may appear once, also where one of its entries is an `I64` tensor that
/// `open_skipping_ids` leaves out (it used to keep the other entry without a word).
#[test]
fn duplicates_with_a_skipped_id_tensor_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("twice.safetensors");
    let f32e = r#""prompt_embeds": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}"#;
    let i64e = r#""prompt_embeds": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}"#;
    for h in [format!("{{{f32e}, {i64e}}}"), format!("{{{i64e}, {f32e}}}")] {
        std::fs::write(&p, raw_file(h.as_bytes(), &[0u8; 16])).unwrap();
        let e = no_panic(&h, || TensorFile::open_skipping_ids(&p)).err();
        let m = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(m.contains("appears twice"), "{h}: {m}");
    }
}
