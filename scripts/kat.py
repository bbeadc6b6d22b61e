#!/usr/bin/env python3
"""Independent known-answer values for lsvfs block sealing (docs/FORMAT.md,
"Sealing a block"), computed with Python's `cryptography` and `blake3`
packages instead of the Rust crates. The Rust test crypto::tests::known_answer
pins these values.  Run: pip install cryptography blake3 && scripts/kat.py"""
import struct
import blake3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

master, volume_id = bytes([7] * 32), bytes([1] * 16)


def hkdf(label, n):
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=volume_id, info=label).derive(master)


xts_key = hkdf(b"lsvfs v1 AES-256-XTS block encryption", 64)
mac_key = hkdf(b"lsvfs v1 BLAKE3 block authentication", 32)
kind, addr, gen = 1, 0, 1  # a data block: LBA 0, generation 1
tweak = struct.pack("<Q", gen) + struct.pack("<Q", (addr & (2**56 - 1)) | (kind << 56))
enc = Cipher(algorithms.AES(xts_key), modes.XTS(tweak)).encryptor()
ct = enc.update(bytes(4096)) + enc.finalize()
tag = bytes([kind]) + struct.pack("<Q", addr) + struct.pack("<Q", gen)
mac = blake3.blake3(ct + tag + volume_id, key=mac_key).digest()[:16]
print("ciphertext head", ct[:8].hex())
print("mac            ", mac.hex())
