//! The device decoder (`decode::CudaDecoder`: the decoder kernels of `cuda/conv.cu` and
//! `cuda/decode_ops.cu` on the backend's device abstraction) on the emulated device, against
//! upstream's golden output and the CPU decoder: whole video and block by block, RGB8 bytes
//! against `Video::to_rgb8` of the device's own f32 frames.

use blockcascade::backend::cuda::device::Gpu;
use blockcascade::bench::rel_l2;
use blockcascade::decode::{CudaDecoder, Decoder, DecoderKind};
use blockcascade::tensorfile::TensorFile;
use blockcascade::video::to_rgb8;
use std::path::Path;

fn tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = TensorFile::open(path).unwrap();
    let shape = f.tensors()[name].shape.clone();
    (shape, f.tensor_f32(name, None).unwrap())
}

#[test]
fn taehv_on_the_emulated_device_matches_pytorch_whole_and_streamed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/decode/taehv-tiny");
    let (ls, latents) = tensor(&dir.join("latents.safetensors"), "latents");
    let (shape, expected) = tensor(&dir.join("expected.safetensors"), "video");
    let (f, h, w) = (ls[0], ls[2], ls[3]);
    let dec = Decoder::load(&dir.join("taehv/model.safetensors"), None).unwrap();
    let mut dev = CudaDecoder::new(&dec, Gpu::open_emulated().unwrap()).unwrap();

    dev.begin(h, w).unwrap();
    let whole = dev.push(&latents, f, true).unwrap();
    assert_eq!(vec![whole.frames, 3, whole.height, whole.width], shape);
    let px = whole.f32.clone().unwrap();
    let err = rel_l2(&expected, &px);
    println!("device TAEHV whole vs PyTorch: rel L2 {err:.3e}");
    assert!(err < 2e-2, "rel L2 {err}");
    let cpu = dec.decode(&latents, f, h, w).unwrap();
    println!("device TAEHV vs CPU: rel L2 {:.3e}", rel_l2(&cpu.data, &px));
    assert_eq!(
        whole.rgb,
        to_rgb8(&px, whole.frames, whole.height, whole.width)
    );

    // Block by block (3 + 3, then 1 at a time): the carried device memories give the same
    // frames, bit for bit (the same launches per frame); the pool stops growing.
    let per = 16 * h * w;
    let grown = dev.activation_bytes();
    for block in [3, 1] {
        dev.begin(h, w).unwrap();
        let (mut rgb, mut fr) = (Vec::new(), Vec::new());
        for b in latents.chunks(block * per) {
            let out = dev.push(b, b.len() / per, true).unwrap();
            rgb.extend(out.rgb);
            fr.extend(out.f32.unwrap());
        }
        assert!(fr == px, "blocks of {block} differ from the whole decode");
        assert_eq!(rgb, whole.rgb);
    }
    assert_eq!(
        dev.activation_bytes(),
        grown,
        "device memory grew over streams"
    );

    // RGB8 only.
    dev.begin(h, w).unwrap();
    let only = dev.push(&latents, f, false).unwrap();
    assert!(only.f32.is_none());
    assert_eq!(only.rgb, whole.rgb);
}

#[test]
fn device_decoder_errors_are_clear() {
    let wan = Decoder::synthetic(DecoderKind::WanVae, 2, 1);
    let e = CudaDecoder::new(&wan, Gpu::open_emulated().unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("wan") && e.contains("CPU"), "{e}");
    let tae = Decoder::tiny_taehv(3);
    let mut dev = CudaDecoder::new(&tae, Gpu::open_emulated().unwrap()).unwrap();
    assert!(dev.push(&[0.0; 16], 1, false).is_err(), "push before begin");
    assert!(dev.begin(0, 4).is_err());
    dev.begin(2, 2).unwrap();
    let e = dev.push(&[0.0; 10], 1, false).unwrap_err().to_string();
    assert!(e.contains("need 64"), "{e}");
    let mut z = vec![0.0; 64];
    z[5] = f32::NAN;
    assert!(dev.push(&z, 1, false).is_err());
}
