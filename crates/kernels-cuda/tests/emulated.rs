//! The CUDA kernels' sources, run on the CPU by the emulator (src/cuda/emu), against
//! `preftune-kernels`' CPU loops (themselves tested against candle's composed ops and finite
//! differences) and f64 references. Launch shapes come from the crate, as on a GPU.
use std::ffi::c_void;

use half::bf16;
use preftune_kernels::fused;
use preftune_kernels_cuda::{
    elementwise, flash_keys, flash_rows, flash_tc_keys, flash_tc_rows, per_row, rmsnorm_bwd, Launch,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

extern "C" {
    fn preftune_emu_launch(
        grid_x: u32,
        grid_y: u32,
        block: u32,
        body: extern "C" fn(*mut c_void),
        ctx: *mut c_void,
    );
    fn rmsnorm_fwd_f32(x: *const f32, w: *const f32, y: *mut f32, d: u32, eps: f64);
    fn rmsnorm_fwd_f64(x: *const f64, w: *const f64, y: *mut f64, d: u32, eps: f64);
    fn rmsnorm_fwd_bf16(x: *const bf16, w: *const bf16, y: *mut bf16, d: u32, eps: f64);
    fn rmsnorm_bwd_f64(
        x: *const f64,
        w: *const f64,
        dy: *const f64,
        dx: *mut f64,
        dw_part: *mut f64,
        rows: u32,
        d: u32,
        eps: f64,
    );
    fn col_sum_f64(part: *const f64, out: *mut f64, parts: u32, d: u32);
    fn swiglu_fwd_f32(g: *const f32, u: *const f32, out: *mut f32, n: usize);
    fn dropout_f32(x: *const f32, out: *mut f32, n: usize, key: u64, p: f32, keep: f32);
    fn dropout_bf16(x: *const bf16, out: *mut bf16, n: usize, key: u64, p: f32, keep: f32);
    fn dropout_f64(x: *const f64, out: *mut f64, n: usize, key: u64, p: f32, keep: f32);
    fn adamw_ema_f32(a: *mut f32, g: *const f32, n: usize, beta: f32, square: i32);
    fn adamw_param_f32(
        p: *mut f32,
        m: *const f32,
        v: *const f32,
        n: usize,
        bc2_sqrt: f32,
        eps: f32,
        step_size: f32,
        decay: f32,
    );
    fn swiglu_bwd_f64(g: *const f64, u: *const f64, dy: *const f64, out: *mut f64, n: usize);
    fn rope_f64(
        x: *const f64,
        cos: *const f64,
        sin: *const f64,
        out: *mut f64,
        rows: usize,
        h: u32,
        t: u32,
        dh: u32,
    );
    fn lse_gather_f64(
        z: *const f64,
        labels: *const u32,
        logp: *mut f64,
        lse: *mut f64,
        hit: *mut u8,
        mean: *mut f64,
        v: u32,
        inv_temp: f64,
    );
    fn lse_gather_bf16(
        z: *const bf16,
        labels: *const u32,
        logp: *mut f32,
        lse: *mut f32,
        hit: *mut u8,
        mean: *mut f32,
        v: u32,
        inv_temp: f64,
    );
    fn lse_gather_bwd_f64(
        z: *const f64,
        labels: *const u32,
        g: *const f64,
        lse: *const f64,
        dz: *mut f64,
        rows: usize,
        v: u32,
        inv_temp: f64,
    );
}

/// The attention kernels' entry points for one element type and head size.
macro_rules! flash_ffi {
    ($t:ty, $acc:ty, $fwd:ident, $dq:ident, $dkdv:ident) => {
        extern "C" {
            fn $fwd(
                q: *const $t,
                k: *const $t,
                v: *const $t,
                mask: *const $t,
                out: *mut $t,
                lse: *mut $acc,
                r: u32,
                t: u32,
                tk: u32,
                groups: u32,
                scale: f64,
            );
            fn $dq(
                q: *const $t,
                k: *const $t,
                v: *const $t,
                mask: *const $t,
                out: *const $t,
                dout: *const $t,
                lse: *const $acc,
                dsum: *mut $acc,
                dq: *mut $t,
                r: u32,
                t: u32,
                tk: u32,
                groups: u32,
                scale: f64,
            );
            fn $dkdv(
                q: *const $t,
                k: *const $t,
                v: *const $t,
                mask: *const $t,
                dout: *const $t,
                lse: *const $acc,
                dsum: *const $acc,
                dk: *mut $t,
                dv: *mut $t,
                r: u32,
                t: u32,
                tk: u32,
                groups: u32,
                scale: f64,
            );
        }
    };
}
flash_ffi!(
    f64,
    f64,
    flash_fwd_f64_d32,
    flash_bwd_dq_f64_d32,
    flash_bwd_dkdv_f64_d32
);
flash_ffi!(
    f64,
    f64,
    flash_fwd_f64_d64,
    flash_bwd_dq_f64_d64,
    flash_bwd_dkdv_f64_d64
);
flash_ffi!(
    f32,
    f32,
    flash_fwd_f32_d64,
    flash_bwd_dq_f32_d64,
    flash_bwd_dkdv_f32_d64
);

flash_ffi!(
    bf16,
    f32,
    flash_fwd_bf16_d64,
    flash_bwd_dq_bf16_d64,
    flash_bwd_dkdv_bf16_d64
);
flash_ffi!(
    bf16,
    f32,
    flash_fwd_tc_bf16_d64,
    flash_bwd_dq_tc_bf16_d64,
    flash_bwd_dkdv_tc_bf16_d64
);
flash_ffi!(
    f32,
    f32,
    flash_fwd_tc_f32_d128,
    flash_bwd_dq_tc_f32_d128,
    flash_bwd_dkdv_tc_f32_d128
);
flash_ffi!(
    f32,
    f32,
    flash_fwd_tc_f32_d64,
    flash_bwd_dq_tc_f32_d64,
    flash_bwd_dkdv_tc_f32_d64
);

/// Runs `f` as every thread of the launch `l`; `f` calls one kernel entry point.
fn launch<F: Fn() + Sync>(l: Launch, f: F) {
    extern "C" fn trampoline<F: Fn() + Sync>(ctx: *mut c_void) {
        // SAFETY: `ctx` is the `&F` that `launch` passed, alive until the launch returns.
        let f = unsafe { &*(ctx as *const F) };
        f();
    }
    // SAFETY: the emulator calls `trampoline::<F>` with `ctx` from threads it joins before
    // returning, so `f` outlives every call.
    unsafe {
        preftune_emu_launch(
            l.grid,
            l.grid_y,
            l.block,
            trampoline::<F>,
            &f as *const F as *mut c_void,
        )
    }
}

/// Launches one kernel entry point as every thread of a launch.
macro_rules! run {
    ($l:expr, $kernel:ident($($arg:expr),* $(,)?)) => {
        launch($l, || {
            // SAFETY: the pointers address live buffers of the lengths the kernel reads and
            // writes for these sizes (each test sizes them so), and every thread writes only
            // its own elements.
            unsafe { $kernel($($arg),*) }
        })
    };
}

/// Addresses as integers, so the kernel closures are `Sync`; each thread writes its own elements.
fn p<T>(s: &[T]) -> usize {
    s.as_ptr() as usize
}
fn pm<T>(s: &mut [T]) -> usize {
    s.as_mut_ptr() as usize
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn rmsnorm_forward_matches_the_cpu_loop() {
    let mut rng = StdRng::seed_from_u64(1);
    // rows of fewer values than a warp, of a partial last warp, and of more than a block
    for (rows, d) in [(3, 20), (5, 72), (2, 300)] {
        let (x, w) = (randn(&mut rng, rows * d), randn(&mut rng, d));
        let want = fused::rms_norm(&x, &w, 1e-5);
        let mut y = vec![0.0; rows * d];
        let (xp, wp, yp) = (p(&x), p(&w), pm(&mut y));
        run!(
            per_row(rows, d),
            rmsnorm_fwd_f64(xp as _, wp as _, yp as _, d as u32, 1e-5)
        );
        assert!(
            max_diff(&y, &want) < 1e-12,
            "f64 {rows}x{d}: {}",
            max_diff(&y, &want)
        );

        let (x32, w32) = (f32s(&x), f32s(&w));
        let mut y32 = vec![0f32; rows * d];
        let (xp, wp, yp) = (p(&x32), p(&w32), pm(&mut y32));
        run!(
            per_row(rows, d),
            rmsnorm_fwd_f32(xp as _, wp as _, yp as _, d as u32, 1e-5)
        );
        assert!(max_diff(&f64s(&y32), &want) < 1e-5, "f32 {rows}x{d}");
    }
}

/// bf16 as transformers computes it: normalise in f32, round to bf16, multiply by the weight,
/// round again.
#[test]
fn rmsnorm_forward_in_bf16_rounds_as_transformers_does() {
    let mut rng = StdRng::seed_from_u64(2);
    let (rows, d) = (4, 72);
    let x: Vec<bf16> = randn(&mut rng, rows * d)
        .iter()
        .map(|&v| bf16::from_f64(v))
        .collect();
    let w: Vec<bf16> = randn(&mut rng, d)
        .iter()
        .map(|&v| bf16::from_f64(v))
        .collect();
    let mut y = vec![bf16::ZERO; rows * d];
    let (xp, wp, yp) = (p(&x), p(&w), pm(&mut y));
    run!(
        per_row(rows, d),
        rmsnorm_fwd_bf16(xp as _, wp as _, yp as _, d as u32, 1e-6)
    );
    let mut mismatches = 0;
    for r in 0..rows {
        let xr: Vec<f32> = x[r * d..][..d].iter().map(|v| v.to_f32()).collect();
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + 1e-6).sqrt();
        for j in 0..d {
            let n = bf16::from_f32(xr[j] * inv).to_f32();
            let want = bf16::from_f32(n * w[j].to_f32());
            // the f32 sum of squares may differ in its last bit from this order of summing
            if y[r * d + j] != want {
                mismatches += 1;
                let (a, b) = (y[r * d + j].to_f32(), want.to_f32());
                assert!(
                    (a - b).abs() <= b.abs() / 64.0,
                    "row {r} col {j}: {a} vs {b}"
                );
            }
        }
    }
    assert!(
        mismatches <= rows * d / 50,
        "{mismatches} of {} differ",
        rows * d
    );
}

#[test]
fn rmsnorm_backward_matches_the_cpu_loop_with_any_number_of_rows_a_block() {
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, d) = (7, 72);
    let (x, w, dy) = (
        randn(&mut rng, rows * d),
        randn(&mut rng, d),
        randn(&mut rng, rows * d),
    );
    let mut want = vec![0.0; rows * d + d];
    fused::rms_norm_bwd(&x, &w, &dy, 1e-5, &mut want);
    // the crate's launch (a block a row), and 3 blocks taking 3, 2 and 2 rows
    for l in [
        rmsnorm_bwd(rows, d),
        Launch {
            grid: 3,
            grid_y: 1,
            block: 32,
        },
    ] {
        let mut dx = vec![0.0; rows * d];
        let mut part = vec![f64::NAN; l.grid as usize * d];
        let mut dw = vec![0.0; d];
        let (xp, wp, gp, dxp, pp) = (p(&x), p(&w), p(&dy), pm(&mut dx), pm(&mut part));
        run!(
            l,
            rmsnorm_bwd_f64(
                xp as _,
                wp as _,
                gp as _,
                dxp as _,
                pp as _,
                rows as u32,
                d as u32,
                1e-5,
            )
        );
        let (pp, dwp) = (p(&part), pm(&mut dw));
        let parts = l.grid;
        run!(
            elementwise(d),
            col_sum_f64(pp as _, dwp as _, parts, d as u32)
        );
        assert!(max_diff(&dx, &want[..rows * d]) < 1e-12, "dx with {l:?}");
        assert!(max_diff(&dw, &want[rows * d..]) < 1e-12, "dw with {l:?}");
    }
}

/// The device's AdamW step (moments, then the parameter, in place) is the CPU trainer's one
/// pass, bit for bit, over three steps and a grid smaller than the work.
#[test]
fn adamw_is_the_cpus() {
    use preftune_kernels::adamw;
    let n = 3000;
    let mut rng = StdRng::seed_from_u64(9);
    let mut draw =
        |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-s..s)).collect() };
    let (mut p_cpu, mut m_cpu, mut v_cpu) = (draw(n, 1.0), vec![0f32; n], vec![0f32; n]);
    let (mut p_dev, mut m_dev, mut v_dev) = (p_cpu.clone(), m_cpu.clone(), v_cpu.clone());
    for t in 1..=3 {
        let g = draw(n, 0.1);
        let s = adamw::Step::at(t, 1e-3, (0.9, 0.999), 1e-8, 0.01);
        let (b1, b2) = (s.b1, s.b2);
        adamw::update(&s, &mut p_cpu, &mut m_cpu, &mut v_cpu, &g);
        let l = Launch {
            grid: 2,
            grid_y: 1,
            block: 64,
        };
        let gp = p(&g);
        let (mp, vp) = (pm(&mut m_dev), pm(&mut v_dev));
        run!(l, adamw_ema_f32(mp as _, gp as _, n, b1, 0));
        run!(l, adamw_ema_f32(vp as _, gp as _, n, b2, 1));
        let pp = pm(&mut p_dev);
        run!(
            elementwise(n),
            adamw_param_f32(
                pp as _,
                mp as _,
                vp as _,
                n,
                s.bc2_sqrt,
                s.eps,
                s.step_size,
                s.decay
            )
        );
        assert_eq!(m_dev, m_cpu, "first moment, step {t}");
        assert_eq!(v_dev, v_cpu, "second moment, step {t}");
        assert_eq!(p_dev, p_cpu, "parameter, step {t}");
    }
    assert!(p_cpu
        .iter()
        .zip(&m_cpu)
        .all(|(p, m)| p.is_finite() && *m != 0.0));
}

/// The device's dropout is the CPU's, bit for bit (the same counter-based stream, the same
/// products), over a grid smaller than the work, in bf16 and in f64.
#[test]
fn dropout_is_the_cpus() {
    let n = 5000;
    let key = preftune_kernels::rng::stream_key(11, 2);
    let (p_drop, keep) = (0.3f32, 1.0 / 0.7f32);
    let mut rng = StdRng::seed_from_u64(5);
    let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0..3.0)).collect();
    let mut want = x.clone();
    preftune_kernels::rng::dropout(key, 0, p_drop, keep, &mut want);
    let mut out = vec![f32::NAN; n];
    let (xp, op) = (p(&x), pm(&mut out));
    run!(
        Launch {
            grid: 3,
            grid_y: 1,
            block: 64
        },
        dropout_f32(xp as _, op as _, n, key, p_drop, keep)
    );
    assert_eq!(out, want);
    assert!(
        want.iter().filter(|&&v| v == 0.0).count() > n / 5,
        "some values dropped"
    );
    // bf16: products in f32, rounded once, as the CPU op does.
    let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut out16 = vec![bf16::ZERO; n];
    let (xp, op) = (p(&x16), pm(&mut out16));
    run!(
        elementwise(n),
        dropout_bf16(xp as _, op as _, n, key, p_drop, keep)
    );
    let mut want16: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
    preftune_kernels::rng::dropout(key, 0, p_drop, keep, &mut want16);
    let want16: Vec<bf16> = want16.iter().map(|&v| bf16::from_f32(v)).collect();
    assert_eq!(out16, want16);
    // f64: the kept values scaled by `keep` widened to f64.
    let x64: Vec<f64> = x.iter().map(|&v| v as f64 * 1.000_000_1).collect();
    let mut out64 = vec![f64::NAN; n];
    let (xp, op) = (p(&x64), pm(&mut out64));
    run!(
        elementwise(n),
        dropout_f64(xp as _, op as _, n, key, p_drop, keep)
    );
    for (i, (&y, &x)) in out64.iter().zip(&x64).enumerate() {
        let kept = want[i] != 0.0;
        assert_eq!(y, if kept { x * keep as f64 } else { 0.0 }, "value {i}");
    }
}

#[test]
fn swiglu_matches_the_cpu_loops() {
    let mut rng = StdRng::seed_from_u64(4);
    let n = 1000; // more than one block of the launch, with a partial last block
    let (g, u, dy) = (randn(&mut rng, n), randn(&mut rng, n), randn(&mut rng, n));
    let (g32, u32_) = (f32s(&g), f32s(&u));
    let want32 = fused::swiglu(&g32, &u32_, n);
    let mut out32 = vec![0f32; n];
    let (gp, up, op) = (p(&g32), p(&u32_), pm(&mut out32));
    run!(elementwise(n), swiglu_fwd_f32(gp as _, up as _, op as _, n));
    assert!(max_diff(&f64s(&out32), &f64s(&want32)) < 1e-5);

    let want = fused::swiglu_bwd(&g, &u, &dy, n);
    let mut out = vec![0.0; 2 * n];
    let (gp, up, dp, op) = (p(&g), p(&u), p(&dy), pm(&mut out));
    // a grid smaller than the work: every thread takes several elements
    run!(
        Launch {
            grid: 2,
            grid_y: 1,
            block: 64
        },
        swiglu_bwd_f64(gp as _, up as _, dp as _, op as _, n)
    );
    assert!(max_diff(&out, &want) < 1e-12);
}

#[test]
fn rope_matches_the_cpu_loop() {
    let mut rng = StdRng::seed_from_u64(5);
    let (b, h, t, dh) = (2, 3, 5, 6);
    let rows = b * h * t;
    let x = randn(&mut rng, rows * dh);
    let angle = randn(&mut rng, b * t * dh / 2);
    let cos: Vec<f64> = angle.iter().map(|a| a.cos()).collect();
    let sin: Vec<f64> = angle.iter().map(|a| a.sin()).collect();
    let want = fused::rope(&x, &cos, &sin, h, t, dh);
    let mut out = vec![0.0; rows * dh];
    let (xp, cp, sp, op) = (p(&x), p(&cos), p(&sin), pm(&mut out));
    run!(
        elementwise(rows * dh / 2),
        rope_f64(xp as _, cp as _, sp as _, op as _, rows, h as u32, t as u32, dh as u32,)
    );
    assert!(max_diff(&out, &want) < 1e-12);
}

/// `log_softmax(z * it)[label]`, its log-sum-exp, whether the label is the first argmax, and
/// the mean of `z * it`, in f64.
fn lse_reference(z: &[f64], label: usize, it: f64) -> (f64, f64, u8, f64) {
    let s: Vec<f64> = z.iter().map(|v| v * it).collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    let first = s.iter().position(|&v| v == m).unwrap();
    (
        s[label] - lse,
        lse,
        (first == label) as u8,
        s.iter().sum::<f64>() / s.len() as f64,
    )
}

struct LseOut {
    logp: Vec<f64>,
    lse: Vec<f64>,
    hit: Vec<u8>,
    mean: Vec<f64>,
}

fn lse_gather(z: &[f64], labels: &[u32], v: usize, it: f64) -> LseOut {
    let rows = labels.len();
    let mut o = LseOut {
        logp: vec![0.0; rows],
        lse: vec![0.0; rows],
        hit: vec![9; rows],
        mean: vec![0.0; rows],
    };
    let (zp, lp) = (p(z), p(labels));
    let (op, sp, hp, mp) = (
        pm(&mut o.logp),
        pm(&mut o.lse),
        pm(&mut o.hit),
        pm(&mut o.mean),
    );
    run!(
        per_row(rows, v),
        lse_gather_f64(zp as _, lp as _, op as _, sp as _, hp as _, mp as _, v as u32, it,)
    );
    o
}

#[test]
fn log_softmax_gather_matches_f64_reference_including_ties_and_short_rows() {
    let mut rng = StdRng::seed_from_u64(6);
    // a row longer than a block, and one shorter than a warp
    for v in [1000, 20] {
        let rows = 5;
        let mut z = randn(&mut rng, rows * v);
        // row 3: two equal maxima; its label is the second (no hit), row 4's the first (a hit)
        for r in [3, 4] {
            z[r * v + 2] = 9.0;
            z[r * v + v - 1] = 9.0;
        }
        let mut labels: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..v as u32)).collect();
        let top = (0..v).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap();
        labels[0] = top as u32; // a hit on a row without ties
        labels[3] = v as u32 - 1;
        labels[4] = 2;
        for it in [1.0, 1.0 / 0.7] {
            let o = lse_gather(&z, &labels, v, it);
            for r in 0..rows {
                let (lp, lse, hit, mean) = lse_reference(&z[r * v..][..v], labels[r] as usize, it);
                assert!(
                    (o.logp[r] - lp).abs() < 1e-12,
                    "v {v} row {r}: {} vs {lp}",
                    o.logp[r]
                );
                assert!((o.lse[r] - lse).abs() < 1e-12);
                assert!((o.mean[r] - mean).abs() < 1e-12);
                assert_eq!(o.hit[r], hit, "v {v} row {r}");
            }
            assert_eq!((o.hit[0], o.hit[3], o.hit[4]), (1, 0, 1));
        }
    }
}

#[test]
fn log_softmax_gather_in_bf16_computes_in_f32() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, v) = (3, 500);
    let z: Vec<bf16> = randn(&mut rng, rows * v)
        .iter()
        .map(|&x| bf16::from_f64(4.0 * x))
        .collect();
    let labels = [0u32, 17, 499];
    let (mut logp, mut lse, mut mean) = (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
    let mut hit = vec![0u8; rows];
    let (zp, lp) = (p(&z), p(&labels));
    let (op, sp, hp, mp) = (pm(&mut logp), pm(&mut lse), pm(&mut hit), pm(&mut mean));
    run!(
        per_row(rows, v),
        lse_gather_bf16(zp as _, lp as _, op as _, sp as _, hp as _, mp as _, v as u32, 1.0,)
    );
    for r in 0..rows {
        let zr: Vec<f64> = z[r * v..][..v].iter().map(|x| x.to_f64()).collect();
        let (want, _, hit_want, _) = lse_reference(&zr, labels[r] as usize, 1.0);
        assert!(
            (logp[r] as f64 - want).abs() < 1e-5,
            "row {r}: {} vs {want}",
            logp[r]
        );
        assert_eq!(hit[r], hit_want);
    }
}

/// The backward against central differences of the forward kernel itself.
#[test]
fn log_softmax_gather_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(8);
    let (rows, v, it) = (3, 40, 1.0 / 0.7);
    let z = randn(&mut rng, rows * v);
    let labels = [5u32, 0, 39];
    let g = [0.5, -1.5, 2.0];
    let fwd = lse_gather(&z, &labels, v, it);
    let mut dz = vec![0.0; rows * v];
    let (zp, lp, gp, sp, dp) = (p(&z), p(&labels), p(&g), p(&fwd.lse), pm(&mut dz));
    run!(
        elementwise(rows * v),
        lse_gather_bwd_f64(zp as _, lp as _, gp as _, sp as _, dp as _, rows, v as u32, it,)
    );
    let loss = |z: &[f64]| -> f64 {
        let o = lse_gather(z, &labels, v, it);
        o.logp.iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let h = 1e-5;
    for i in [0, 5, 17, v, v + 33, 2 * v + 39, 3 * v - 2] {
        let (mut a, mut b) = (z.clone(), z.clone());
        a[i] += h;
        b[i] -= h;
        let fd = (loss(&a) - loss(&b)) / (2.0 * h);
        assert!((dz[i] - fd).abs() < 1e-7, "dz[{i}] = {} vs {fd}", dz[i]);
    }
}

/// An attention problem in the kernels' grouped layout: `bg = b * g` groups of `r = rep * t`
/// query rows, `tk` keys, head size `dh`, and an additive mask `[b, t, tk]` (causal after `past`
/// cached keys; batch 1 also pads its first 3 keys) or none.
struct Attn {
    b: usize,
    g: usize,
    r: usize,
    t: usize,
    tk: usize,
    dh: usize,
    scale: f64,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    dout: Vec<f64>,
    mask: Option<Vec<f64>>,
}

impl Attn {
    fn new(
        seed: u64,
        (b, g, rep, t, past, dh): (usize, usize, usize, usize, usize, usize),
        masked: bool,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let (r, tk) = (rep * t, past + t);
        let mask = masked.then(|| {
            let mut m = vec![0.0; b * t * tk];
            for bi in 0..b {
                for i in 0..t {
                    for j in 0..tk {
                        if j > past + i || (bi == 1 && j < 3) {
                            m[(bi * t + i) * tk + j] = -1e9;
                        }
                    }
                }
            }
            m
        });
        Attn {
            b,
            g,
            r,
            t,
            tk,
            dh,
            scale: 1.0 / (dh as f64).sqrt(),
            q: randn(&mut rng, b * g * r * dh),
            k: randn(&mut rng, b * g * tk * dh),
            v: randn(&mut rng, b * g * tk * dh),
            dout: randn(&mut rng, b * g * r * dh),
            mask,
        }
    }

    /// Output, log-sum-exp, dQ, dK, dV in f64, from the probabilities written out.
    #[allow(clippy::needless_range_loop)]
    fn reference(&self) -> [Vec<f64>; 5] {
        let (r, tk, dh) = (self.r, self.tk, self.dh);
        let bg = self.b * self.g;
        let mut out = vec![0.0; bg * r * dh];
        let mut lse = vec![0.0; bg * r];
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; out.len()],
            vec![0.0; self.k.len()],
            vec![0.0; self.v.len()],
        );
        for grp in 0..bg {
            let bi = grp / self.g;
            for i in 0..r {
                let row = grp * r + i;
                let q = &self.q[row * dh..][..dh];
                let dout = &self.dout[row * dh..][..dh];
                let s: Vec<f64> = (0..tk)
                    .map(|j| {
                        let kj = &self.k[(grp * tk + j) * dh..][..dh];
                        let m = self
                            .mask
                            .as_ref()
                            .map_or(0.0, |m| m[(bi * self.t + i % self.t) * tk + j]);
                        q.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * self.scale + m
                    })
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                lse[row] = mx + sum.ln();
                let p: Vec<f64> = s.iter().map(|x| (x - lse[row]).exp()).collect();
                for j in 0..tk {
                    for d in 0..dh {
                        out[row * dh + d] += p[j] * self.v[(grp * tk + j) * dh + d];
                    }
                }
                let dp: Vec<f64> = (0..tk)
                    .map(|j| {
                        dout.iter()
                            .zip(&self.v[(grp * tk + j) * dh..][..dh])
                            .map(|(a, b)| a * b)
                            .sum()
                    })
                    .collect();
                let big_d: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..tk {
                    let ds = p[j] * (dp[j] - big_d);
                    for d in 0..dh {
                        dq[row * dh + d] += self.scale * ds * self.k[(grp * tk + j) * dh + d];
                        dk[(grp * tk + j) * dh + d] += self.scale * ds * q[d];
                        dv[(grp * tk + j) * dh + d] += p[j] * dout[d];
                    }
                }
            }
        }
        [out, lse, dq, dk, dv]
    }
}

/// The element types the tests hand the kernels, to and from f64.
trait Elem: Copy {
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
}

impl Elem for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
}

impl Elem for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Elem for bf16 {
    fn of(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn f64(self) -> f64 {
        self.to_f64()
    }
}

/// The CUDA-core kernels' launch shapes, which do not depend on the head size.
fn cuda_core_rows(bg: usize, r: usize, _dh: usize) -> Launch {
    flash_rows(bg, r)
}

fn cuda_core_keys(bg: usize, tk: usize, _dh: usize) -> Launch {
    flash_keys(bg, tk)
}

/// Runs the three attention kernels of one element type and head size on `a` (converted to
/// `$t`) and returns output, log-sum-exp, dQ, dK and dV as f64.
macro_rules! run_flash {
    ($a:expr, $t:ty, $acc:ty, $fwd:ident, $dq:ident, $dkdv:ident) => {
        run_flash!(
            $a,
            $t,
            $acc,
            $fwd,
            $dq,
            $dkdv,
            cuda_core_rows,
            cuda_core_keys
        )
    };
    ($a:expr, $t:ty, $acc:ty, $fwd:ident, $dq:ident, $dkdv:ident, $rows:ident, $keys:ident) => {{
        let a: &Attn = $a;
        let cv = |v: &[f64]| -> Vec<$t> { v.iter().map(|&x| <$t>::of(x)).collect() };
        let (q, k, v, dout) = (cv(&a.q), cv(&a.k), cv(&a.v), cv(&a.dout));
        let mask = a.mask.as_ref().map(|m| cv(m));
        let bg = a.b * a.g;
        let (r, t, tk, groups, scale) = (a.r as u32, a.t as u32, a.tk as u32, a.g as u32, a.scale);
        let mut out = vec![<$t>::of(0.0); q.len()];
        let mut lse = vec![<$acc>::of(0.0); bg * a.r];
        let (mut dq, mut dk, mut dv) = (
            vec![<$t>::of(0.0); q.len()],
            vec![<$t>::of(0.0); k.len()],
            vec![<$t>::of(0.0); v.len()],
        );
        let mut dsum = vec![<$acc>::of(0.0); bg * a.r];
        let (qp, kp, vp, gp) = (p(&q), p(&k), p(&v), p(&dout));
        let mp = mask.as_ref().map_or(0, |m| p(m));
        let (op, lp) = (pm(&mut out), pm(&mut lse));
        run!(
            $rows(bg, a.r, a.dh),
            $fwd(qp as _, kp as _, vp as _, mp as _, op as _, lp as _, r, t, tk, groups, scale)
        );
        let (dqp, dsp) = (pm(&mut dq), pm(&mut dsum));
        run!(
            $rows(bg, a.r, a.dh),
            $dq(
                qp as _, kp as _, vp as _, mp as _, op as _, gp as _, lp as _, dsp as _, dqp as _,
                r, t, tk, groups, scale
            )
        );
        let (dkp, dvp) = (pm(&mut dk), pm(&mut dv));
        run!(
            $keys(bg, a.tk, a.dh),
            $dkdv(
                qp as _, kp as _, vp as _, mp as _, gp as _, lp as _, dsp as _, dkp as _, dvp as _,
                r, t, tk, groups, scale
            )
        );
        let f = |v: &[$t]| -> Vec<f64> { v.iter().map(|&x| x.f64()).collect() };
        let fa = |v: &[$acc]| -> Vec<f64> { v.iter().map(|&x| x.f64()).collect() };
        [f(&out), fa(&lse), f(&dq), f(&dk), f(&dv)]
    }};
}

/// The CUDA-core kernels in f64 at the problem's head size (32 or 64, the sizes built in f64):
/// out, lse, dq, dk, dv.
fn flash_f64(a: &Attn) -> [Vec<f64>; 5] {
    match a.dh {
        32 => run_flash!(
            a,
            f64,
            f64,
            flash_fwd_f64_d32,
            flash_bwd_dq_f64_d32,
            flash_bwd_dkdv_f64_d32
        ),
        64 => run_flash!(
            a,
            f64,
            f64,
            flash_fwd_f64_d64,
            flash_bwd_dq_f64_d64,
            flash_bwd_dkdv_f64_d64
        ),
        dh => panic!("no f64 kernel at head size {dh}"),
    }
}

const NAMES: [&str; 5] = ["out", "lse", "dq", "dk", "dv"];

/// Grouped-query attention over more than one key tile (37 keys, tiles of 32), with a causal and
/// padding mask and without one; more than one query block (80 rows, blocks of 64) and many dK/dV
/// query tiles; head sizes 32 and 64. f64 against the written-out f64 reference.
#[test]
fn flash_attention_matches_the_written_out_reference_in_f64() {
    for (shape, masked) in [
        ((2, 2, 2, 5, 32, 32), true),
        ((2, 2, 2, 5, 32, 64), false),
        ((1, 2, 2, 40, 3, 64), true),
    ] {
        let a = Attn::new(9, shape, masked);
        let want = a.reference();
        let got = flash_f64(&a);
        for i in 0..5 {
            let d = max_diff(&got[i], &want[i]);
            assert!(
                d < 1e-10,
                "{shape:?} masked {masked}: {} differs by {d}",
                NAMES[i]
            );
        }
    }
}

#[test]
fn flash_attention_in_f32_stays_within_f32_rounding() {
    let a = Attn::new(10, (2, 2, 3, 7, 30, 64), true);
    let want = a.reference();
    let got = run_flash!(
        &a,
        f32,
        f32,
        flash_fwd_f32_d64,
        flash_bwd_dq_f32_d64,
        flash_bwd_dkdv_f32_d64
    );
    for i in 0..5 {
        let scale = want[i].iter().fold(0f64, |m, x| m.max(x.abs()));
        let d = max_diff(&got[i], &want[i]) / scale;
        assert!(d < 1e-5, "{} differs by {d} relative", NAMES[i]);
    }
}

/// `-inf` masks and logits: a key tile wholly at `-inf` before finite ones, and `-inf` logits
/// first in a thread's share of a row, add nothing instead of NaN.
#[test]
fn minus_infinity_adds_nothing() {
    let mut a = Attn::new(11, (2, 1, 2, 3, 34, 32), true);
    let (t, tk) = (a.t, a.tk);
    if let Some(m) = a.mask.as_mut() {
        for i in 0..t {
            for j in 0..32 {
                m[(t + i) * tk + j] = f64::NEG_INFINITY; // batch 1: the whole first key tile
            }
        }
    }
    let want = a.reference();
    let got = flash_f64(&a);
    for i in 0..5 {
        assert!(
            got[i].iter().all(|x| x.is_finite()),
            "{} has NaN or inf",
            NAMES[i]
        );
        let d = max_diff(&got[i], &want[i]);
        assert!(d < 1e-10, "{} differs by {d}", NAMES[i]);
    }

    // 600 logits over 256 threads: threads 0..39 meet their -inf before finite values
    let v = 600;
    let mut z = randn(&mut StdRng::seed_from_u64(12), 2 * v);
    for x in &mut z[..40] {
        *x = f64::NEG_INFINITY;
    }
    let labels = [50u32, 3];
    let o = lse_gather(&z, &labels, v, 1.0);
    for r in 0..2 {
        let (lp, ..) = lse_reference(&z[r * v..][..v], labels[r] as usize, 1.0);
        assert!(
            (o.logp[r] - lp).abs() < 1e-12,
            "row {r}: {} vs {lp}",
            o.logp[r]
        );
    }
}

/// The tensor-core forward (bf16 products, f32 sums, bf16 probabilities for P V) against the
/// f64 reference on the same bf16-rounded Q, K, V: within bf16's rounding of the probabilities.
/// 80 query rows (a full and a partial block of 64), 70 keys (a full and a partial tile of 64),
/// grouped heads, with the causal and padding mask and without.
#[test]
fn tensor_core_attention_forward_matches_the_reference_within_bf16_rounding() {
    for masked in [true, false] {
        let mut a = Attn::new(13, (2, 2, 2, 40, 30, 64), masked);
        let round = |v: &mut Vec<f64>| v.iter_mut().for_each(|x| *x = bf16::from_f64(*x).to_f64());
        round(&mut a.q);
        round(&mut a.k);
        round(&mut a.v);
        let want = a.reference();
        let cv = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
        let (q, k, v) = (cv(&a.q), cv(&a.k), cv(&a.v));
        let mask = a.mask.as_ref().map(|m| cv(m));
        let bg = a.b * a.g;
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; bg * a.r];
        let (qp, kp, vp) = (p(&q), p(&k), p(&v));
        let mp = mask.as_ref().map_or(0, |m| p(m));
        let (op, lp) = (pm(&mut out), pm(&mut lse));
        let (r, t, tk, g, scale) = (a.r as u32, a.t as u32, a.tk as u32, a.g as u32, a.scale);
        run!(
            flash_tc_rows(bg, a.r, 64),
            flash_fwd_tc_f32_d64(
                qp as _, kp as _, vp as _, mp as _, op as _, lp as _, r, t, tk, g, scale
            )
        );
        let out: Vec<f64> = out.iter().map(|&x| x as f64).collect();
        let lse: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
        let scale_o = want[0].iter().fold(0f64, |m, x| m.max(x.abs()));
        let d = max_diff(&out, &want[0]) / scale_o;
        assert!(d < 8e-3, "masked {masked}: output differs by {d} relative");
        assert!(d > 0.0, "bf16 probabilities should round somewhere");
        let dl = max_diff(&lse, &want[1]);
        assert!(dl < 1e-4, "masked {masked}: log-sum-exp differs by {dl}");
    }
}

/// The tensor-core backward (bf16 operands, f32 sums; P and dS rounded to bf16) after the
/// tensor-core forward, against the f64 reference on the same bf16-rounded inputs: 80 query rows
/// over 3 dK/dV query tiles of 32 and 2 dQ blocks of 64 (3 of 32 at head size 128), 70 keys
/// over 3 dQ key tiles of 32 and 2 dK/dV blocks of 64 (3 of 32), grouped heads, masked and not,
/// head sizes 64 and 128.
#[test]
fn tensor_core_attention_backward_matches_the_reference_within_bf16_rounding() {
    for (masked, dh) in [(true, 64), (false, 64), (true, 128), (false, 128)] {
        let mut a = Attn::new(14, (2, 2, 2, 40, 30, dh), masked);
        for x in [&mut a.q, &mut a.k, &mut a.v, &mut a.dout] {
            x.iter_mut().for_each(|x| *x = bf16::from_f64(*x).to_f64());
        }
        let want = a.reference();
        let got = match dh {
            64 => run_flash!(
                &a,
                f32,
                f32,
                flash_fwd_tc_f32_d64,
                flash_bwd_dq_tc_f32_d64,
                flash_bwd_dkdv_tc_f32_d64,
                flash_tc_rows,
                flash_tc_keys
            ),
            _ => run_flash!(
                &a,
                f32,
                f32,
                flash_fwd_tc_f32_d128,
                flash_bwd_dq_tc_f32_d128,
                flash_bwd_dkdv_tc_f32_d128,
                flash_tc_rows,
                flash_tc_keys
            ),
        };
        for i in [0, 2, 3, 4] {
            let scale = want[i].iter().fold(0f64, |m, x| m.max(x.abs()));
            let d = max_diff(&got[i], &want[i]) / scale;
            assert!(
                d < 5e-3,
                "head {dh}, masked {masked}: {} differs by {d} relative",
                NAMES[i]
            );
        }
    }
}

/// The attention backward kernels against central differences of the forward kernel itself
/// (f64): `d/dx sum(out * dout)` for entries of Q, K and V, masked, grouped heads.
#[test]
fn flash_attention_backward_matches_finite_differences() {
    let a = Attn::new(15, (1, 2, 2, 3, 34, 32), true);
    let got = flash_f64(&a);
    let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
        let b = Attn {
            q: q.to_vec(),
            k: k.to_vec(),
            v: v.to_vec(),
            mask: a.mask.clone(),
            dout: a.dout.clone(),
            ..a
        };
        let out = flash_f64(&b)[0].clone();
        out.iter().zip(&a.dout).map(|(o, g)| o * g).sum()
    };
    let h = 1e-5;
    let (nq, nk) = (a.q.len(), a.k.len());
    for (which, idx) in [
        (0, 0),
        (0, nq / 2 + 5),
        (0, nq - 1),
        (1, 3),
        (1, nk / 2),
        (1, nk - 7),
        (2, 1),
        (2, nk - 1),
    ] {
        let bump = |d: f64| {
            let (mut q, mut k, mut v) = (a.q.clone(), a.k.clone(), a.v.clone());
            [&mut q, &mut k, &mut v][which][idx] += d;
            loss(&q, &k, &v)
        };
        let fd = (bump(h) - bump(-h)) / (2.0 * h);
        let analytic = got[2 + which][idx];
        assert!(
            (analytic - fd).abs() < 1e-7,
            "{}[{idx}]: {analytic} vs {fd}",
            ["dq", "dk", "dv"][which]
        );
    }
}

/// bf16 inputs and outputs, on CUDA cores and on tensor cores: the f64 reference on the same
/// bf16 values, within bf16's rounding of the results.
#[test]
fn flash_attention_in_bf16_stays_within_bf16_rounding() {
    let mut a = Attn::new(16, (2, 2, 2, 40, 30, 64), true);
    for x in [&mut a.q, &mut a.k, &mut a.v, &mut a.dout] {
        x.iter_mut().for_each(|x| *x = bf16::from_f64(*x).to_f64());
    }
    let want = a.reference();
    let cuda_cores = run_flash!(
        &a,
        bf16,
        f32,
        flash_fwd_bf16_d64,
        flash_bwd_dq_bf16_d64,
        flash_bwd_dkdv_bf16_d64
    );
    let tensor_cores = run_flash!(
        &a,
        bf16,
        f32,
        flash_fwd_tc_bf16_d64,
        flash_bwd_dq_tc_bf16_d64,
        flash_bwd_dkdv_tc_bf16_d64,
        flash_tc_rows,
        flash_tc_keys
    );
    for (name, got, bar) in [
        ("CUDA cores", cuda_cores, 8e-3),
        ("tensor cores", tensor_cores, 8e-3),
    ] {
        for i in [0, 2, 3, 4] {
            let scale = want[i].iter().fold(0f64, |m, x| m.max(x.abs()));
            let d = max_diff(&got[i], &want[i]) / scale;
            assert!(d < bar, "{name}: {} differs by {d} relative", NAMES[i]);
        }
    }
}

/// The decoding attention kernels of one element type: per head size, and the combine kernel.
macro_rules! decode_ffi {
    ($t:ty, [$($decode:ident),*], $combine:ident) => {
        extern "C" {
            $(fn $decode(
                q: *const $t,
                k: *const $t,
                v: *const $t,
                mask: *const $t,
                limit: *const u32,
                part_o: *mut f32,
                part_ml: *mut f32,
                r: u32,
                tk: u32,
                groups: u32,
                kv_stride: u64,
                chunk: u32,
                scale: f64,
            );)*
            fn $combine(part_o: *const f32, part_ml: *const f32, out: *mut $t, splits: u32, dh: u32);
        }
    };
}
decode_ffi!(
    f32,
    [flash_decode_f32_d32, flash_decode_f32_d64],
    flash_decode_combine_f32
);
decode_ffi!(bf16, [flash_decode_bf16_d128], flash_decode_combine_bf16);

/// A decoding step's attention: `b` rows of `g` KV groups with `r` query heads each, over keys
/// in a cache buffer of capacity `cap` (`kv_stride = cap * dh`) of which the first `tk` count, or
/// those up to `limit`; an additive `[b, tk]` mask with padding.
struct Decode {
    b: usize,
    g: usize,
    r: usize,
    tk: usize,
    cap: usize,
    dh: usize,
    limit: Option<u32>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    mask: Option<Vec<f64>>,
    scale: f64,
}

impl Decode {
    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: u64,
        (b, g, r, tk, cap, dh): (usize, usize, usize, usize, usize, usize),
        masked: bool,
        limit: Option<u32>,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let q = randn(&mut rng, b * g * r * dh);
        // Past the counted keys, NaN: the kernel must not read them.
        let n = limit.map_or(tk, |l| tk.min(l as usize + 1));
        let kv = |rng: &mut StdRng| -> Vec<f64> {
            let mut x = randn(rng, b * g * cap * dh);
            for (i, x) in x.iter_mut().enumerate() {
                if (i / dh) % cap >= n {
                    *x = f64::NAN;
                }
            }
            x
        };
        let (k, v) = (kv(&mut rng), kv(&mut rng));
        // Left padding of a different length in each row (never the whole row), at -1e9 as the
        // model masks.
        let mask = masked.then(|| {
            (0..b * tk)
                .map(|i| {
                    if i % tk < (3 * (i / tk)).min(tk - 1) {
                        -1e9
                    } else {
                        0.0
                    }
                })
                .collect()
        });
        Decode {
            b,
            g,
            r,
            tk,
            cap,
            dh,
            limit,
            q,
            k,
            v,
            mask,
            scale: 1.0 / (dh as f64).sqrt(),
        }
    }

    /// The output `[b * g * r, dh]` written out in f64 from `cv`-rounded inputs.
    fn reference(&self, cv: impl Fn(f64) -> f64) -> Vec<f64> {
        let (dh, n) = (
            self.dh,
            self.limit.map_or(self.tk, |l| self.tk.min(l as usize + 1)),
        );
        let mut out = vec![0.0; self.b * self.g * self.r * dh];
        for bg in 0..self.b * self.g {
            for r in 0..self.r {
                let qr: Vec<f64> = (0..dh)
                    .map(|d| cv(self.q[(bg * self.r + r) * dh + d]))
                    .collect();
                let key = |j: usize, x: &[f64], d: usize| cv(x[(bg * self.cap + j) * dh + d]);
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let dot: f64 = (0..dh).map(|d| qr[d] * key(j, &self.k, d)).sum();
                        let m = self
                            .mask
                            .as_ref()
                            .map_or(0.0, |m| cv(m[(bg / self.g) * self.tk + j]));
                        dot * self.scale + m
                    })
                    .collect();
                let mx = s.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..dh {
                    out[(bg * self.r + r) * dh + d] =
                        (0..n).map(|j| e[j] * key(j, &self.v, d)).sum::<f64>() / sum;
                }
            }
        }
        out
    }
}

/// Runs the two decoding kernels on `a` in `$t` and returns the output as f64.
macro_rules! run_decode {
    ($a:expr, $t:ty, $decode:ident, $combine:ident) => {{
        let a: &Decode = $a;
        let cv = |v: &[f64]| -> Vec<$t> { v.iter().map(|&x| <$t>::of(x)).collect() };
        let (q, k, v) = (cv(&a.q), cv(&a.k), cv(&a.v));
        let mask = a.mask.as_ref().map(|m| cv(m));
        let limit = a.limit.map(|l| vec![l]);
        let bg = a.b * a.g;
        let (l, chunk) = preftune_kernels_cuda::flash_decode(bg, a.tk);
        let splits = l.grid as usize;
        let mut part_o = vec![f32::NAN; bg * a.r * splits * a.dh];
        let mut part_ml = vec![f32::NAN; bg * a.r * splits * 2];
        let mut out = vec![<$t>::of(f64::NAN); bg * a.r * a.dh];
        let (qp, kp, vp) = (p(&q), p(&k), p(&v));
        let mp = mask.as_ref().map_or(0, |m| p(m));
        let lp = limit.as_ref().map_or(0, |m| p(m));
        let (pop, pmp) = (pm(&mut part_o), pm(&mut part_ml));
        let (r, tk, g, stride) = (a.r as u32, a.tk as u32, a.g as u32, (a.cap * a.dh) as u64);
        run!(
            l,
            $decode(
                qp as _, kp as _, vp as _, mp as _, lp as _, pop as _, pmp as _, r, tk, g, stride,
                chunk, a.scale
            )
        );
        let op = pm(&mut out);
        run!(
            preftune_kernels_cuda::flash_decode_combine(bg * a.r),
            $combine(pop as _, pmp as _, op as _, splits as u32, a.dh as u32)
        );
        (out.iter().map(|&x| x.f64()).collect::<Vec<f64>>(), splits)
    }};
}

/// A decoding step's attention in f32 against the f64 reference: a small batch whose keys split
/// over several blocks (one chunk partly past the keys), a batch of one chunk, a group of one
/// head and one of eight, padding masks, and keys read from a larger cache buffer in place, up to
/// `limit` (the keys past it are NaN, so reading one would show).
#[test]
fn decoding_attention_matches_the_written_out_reference() {
    for (shape, masked, limit) in [
        ((2, 3, 3, 150, 160, 64), true, None),
        ((1, 2, 8, 300, 300, 64), true, Some(211)),
        ((40, 8, 1, 70, 90, 64), false, None),
        ((3, 1, 4, 5, 5, 32), true, None),
    ] {
        let a = Decode::new(12, shape, masked, limit);
        let want = a.reference(|x| x as f32 as f64);
        let (got, splits) = match a.dh {
            32 => run_decode!(&a, f32, flash_decode_f32_d32, flash_decode_combine_f32),
            _ => run_decode!(&a, f32, flash_decode_f32_d64, flash_decode_combine_f32),
        };
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        let d = max_diff(&got, &want) / scale;
        assert!(
            d < 1e-5,
            "{shape:?}: differs by {d} relative ({splits} splits)"
        );
        if shape.0 * shape.1 < 10 && shape.3 > 128 {
            assert!(splits > 1, "{shape:?}: keys in one block");
        }
    }
}

/// bf16 inputs (a bf16 KV cache), head size 128, f32 sums: within bf16's rounding of the output.
#[test]
fn decoding_attention_in_bf16() {
    let a = Decode::new(13, (2, 2, 4, 200, 256, 128), true, Some(180));
    let want = a.reference(|x| bf16::from_f64(x).to_f64());
    let (got, _) = run_decode!(&a, bf16, flash_decode_bf16_d128, flash_decode_combine_bf16);
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    let d = max_diff(&got, &want) / scale;
    assert!(d < 8e-3, "differs by {d} relative");
}
