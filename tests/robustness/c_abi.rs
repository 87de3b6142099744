//! The C ABI: session options, prompts, noise, callbacks, closed sessions, engine inputs.

use super::*;

unsafe extern "C" fn count_blocks(
    user: *mut c_void,
    _block: u32,
    latents: *const f32,
    frames: u32,
    channels: u32,
    height: u32,
    width: u32,
) -> i32 {
    let n = (frames * channels * height * width) as usize;
    let v = std::slice::from_raw_parts(latents, n);
    let finite = v.iter().all(|x| x.is_finite());
    let st = &mut *(user as *mut (u32, bool));
    st.0 += 1;
    st.1 &= finite;
    0
}

unsafe extern "C" fn returns_user_value(
    user: *mut c_void,
    _block: u32,
    _latents: *const f32,
    _frames: u32,
    _channels: u32,
    _height: u32,
    _width: u32,
) -> i32 {
    let st = &mut *(user as *mut (i32, u32));
    st.1 += 1;
    st.0
}

#[test]
fn c_abi_session_option_fuzz() {
    let e = cpu_engine();
    let mut rng = Rng::new(0xC_AB1);
    let u = [
        0u32,
        1,
        2,
        3,
        4,
        5,
        6,
        8,
        12,
        16,
        16384,
        16385,
        1 << 31,
        u32::MAX,
    ];
    let i = [i32::MIN, -2, -1, 0, 1, 2, 3, 6, 9, i32::MAX];
    let mut opened = 0;
    for case in 0..300 {
        let d = bc_session_options_default();
        let mut o = d;
        for _ in 0..1 + below(&mut rng, 2) {
            match below(&mut rng, 8) {
                0 => o.height = pick(&mut rng, &u),
                1 => o.width = pick(&mut rng, &u),
                2 => o.block_frames = pick(&mut rng, &u),
                3 => o.lag = pick(&mut rng, &u),
                4 => o.bidirectional = pick(&mut rng, &u),
                5 => o.local_attn = pick(&mut rng, &i),
                6 => o.sink = pick(&mut rng, &u),
                _ => o.seed = rng.next_u64(),
            }
        }
        let mut s = null_mut();
        let st = unsafe { bc_session_open(e, &o, &mut s) };
        let c = format!(
            "session {case}: {}x{} bf {} lag {} bi {} local {} sink {}",
            o.height, o.width, o.block_frames, o.lag, o.bidirectional, o.local_attn, o.sink
        );
        if st != BC_OK {
            assert!(s.is_null(), "{c}: out written on failure");
            assert!(
                st == BC_ERR_INVALID_ARGUMENT || st == BC_ERR_OUT_OF_MEMORY,
                "{c}: status {st}: {}",
                last_error()
            );
            assert!(last_error().starts_with("bc_session_open: "), "{c}");
            continue;
        }
        opened += 1;
        if o.height * o.width <= 256 && o.block_frames <= 6 {
            let mut state = (0u32, true);
            let st = unsafe {
                bc_session_generate(
                    s,
                    2,
                    Some(count_blocks),
                    &mut state as *mut (u32, bool) as *mut c_void,
                )
            };
            assert_eq!(st, BC_OK, "{c}: {}", last_error());
            assert_eq!(state, (2, true), "{c}");
        }
        bc_session_close(s);
    }
    assert!(opened > 30, "{opened}");
    bc_engine_close(e);
}

#[test]
fn c_abi_prompts_noise_callbacks_and_closed_sessions() {
    let e = cpu_engine();
    let mut s = null_mut();
    assert_eq!(unsafe { bc_session_open(e, null(), &mut s) }, BC_OK);
    let mut rng = Rng::new(0x9_0E);
    // Random prompt shapes and poisoned values.
    for case in 0..200 {
        let rows = pick(&mut rng, &[0u32, 1, 2, 15, 16, 17, 1000]);
        let cols = pick(&mut rng, &[0u32, 1, 31, 32, 33]);
        let n = (rows * cols) as usize;
        let mut v = vec![0.125f32; n.max(1)];
        let poison = below(&mut rng, 3);
        if poison > 0 && n > 0 {
            v[below(&mut rng, n)] = pick(
                &mut rng,
                &[f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY],
            );
        }
        let st = if case % 2 == 0 {
            unsafe { bc_session_set_prompt(s, v.as_ptr(), rows, cols) }
        } else {
            unsafe {
                bc_session_switch_prompt(s, 1 + below(&mut rng, 3) as u32, v.as_ptr(), rows, cols)
            }
        };
        let valid = (1..=16).contains(&rows) && cols == 32 && (poison == 0 || n == 0);
        if valid {
            assert_eq!(st, BC_OK, "prompt {case} {rows}x{cols}: {}", last_error());
        } else {
            assert_eq!(
                st, BC_ERR_INVALID_ARGUMENT,
                "prompt {case} {rows}x{cols} poison {poison}"
            );
            let m = last_error();
            assert!(
                ["columns", "rows", "NaN"].iter().any(|k| m.contains(k)),
                "prompt {case}: {m}"
            );
        }
    }
    let good = vec![0.5f32; 64];
    assert_eq!(
        unsafe { bc_session_set_prompt(s, good.as_ptr(), 2, 32) },
        BC_OK
    );
    // Callbacks returning odd values: any non-zero stops after that block.
    for r in [1, -1, 2, i32::MIN, i32::MAX] {
        let mut state = (r, 0u32);
        let st = unsafe {
            bc_session_generate(
                s,
                3,
                Some(returns_user_value),
                &mut state as *mut (i32, u32) as *mut c_void,
            )
        };
        expect_c_err(st, BC_ERR_CANCELLED, &format!("returned {r} for block 0"));
        assert_eq!(state.1, 1, "callback calls after returning {r}");
    }
    // Huge block counts: a clean out-of-memory error before any callback.
    let mut state = (0i32, 0u32);
    let st = unsafe {
        bc_session_generate(
            s,
            u32::MAX,
            Some(returns_user_value),
            &mut state as *mut (i32, u32) as *mut c_void,
        )
    };
    expect_c_err(st, BC_ERR_OUT_OF_MEMORY, "MiB");
    assert_eq!(state.1, 0);
    // Noise files: missing, empty path, a directory, a FIFO, malformed, zero frames, NaN.
    let d = tempfile::tempdir().unwrap();
    let cs = |p: &Path| CString::new(p.display().to_string()).unwrap();
    let set_noise = |p: &CString| unsafe { bc_session_set_noise_file(s, p.as_ptr()) };
    expect_c_err(
        set_noise(&cs(&d.path().join("none.safetensors"))),
        BC_ERR_IO,
        "none.safetensors",
    );
    expect_c_err(
        set_noise(&CString::new("").unwrap()),
        BC_ERR_IO,
        "No such file",
    );
    expect_c_err(set_noise(&cs(d.path())), BC_ERR_IO, "not a regular file");
    let fifo = d.path().join("fifo");
    if Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        expect_c_err(set_noise(&cs(&fifo)), BC_ERR_IO, "not a regular file");
    }
    let garbage = d.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\xffxx").unwrap();
    expect_c_err(
        set_noise(&cs(&garbage)),
        BC_ERR_FORMAT,
        "exceeds the file size",
    );
    let zero = d.path().join("zero.safetensors");
    write_f32(
        &zero,
        &[
            ("noise", vec![0, 16, 8, 12], &[]),
            ("renoise", vec![0, 3, 16, 8, 12], &[]),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    expect_c_err(set_noise(&cs(&zero)), BC_ERR_FORMAT, "0 frames");
    let nan = d.path().join("nan.safetensors");
    let mut v = vec![0.0f32; 3 * 16 * 96];
    v[5] = f32::NAN;
    write_f32(
        &nan,
        &[
            ("noise", vec![3, 16, 8, 12], &v),
            ("renoise", vec![3, 3, 16, 8, 12], &vec![0.0; 9 * 16 * 96]),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    expect_c_err(set_noise(&cs(&nan)), BC_ERR_FORMAT, "NaN");
    let wrong = d.path().join("wrong.safetensors");
    write_f32(
        &wrong,
        &[("noise", vec![3, 16, 8, 10], &[0.0; 3 * 16 * 80])],
        &BTreeMap::new(),
    )
    .unwrap();
    expect_c_err(
        set_noise(&cs(&wrong)),
        BC_ERR_FORMAT,
        "expected [3, 16, 8, 12]",
    );
    // Valid 3-frame noise: one block works, two are refused before any compute.
    let ok = d.path().join("ok.safetensors");
    write_f32(
        &ok,
        &[
            ("noise", vec![3, 16, 8, 12], &vec![0.1; 3 * 16 * 96]),
            ("renoise", vec![3, 3, 16, 8, 12], &vec![0.0; 9 * 16 * 96]),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    assert_eq!(set_noise(&cs(&ok)), BC_OK, "{}", last_error());
    let mut state = (0u32, true);
    let gen = |n: u32, st: &mut (u32, bool)| unsafe {
        bc_session_generate(
            s,
            n,
            Some(count_blocks),
            st as *mut (u32, bool) as *mut c_void,
        )
    };
    expect_c_err(
        gen(2, &mut state),
        BC_ERR_INVALID_ARGUMENT,
        "recorded noise holds 3 frames",
    );
    assert_eq!(gen(1, &mut state), BC_OK, "{}", last_error());
    assert_eq!(state, (1, true));
    // Every function on a closed session, and closing twice.
    bc_session_close(s);
    bc_session_close(s);
    let mut stats: bc_session_stats = unsafe { std::mem::zeroed() };
    stats.struct_size = std::mem::size_of::<bc_session_stats>() as u32;
    let dead = "not a live bc_session";
    expect_c_err(
        unsafe { bc_session_last_stats(s, &mut stats) },
        BC_ERR_INVALID_ARGUMENT,
        dead,
    );
    expect_c_err(set_noise(&cs(&ok)), BC_ERR_INVALID_ARGUMENT, dead);
    expect_c_err(
        unsafe { bc_session_set_noise_file(s, null()) },
        BC_ERR_INVALID_ARGUMENT,
        dead,
    );
    expect_c_err(
        unsafe { bc_session_switch_prompt(s, 1, good.as_ptr(), 2, 32) },
        BC_ERR_INVALID_ARGUMENT,
        dead,
    );
    expect_c_err(gen(1, &mut state), BC_ERR_INVALID_ARGUMENT, dead);
    // A session handle where an engine is expected, and a closed engine.
    let mut info: bc_engine_info = unsafe { std::mem::zeroed() };
    info.struct_size = std::mem::size_of::<bc_engine_info>() as u32;
    let mut s2 = null_mut();
    assert_eq!(unsafe { bc_session_open(e, null(), &mut s2) }, BC_OK);
    expect_c_err(
        unsafe { bc_engine_get_info(s2 as *const bc_engine, &mut info) },
        BC_ERR_INVALID_ARGUMENT,
        "is a bc_session",
    );
    bc_engine_close(s2 as *mut bc_engine); // wrong kind: ignored
    assert_eq!(
        unsafe { bc_session_last_stats(s2, &mut stats) },
        BC_ERR_INVALID_ARGUMENT
    );
    assert!(last_error().contains("no generation"), "{}", last_error());
    bc_session_close(s2);
    bc_engine_close(e);
    bc_engine_close(e);
    expect_c_err(
        unsafe { bc_engine_get_info(e, &mut info) },
        BC_ERR_INVALID_ARGUMENT,
        "not a live bc_engine",
    );
}

#[test]
fn c_abi_engine_open_inputs() {
    let mut e = null_mut();
    let cpu = c"cpu";
    // Too many devices, negative and out-of-range ordinals.
    let many: Vec<i32> = (0..1000).collect();
    for (devs, needle) in [
        (&many[..], "at most 64"),
        (&[-1][..], ">= 0"),
        (&[i32::MIN][..], ">= 0"),
        (&[0, 5][..], "numbered 0..2"),
    ] {
        let o = bc_engine_options {
            backend: cpu.as_ptr(),
            devices: devs.as_ptr(),
            n_devices: devs.len() as u32,
            ..bc_engine_options_default()
        };
        expect_c_err(
            unsafe { bc_engine_open(null(), &o, &mut e) },
            BC_ERR_INVALID_ARGUMENT,
            needle,
        );
        assert!(e.is_null());
    }
    // Bad model directories through the C ABI: typed codes.
    let bad = model_copy();
    let mut c = golden_config();
    c["num_layers"] = serde_json::json!(0);
    std::fs::write(bad.path().join("config.json"), c.to_string()).unwrap();
    let o = bc_engine_options {
        backend: cpu.as_ptr(),
        ..bc_engine_options_default()
    };
    let path = |p: &Path| CString::new(p.display().to_string()).unwrap();
    expect_c_err(
        unsafe { bc_engine_open(path(bad.path()).as_ptr(), &o, &mut e) },
        BC_ERR_FORMAT,
        "num_layers",
    );
    let p = path(&PathBuf::from("/nonexistent/model"));
    expect_c_err(
        unsafe { bc_engine_open(p.as_ptr(), &o, &mut e) },
        BC_ERR_IO,
        "not found",
    );
    let p = CString::new("").unwrap();
    expect_c_err(
        unsafe { bc_engine_open(p.as_ptr(), &o, &mut e) },
        BC_ERR_IO,
        "not found",
    );
    // Invalid UTF-8 in the path: an I/O error, not a panic.
    let p = CString::new(vec![b'/', 0xff, 0xfe]).unwrap();
    expect_c_err(
        unsafe { bc_engine_open(p.as_ptr(), &o, &mut e) },
        BC_ERR_IO,
        "not found",
    );
    assert!(e.is_null());
    // The backend string is compared exactly.
    for b in [c"CPU", c"", c"cpu ", c"cuda\n"] {
        let o = bc_engine_options {
            backend: b.as_ptr(),
            ..bc_engine_options_default()
        };
        expect_c_err(
            unsafe { bc_engine_open(null(), &o, &mut e) },
            BC_ERR_INVALID_ARGUMENT,
            "unknown backend",
        );
    }
}
