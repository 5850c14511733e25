//! What one atomic add costs when another core wrote the same cache line last, against an add
//! to a line of the thread's own: the cost the serving threads avoid by keeping per-request
//! counts apart (`docs/benchmarks.md`, "Tenth session"). Standalone, std only, x86_64:
//!
//! ```sh
//! rustc -O --edition 2021 bench/contended_add.rs -o /tmp/contended_add && /tmp/contended_add
//! ```
//!
//! Two threads each do 200 000 rounds of about 10 µs of unrelated memory work and then one
//! `fetch_add`, timed with the time-stamp counter, first on a counter of their own, then on
//! one counter both add to. The rounds are spaced like a serving thread's requests at
//! 25 000 requests per second, so the other core has written the shared line in between.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;

#[repr(align(128))]
struct Padded(AtomicU64);

const ROUNDS: u64 = 200_000;

fn run(counter: &AtomicU64, junk: &mut [u8], start: &Barrier) -> f64 {
    start.wait();
    let mut cycles = 0u64;
    for round in 0..ROUNDS {
        for k in 0..2000usize {
            let i = (k * 64 + round as usize * 7) % junk.len();
            junk[i] = junk[i].wrapping_add(1);
        }
        black_box(&junk);
        // SAFETY: `_rdtsc` only reads the time-stamp counter.
        let t0 = unsafe { std::arch::x86_64::_rdtsc() };
        counter.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        let t1 = unsafe { std::arch::x86_64::_rdtsc() };
        cycles += t1 - t0;
    }
    cycles as f64 / ROUNDS as f64
}

fn measure(shared: bool) -> (f64, f64) {
    let own = [Padded(AtomicU64::new(0)), Padded(AtomicU64::new(0))];
    let both = Padded(AtomicU64::new(0));
    let start = Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let counter = if shared { &both.0 } else { &own[t].0 };
                let start = &start;
                s.spawn(move || run(counter, &mut vec![0u8; 2 << 20], start))
            })
            .collect();
        let r: Vec<f64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (r[0], r[1])
    })
}

fn main() {
    let (a, b) = measure(false);
    println!("own line:    {a:6.1} {b:6.1} cycles per fetch_add (incl. rdtsc)");
    let (a, b) = measure(true);
    println!("shared line: {a:6.1} {b:6.1} cycles per fetch_add (incl. rdtsc)");
}
