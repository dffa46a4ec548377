//! A bounded mutation fuzzer for the header check and family detection, run on every CI build:
//! thousands of corrupted variants of real checkpoint headers must each give `Ok` or a clear
//! error — never a panic, a hang or a crash. (Deterministic: a fixed xorshift seed.)

mod common;

use std::time::{Duration, Instant};

use easel_engine::models::inspect_model;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A small but complete checkpoint: the header of a real single file with its data cut down
/// to what the header describes is too big to mutate quickly, so take the header region of the
/// real file plus a short tail (most mutations then also exercise the truncation checks).
fn seeds(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let full = std::fs::read(common::unpack_single_file("sd1-single", dir)).unwrap();
    let header_len = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let mut seeds = vec![full[..(8 + header_len + 4096).min(full.len())].to_vec()];
    // Complete small files with checkpoint key sets, so mutations reach family detection too.
    for name in [
        "lora.safetensors",
        "controlnet.safetensors",
        "unsupported-sd3.safetensors",
        "vae-only.safetensors",
        "unet-incomplete.safetensors",
        "missing-unet.safetensors",
        "unsupported-in-channels-8.safetensors",
        "unsupported-sdxl-refiner.safetensors",
    ] {
        seeds.push(std::fs::read(common::fixtures().join("bad").join(name)).unwrap());
    }
    seeds
}

#[test]
fn corrupted_headers_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = seeds(dir.path());
    let mut rng = XorShift(0x5EED_1234_ABCD_0001);
    let path = dir.path().join("fuzzed.safetensors");
    let started = Instant::now();
    let mut cases = 0;
    while cases < 1500 && started.elapsed() < Duration::from_secs(60) {
        let mut bytes = seeds[rng.below(seeds.len())].clone();
        let header_end = (8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize).min(bytes.len());
        match rng.below(5) {
            // Flip bytes, mostly inside the header where the parser works.
            0 | 1 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(header_end);
                    bytes[i] = rng.next() as u8;
                }
            }
            // Replace a digit in the header (shapes, offsets) with another digit.
            2 => {
                let digits: Vec<usize> = (8..header_end).filter(|&i| bytes[i].is_ascii_digit()).collect();
                if !digits.is_empty() {
                    let i = digits[rng.below(digits.len())];
                    bytes[i] = b'0' + rng.below(10) as u8;
                }
            }
            // Truncate anywhere.
            3 => bytes.truncate(rng.below(bytes.len())),
            // Overwrite the header length.
            _ => bytes[..8].copy_from_slice(&rng.next().to_le_bytes()),
        }
        std::fs::write(&path, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| inspect_model(&path).map(|_| ()).map_err(|e| e.to_string()));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(message)) => assert!(!message.is_empty()),
            Err(_) => panic!("inspect_model panicked on case {cases}; the input is at {}", path.display()),
        }
        cases += 1;
    }
    assert!(cases >= 200, "only {cases} cases ran");
}
