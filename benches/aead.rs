//! Raw AEAD throughput: seal and open with each cipher kmsfs offers, at the sizes
//! that matter (a 4 KiB block, the 64 KiB default block, a 1 MiB block).
//! This is the physical ceiling of this CPU for any kmsfs workload.
//!
//! Run: `cargo bench --bench aead` (criterion prints bytes/s for each case).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kmsfs::crypto::{CipherKind, Sealer, SecretKey};

const SIZES: [(usize, &str); 3] = [(4 << 10, "4KiB"), (64 << 10, "64KiB"), (1 << 20, "1MiB")];
const CIPHERS: [CipherKind; 2] = [CipherKind::Aes256GcmSiv, CipherKind::XChaCha20Poly1305];
/// About the size of the AAD kmsfs binds to a block (volume id, block id, kind, version).
const AAD: [u8; 48] = [7u8; 48];

fn plaintext(len: usize) -> Vec<u8> {
    // Deterministic, incompressible-looking bytes (xorshift).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn bench_seal(c: &mut Criterion) {
    for kind in CIPHERS {
        let sealer = Sealer::new(kind, &SecretKey::random());
        let mut group = c.benchmark_group(format!("seal/{}", kind.name()));
        for (len, label) in SIZES {
            let pt = plaintext(len);
            group.throughput(Throughput::Bytes(len as u64));
            group.bench_with_input(BenchmarkId::from_parameter(label), &pt, |b, pt| {
                b.iter(|| sealer.seal(black_box(&AAD), black_box(pt)));
            });
        }
        group.finish();
    }
}

fn bench_open(c: &mut Criterion) {
    for kind in CIPHERS {
        let sealer = Sealer::new(kind, &SecretKey::random());
        let mut group = c.benchmark_group(format!("open/{}", kind.name()));
        for (len, label) in SIZES {
            let sealed = sealer.seal(&AAD, &plaintext(len));
            group.throughput(Throughput::Bytes(len as u64));
            group.bench_with_input(BenchmarkId::from_parameter(label), &sealed, |b, sealed| {
                b.iter(|| {
                    sealer
                        .open(black_box(&AAD), black_box(sealed))
                        .expect("a freshly sealed buffer opens")
                });
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = aead;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench_seal, bench_open
}
criterion_main!(aead);
