//! k-of-n key custody: a volume's master key split into Shamir shares over
//! GF(2^8) (the `vsss-rs` crate), one per key server, so that any
//! `threshold` of the servers' KEKs open it and fewer learn nothing about
//! it. Each share is wrapped under its server's KEK and kept in the host's
//! sealed store; the header's key-check value tells a wrong combination
//! apart (docs/PROTOCOL.md, "k of n key servers").

use vsss_rs::{Gf256, IdentifierGf256};
use zeroize::Zeroizing;

use crate::crypto::{MasterKey, KEY_LEN};
use crate::keys::{KeysError, Result};

/// One share: the x coordinate (1..=255) and the 32 y bytes.
pub struct KeyShare {
    pub x: u8,
    pub y: Zeroizing<[u8; KEY_LEN]>,
}

/// Splits `master` into `n` shares (x = 1..=n), any `k` of which rebuild it.
pub fn split(master: &MasterKey, k: usize, n: usize) -> Result<Vec<KeyShare>> {
    if !(2..=n).contains(&k) || n > 255 {
        return Err(KeysError::Invalid(format!(
            "a threshold of {k} out of {n} key servers: it must be at least 2 and at most {n}"
        )));
    }
    let ids = (1..=n as u8).map(|x| IdentifierGf256(Gf256(x)));
    let rng = getrandom::rand_core::UnwrapErr(getrandom::SysRng);
    let shares = Gf256::split_bytes_with_participant_ids_iter(k, n, master.expose(), rng, ids)
        .map_err(|e| KeysError::Invalid(format!("splitting the volume key: {e:?}")))?;
    // Every share under Zeroizing before anything can return early.
    let shares: Vec<Zeroizing<Vec<u8>>> = shares.into_iter().map(Zeroizing::new).collect();
    shares
        .iter()
        .map(|s| {
            let mut y = Zeroizing::new([0u8; KEY_LEN]);
            if s.len() != KEY_LEN + 1 {
                return Err(KeysError::Invalid("a key share of the wrong length".into()));
            }
            y.copy_from_slice(&s[1..]);
            Ok(KeyShare { x: s[0], y })
        })
        .collect()
}

/// Rebuilds the key from shares with distinct, non-zero x. With fewer
/// shares than the threshold the result is some other key: the caller
/// checks it against the header's key-check value.
pub fn combine(shares: &[KeyShare]) -> Result<MasterKey> {
    let raw: Vec<Vec<u8>> = shares
        .iter()
        .map(|s| {
            let mut v = Vec::with_capacity(KEY_LEN + 1);
            v.push(s.x);
            v.extend_from_slice(&s.y[..]);
            v
        })
        .collect();
    let raw = Zeroizing::new(raw);
    let key = Gf256::combine_bytes(&raw[..])
        .map(Zeroizing::new)
        .map_err(|e| KeysError::Invalid(format!("combining key shares: {e:?}")))?;
    MasterKey::from_slice(&key).map_err(KeysError::Crypto)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(all: &[KeyShare], which: &[usize]) -> Vec<KeyShare> {
        which
            .iter()
            .map(|&i| KeyShare {
                x: all[i].x,
                y: all[i].y.clone(),
            })
            .collect()
    }

    #[test]
    fn any_k_shares_rebuild_the_key_and_fewer_do_not() {
        let m = MasterKey::generate().unwrap();
        let all = split(&m, 2, 3).unwrap();
        assert_eq!(all.iter().map(|s| s.x).collect::<Vec<_>>(), [1, 2, 3]);
        for pair in [[0, 1], [0, 2], [1, 2], [2, 0]] {
            let got = combine(&pick(&all, &pair)).unwrap();
            assert_eq!(got.expose(), m.expose(), "{pair:?}");
        }
        for i in 0..3 {
            assert_ne!(all[i].y[..], m.expose()[..], "a share is not the key");
            if let Ok(one) = combine(&pick(&all, &[i])) {
                assert_ne!(one.expose(), m.expose(), "one share alone");
            }
        }
        // 3 of 5: any two are not enough.
        let all = split(&m, 3, 5).unwrap();
        let got = combine(&pick(&all, &[4, 1, 3])).unwrap();
        assert_eq!(got.expose(), m.expose());
        let two = combine(&pick(&all, &[4, 1])).unwrap();
        assert_ne!(two.expose(), m.expose());
    }

    #[test]
    fn a_threshold_below_two_or_above_n_is_refused() {
        let m = MasterKey::generate().unwrap();
        for (k, n) in [(1, 3), (0, 3), (4, 3)] {
            let e = split(&m, k, n).err().expect("refused").to_string();
            assert!(e.contains("threshold"), "{e}");
        }
    }

    #[test]
    fn two_splits_of_one_key_differ() {
        let m = MasterKey::generate().unwrap();
        let (a, b) = (split(&m, 2, 3).unwrap(), split(&m, 2, 3).unwrap());
        assert_ne!(a[0].y[..], b[0].y[..], "fresh random coefficients");
    }
}
