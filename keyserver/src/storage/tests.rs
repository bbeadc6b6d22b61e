//! Storage tests through the public Store API, without the network.

use ed25519_dalek::SigningKey;

use super::*;
use crate::protocol::{open_kek, Recipient};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    store: Store,
}

fn fixture(master: &MasterKey) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let store = Store::open(&path, master).unwrap();
    Fixture {
        _dir: dir,
        path,
        store,
    }
}

async fn request(
    store: &Store,
    key: &SigningKey,
    op: Op,
    volume: VolumeId,
    version: u32,
) -> (SignedOutcome, Recipient, Challenge) {
    let host = HostId(key.verifying_key().to_bytes());
    let (challenge, _) = store
        .issue_challenge(host, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let r = Recipient::generate();
    let ck = if op.releases_key() {
        r.public()
    } else {
        [0; 32]
    };
    let req = SignedRequest::sign(op, key, volume, KekVersion(version), challenge, ck);
    let ok = req.verify();
    (store.signed(req, ok).await.unwrap(), r, challenge)
}

/// A host's signing key (from `seed`) and its id.
fn host(seed: u8) -> (SigningKey, HostId) {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let id = HostId(key.verifying_key().to_bytes());
    (key, id)
}

fn refusal(o: &SignedOutcome) -> Option<Refusal> {
    match o {
        SignedOutcome::Refused(r, _) => Some(*r),
        _ => None,
    }
}

#[test]
fn kek_is_never_stored_in_clear_and_wrong_master_key_is_refused() {
    let master = MasterKey::generate().unwrap();
    let f = fixture(&master);
    let key = SigningKey::from_bytes(&[3; 32]);
    let host = HostId(key.verifying_key().to_bytes());
    let vol = VolumeId([5; 16]);
    let kek = rt().block_on(async {
        f.store.enroll("h1".into(), host).await.unwrap().unwrap();
        let (o, r, ch) = request(&f.store, &key, Op::Register, vol, 1).await;
        let SignedOutcome::Released {
            kek, newest: None, ..
        } = o
        else {
            panic!("{o:?}")
        };
        open_kek(&r, &kek, host, ch, vol).unwrap()
    });
    let path = f.path.clone();
    drop(f.store);
    let bytes = std::fs::read(path.join(DB_FILE)).unwrap();
    assert!(!bytes.windows(32).any(|w| w == kek.as_slice()));
    assert_eq!(
        Store::open(&path, &MasterKey::generate().unwrap()).err(),
        Some(StorageError::WrongMasterKey)
    );
    Store::open(&path, &master).unwrap();
}

#[test]
fn challenge_rules_and_retirement() {
    let f = fixture(&MasterKey::generate().unwrap());
    let s = &f.store;
    let ((a, ha), (b, hb)) = (host(1), host(2));
    let vol = VolumeId([9; 16]);
    rt().block_on(async {
        // Not enrolled, then enrolled.
        let (o, ..) = request(s, &a, Op::Register, vol, 1).await;
        assert_eq!(refusal(&o), Some(Refusal::NotEnrolled));
        s.enroll("a".into(), ha).await.unwrap().unwrap();
        s.enroll("b".into(), hb).await.unwrap().unwrap();
        assert!(matches!(
            s.enroll("a".into(), HostId(SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes()))
                .await
                .unwrap(),
            Err(AdminRefusal::NameTaken(_))
        ));
        let (o, ..) = request(s, &a, Op::Register, vol, 1).await;
        assert_eq!(refusal(&o), None);
        let (o, ..) = request(s, &a, Op::Register, vol, 1).await;
        assert_eq!(refusal(&o), Some(Refusal::VolumeExists));
        let (o, ..) = request(s, &b, Op::Unlock, vol, 1).await;
        assert_eq!(refusal(&o), Some(Refusal::NotAuthorized));

        // Replay: the same signed request twice.
        let (challenge, _) = s
            .issue_challenge(ha, Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        let r = Recipient::generate();
        let req = SignedRequest::sign(Op::Unlock, &a, vol, KekVersion(1), challenge, r.public());
        let first = s.signed(req.clone(), true).await.unwrap();
        assert_eq!(refusal(&first), None);
        let again = s.signed(req.clone(), true).await.unwrap();
        assert_eq!(refusal(&again), Some(Refusal::ChallengeReplayed));
        // Someone else's challenge is unknown to b.
        let mut stolen = req;
        stolen.host = hb;
        assert_eq!(
            refusal(&s.signed(stolen, true).await.unwrap()),
            Some(Refusal::ChallengeExpired)
        );
        // Expired.
        let (challenge, _) = s.issue_challenge(ha, Duration::ZERO).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let req = SignedRequest::sign(Op::Unlock, &a, vol, KekVersion(1), challenge, r.public());
        assert_eq!(
            refusal(&s.signed(req, true).await.unwrap()),
            Some(Refusal::ChallengeExpired)
        );
        assert_eq!(s.purge_challenges().await.unwrap(), 0);

        // Rotation: b authorized at v1; a reports v2; v1 stays for b.
        s.authorize("b".into(), vol).await.unwrap().unwrap();
        assert_eq!(s.rotate_kek(vol).await.unwrap(), Ok(KekVersion(2)));
        let (o, ..) = request(s, &a, Op::Unlock, vol, 1).await;
        assert!(matches!(o, SignedOutcome::Released { newest: Some(ref n), .. } if n.version == KekVersion(2)));
        let (o, ..) = request(s, &a, Op::Rewrapped, vol, 2).await;
        assert!(matches!(o, SignedOutcome::Rewrapped { ref retired, .. } if retired.is_empty()), "{o:?}");
        assert_eq!(s.list_volumes().unwrap()[0].versions, vec![1, 2]);
        // b is revoked: it no longer holds v1 back.
        s.revoke("b".into()).await.unwrap().unwrap();
        assert_eq!(s.list_volumes().unwrap()[0].versions, vec![2]);
        let (o, ..) = request(s, &a, Op::Unlock, vol, 1).await;
        assert_eq!(refusal(&o), Some(Refusal::UnknownVersion));
        let (o, ..) = request(s, &b, Op::Unlock, vol, 2).await;
        assert_eq!(refusal(&o), Some(Refusal::Revoked));

        // Every decision is in the audit log.
        let log = s
            .audit(&AuditFilter {
                host: Some(hb),
                volume: None,
                limit: 100,
            })
            .unwrap();
        let last = log.last().unwrap();
        assert_eq!((last.action.as_str(), last.outcome.as_str()), ("unlock", "refused"));
        assert!(last.reason.starts_with("revoked"), "{last:?}");
    });
}

#[test]
fn low_order_client_key_is_refused_without_aborting() {
    let f = fixture(&MasterKey::generate().unwrap());
    let s = &f.store;
    let a = SigningKey::from_bytes(&[1; 32]);
    let ha = HostId(a.verifying_key().to_bytes());
    rt().block_on(async {
        s.enroll("a".into(), ha).await.unwrap().unwrap();
        // Order 2 point (u = 1) in Montgomery form... the all-ones pattern
        // below is the point u = 0 with the high bit set, also low order.
        let mut low = [0u8; 32];
        low[31] = 0x80;
        let (challenge, _) = s
            .issue_challenge(ha, Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        let req = SignedRequest::sign(
            Op::Register,
            &a,
            VolumeId([1; 16]),
            KekVersion(1),
            challenge,
            low,
        );
        let o = s.signed(req, true).await.unwrap();
        assert_eq!(refusal(&o), Some(Refusal::BadRequest), "{o:?}");
        assert!(s.list_volumes().unwrap().is_empty());
    });
}

#[test]
fn erase_destroys_every_kek_only_for_an_authorized_host_and_is_audited() {
    let f = fixture(&MasterKey::generate().unwrap());
    let s = &f.store;
    let ((a, ha), (b, hb)) = (host(1), host(2));
    let vol = VolumeId([4; 16]);
    let other = VolumeId([6; 16]);
    rt().block_on(async {
        s.enroll("a".into(), ha).await.unwrap().unwrap();
        s.enroll("b".into(), hb).await.unwrap().unwrap();
        for v in [vol, other] {
            let (o, ..) = request(s, &a, Op::Register, v, 1).await;
            assert_eq!(refusal(&o), None);
        }
        assert_eq!(s.rotate_kek(vol).await.unwrap(), Ok(KekVersion(2)));
        // A host not on the volume's ACL cannot erase it.
        let (o, ..) = request(s, &b, Op::Erase, vol, 1).await;
        assert_eq!(refusal(&o), Some(Refusal::NotAuthorized));
        assert_eq!(s.list_volumes().unwrap().len(), 2);

        let (o, ..) = request(s, &a, Op::Erase, vol, 1).await;
        let SignedOutcome::Erased { destroyed } = o else {
            panic!("{o:?}")
        };
        assert_eq!(destroyed, vec![KekVersion(1), KekVersion(2)]);
        // Gone: no version unlocks, a second erase finds nothing; the
        // other volume is untouched.
        for v in [1, 2] {
            let (o, ..) = request(s, &a, Op::Unlock, vol, v).await;
            assert_eq!(refusal(&o), Some(Refusal::UnknownVolume));
        }
        let (o, ..) = request(s, &a, Op::Erase, vol, 1).await;
        assert_eq!(refusal(&o), Some(Refusal::UnknownVolume));
        let left = s.list_volumes().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, other.to_hex());
        let (o, ..) = request(s, &a, Op::Unlock, other, 1).await;
        assert_eq!(refusal(&o), None);

        // The administrator's erase: the same, for any volume.
        let e = s.erase_volume(other).await.unwrap().unwrap();
        assert_eq!(e, vec![KekVersion(1)]);
        assert!(s.list_volumes().unwrap().is_empty());
        assert_eq!(
            s.erase_volume(other).await.unwrap(),
            Err(AdminRefusal::UnknownVolume(other.to_hex()))
        );

        let log = s
            .audit(&AuditFilter {
                host: None,
                volume: Some(vol),
                limit: 100,
            })
            .unwrap();
        let erases: Vec<_> = log.iter().filter(|e| e.action == "erase").collect();
        assert_eq!(erases.len(), 3, "{log:?}");
        assert_eq!(erases[0].outcome, "refused");
        assert_eq!(erases[1].outcome, "ok");
        assert!(
            erases[1].reason.contains("destroyed KEKs"),
            "{:?}",
            erases[1]
        );
        let log = s
            .audit(&AuditFilter {
                host: None,
                volume: Some(other),
                limit: 100,
            })
            .unwrap();
        assert_eq!(log.last().unwrap().action, "erase-volume");
    });
}

#[test]
fn a_compromised_volume_asks_its_hosts_to_rekey_until_one_reports_it() {
    let f = fixture(&MasterKey::generate().unwrap());
    let s = &f.store;
    let ((a, ha), (b, hb)) = (host(1), host(2));
    let vol = VolumeId([7; 16]);
    rt().block_on(async {
        s.enroll("a".into(), ha).await.unwrap().unwrap();
        s.enroll("b".into(), hb).await.unwrap().unwrap();
        let (o, ..) = request(s, &a, Op::Register, vol, 1).await;
        assert!(matches!(o, SignedOutcome::Released { rekey: false, .. }), "{o:?}");
        let (o, ..) = request(s, &a, Op::Unlock, vol, 1).await;
        assert!(matches!(o, SignedOutcome::Released { rekey: false, newest: None, .. }));
        assert!(!s.is_compromised(vol).unwrap());
        assert_eq!(
            s.compromise(VolumeId([9; 16])).await.unwrap(),
            Err(AdminRefusal::UnknownVolume(VolumeId([9; 16]).to_hex()))
        );

        // Declared compromised: a new KEK, and every unlock asks for a rekey.
        assert_eq!(s.compromise(vol).await.unwrap(), Ok(KekVersion(2)));
        assert!(s.is_compromised(vol).unwrap());
        let (o, ..) = request(s, &a, Op::Unlock, vol, 1).await;
        assert!(
            matches!(o, SignedOutcome::Released { rekey: true, newest: Some(ref n), .. } if n.version == KekVersion(2)),
            "{o:?}"
        );
        // A host not on the volume's ACL cannot clear the mark.
        let (o, ..) = request(s, &b, Op::Rekeyed, vol, 1).await;
        assert_eq!(refusal(&o), Some(Refusal::NotAuthorized));
        assert!(s.is_compromised(vol).unwrap());

        let (o, ..) = request(s, &a, Op::Rekeyed, vol, 1).await;
        assert!(matches!(o, SignedOutcome::Rekeyed { cleared: true }), "{o:?}");
        assert!(!s.is_compromised(vol).unwrap());
        let (o, ..) = request(s, &a, Op::Unlock, vol, 2).await;
        assert!(matches!(o, SignedOutcome::Released { rekey: false, .. }), "{o:?}");
        let (o, ..) = request(s, &a, Op::Rekeyed, vol, 1).await;
        assert!(matches!(o, SignedOutcome::Rekeyed { cleared: false }), "{o:?}");

        // Erasing a marked volume drops the mark too.
        assert_eq!(s.compromise(vol).await.unwrap(), Ok(KekVersion(3)));
        s.erase_volume(vol).await.unwrap().unwrap();
        assert!(!s.is_compromised(vol).unwrap());

        let log = s
            .audit(&AuditFilter {
                host: None,
                volume: Some(vol),
                limit: 100,
            })
            .unwrap();
        let actions: Vec<(&str, &str)> = log
            .iter()
            .map(|e| (e.action.as_str(), e.outcome.as_str()))
            .collect();
        for want in [("compromise", "ok"), ("rekeyed", "ok"), ("rekeyed", "refused")] {
            assert!(actions.contains(&want), "{want:?} not in {actions:?}");
        }
        assert!(
            log.iter().any(|e| e.action == "unlock" && e.reason.contains("rekey asked")),
            "{log:?}"
        );
    });
}
