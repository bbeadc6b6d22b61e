//! The fuzz target's function (`protocol::fuzz_request`) over a few thousand
//! generated inputs on stable Rust: random bytes, and mutations of valid
//! requests so the validation behind the JSON parser is reached too.

use lsvfs_keyserver::protocol::{fuzz_request, Challenge, KekVersion, Op, SignedRequest, VolumeId};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let mut out = vec![];
    for (i, op) in Op::ALL.into_iter().enumerate() {
        let ck = if op.releases_key() { [9; 32] } else { [0; 32] };
        let req = SignedRequest::sign(
            op,
            &key,
            VolumeId([1; 16]),
            KekVersion(1),
            Challenge([2; 32]),
            ck,
        );
        let mut bytes = vec![i as u8 + 1];
        bytes.extend(serde_json::to_vec(&req.to_body()).unwrap());
        out.push(bytes);
    }
    let mut ch = vec![0u8];
    ch.extend(format!(r#"{{"host":"{}"}}"#, "ab".repeat(32)).as_bytes());
    out.push(ch);
    out
}

#[test]
fn fuzz_request_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds = seeds();
    // The seeds themselves must be accepted, or the mutations test nothing.
    for s in &seeds {
        fuzz_request(s);
    }
    for _ in 0..4000 {
        let input: Vec<u8> = if rng.below(4) == 0 {
            (0..rng.below(300)).map(|_| rng.next() as u8).collect()
        } else {
            let mut s = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(s.len());
                match rng.below(4) {
                    0 => s[at] = rng.next() as u8,
                    1 => {
                        s.remove(at);
                    }
                    2 => s.insert(at, b"0af\"{}[],:-e9 "[rng.below(14)]),
                    _ => s.truncate(at),
                }
                if s.is_empty() {
                    break;
                }
            }
            s
        };
        fuzz_request(&input);
    }
}
