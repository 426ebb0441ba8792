//! The fast LoRA products against the f64 reference on random awkward shapes, fused groups
//! against their members one by one, the config's errors, the optimizers and schedules.

use llama_core::{Kernel, SplitMix64};
use llama_ops::GatedAct;
use llama_ops::{Activations, Weight};
use llama_peft::fused::{
    group_backward, group_forward, mlp_backward, mlp_forward, GroupMode, MlpProjections, Projection,
};
use llama_peft::reference::{lora_backward, lora_forward};
use llama_peft::{
    clip_grad_norm, Dropout, LoraConfig, LoraInit, LoraPair, Optimizer, OptimizerKind, PeftError,
    Schedule, ScheduleKind, Target,
};
use proptest::prelude::*;

fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
        .collect()
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
    let den: f64 = b.iter().map(|b| b * b).sum();
    (num / den.max(1e-30)).sqrt()
}

/// A pair with non-zero B (a fresh one has B = 0, which would hide mistakes in B's paths).
fn random_pair(rng: &mut SplitMix64, r: usize, k: usize, n: usize, s: f32) -> LoraPair {
    LoraPair::from_parts(random(rng, r * k), random(rng, n * r), r, k, n, s).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn projection_forward_and_backward_match_the_reference(
        m in 1usize..19, k in 1usize..41, n in 1usize..37, r in 1usize..9, seed in any::<u64>(), s in 0.1f32..4.0,
        reference in any::<bool>(), fused in any::<bool>(),
    ) {
        // Every kernel and path of the group (fast or reference, fused or plain) holds to the formula.
        let kernel = if reference { Kernel::Reference } else { Kernel::Fast };
        let mode = GroupMode { kernel, fused, activations: Activations::F32 };
        let mut rng = SplitMix64::new(seed);
        let (x, w, dy) = (random(&mut rng, m * k), random(&mut rng, n * k), random(&mut rng, m * n));
        let pair = random_pair(&mut rng, r, k, n, s);
        let base = Weight::dense(w.clone(), n, k).unwrap();
        let p = Projection { base: &base, lora: Some(&pair) };
        let mut y = vec![0.0; m * n];
        let saved = group_forward(&[p], &x, vec![&mut y], mode, None).unwrap();
        let dims = (m, k, n, r);
        let expected = lora_forward(&to_f64(&x), &to_f64(&w), &to_f64(&pair.a), &to_f64(&pair.b), dims, s as f64);
        prop_assert!(rel_err(&y, &expected) < 1e-5, "forward {}", rel_err(&y, &expected));
        let mut dx = vec![0.0; m * k];
        let mut grads = pair.zero_grads();
        group_backward(&[p], mode, &x, &saved, &[&dy], &mut dx, &mut [Some(&mut grads)]).unwrap();
        let (rdx, rda, rdb) = lora_backward(&to_f64(&x), &to_f64(&w), &to_f64(&pair.a), &to_f64(&pair.b), &to_f64(&dy), dims, s as f64);
        for (what, got, want) in [("dx", &dx, &rdx), ("dA", &grads.a, &rda), ("dB", &grads.b, &rdb)] {
            prop_assert!(rel_err(got, want) < 1e-5, "{what} {}", rel_err(got, want));
        }
    }

    #[test]
    fn a_group_equals_its_members_one_by_one(m in 1usize..9, k in 1usize..33, seed in any::<u64>()) {
        let fast = GroupMode::fast(Activations::F32);
        let mut rng = SplitMix64::new(seed);
        let widths = [k + 3, 5, 5];
        let bases: Vec<Weight> = widths.iter().map(|&n| Weight::dense(random(&mut rng, n * k), n, k).unwrap()).collect();
        let pairs: Vec<LoraPair> = widths.iter().map(|&n| random_pair(&mut rng, 3, k, n, 0.5)).collect();
        // the middle projection has no LoRA, as when target_modules leaves one out
        let loras = [Some(&pairs[0]), None, Some(&pairs[2])];
        let projs: Vec<Projection> = bases.iter().zip(loras).map(|(base, lora)| Projection { base, lora }).collect();
        let x = random(&mut rng, m * k);
        let mut outs: Vec<Vec<f32>> = widths.iter().map(|&n| vec![0.0; m * n]).collect();
        let saved = {
            let [a, b, c] = &mut outs[..] else { unreachable!() };
            group_forward(&projs, &x, vec![a, b, c], fast, None).unwrap()
        };
        let dys: Vec<Vec<f32>> = widths.iter().map(|&n| random(&mut rng, m * n)).collect();
        let mut dx = vec![0.0; m * k];
        let mut grads: Vec<_> = pairs.iter().map(LoraPair::zero_grads).collect();
        {
            let [g0, _, g2] = &mut grads[..] else { unreachable!() };
            let dy_refs: Vec<&[f32]> = dys.iter().map(|d| &d[..]).collect();
            group_backward(&projs, fast, &x, &saved, &dy_refs, &mut dx, &mut [Some(g0), None, Some(g2)]).unwrap();
        }
        let mut dx_sum = vec![0.0; m * k];
        for (i, p) in projs.iter().enumerate() {
            let mut y = vec![0.0; m * widths[i]];
            let s = group_forward(&[*p], &x, vec![&mut y], fast, None).unwrap();
            prop_assert_eq!(&y, &outs[i]);
            let mut part = vec![0.0; m * k];
            let mut g = pairs[i].zero_grads();
            group_backward(&[*p], fast, &x, &s, &[&dys[i]], &mut part, &mut [Some(&mut g)]).unwrap();
            dx_sum.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
            if p.lora.is_some() {
                prop_assert_eq!(&g, &grads[i]);
            }
        }
        prop_assert!(rel_err(&dx, &to_f64(&dx_sum)) < 1e-6);
    }
}

#[test]
fn a_tape_only_mlp_forward_feeds_the_same_backward() {
    // A recomputed forward (gradient checkpointing) skips the output; its backward must equal
    // the full forward's, with dropout drawing the same masks from the same seed.
    let mut rng = SplitMix64::new(11);
    let (m, c, f, r) = (7, 24, 37, 4);
    let shapes = [(f, c), (f, c), (c, f)];
    let bases: Vec<Weight> = shapes
        .iter()
        .map(|&(n, k)| Weight::dense(random(&mut rng, n * k), n, k).unwrap())
        .collect();
    let pairs: Vec<LoraPair> = shapes
        .iter()
        .map(|&(n, k)| random_pair(&mut rng, r, k, n, 0.5))
        .collect();
    let [gate, up, down] = [0, 1, 2].map(|i| Projection {
        base: &bases[i],
        lora: Some(&pairs[i]),
    });
    let mlp = MlpProjections {
        gate,
        up,
        down,
        act: GatedAct::Silu,
        act_kernel: Kernel::Fast,
    };
    let (x, dout) = (random(&mut rng, m * c), random(&mut rng, m * c));
    let mode = GroupMode::fast(Activations::F32);
    let run = |output: bool| {
        let mut dropout = Dropout {
            p: 0.25,
            rng: SplitMix64::new(5),
        };
        let (out, saved) = mlp_forward(mlp, &x, mode, Some(&mut dropout), output).unwrap();
        let mut grads: Vec<_> = pairs.iter().map(LoraPair::zero_grads).collect();
        let [g0, g1, g2] = &mut grads[..] else {
            unreachable!()
        };
        let dx = mlp_backward(mlp, mode, &x, &saved, &dout, [Some(g0), Some(g1), Some(g2)]);
        (out, dx.unwrap(), grads)
    };
    let (full_out, full_dx, full_grads) = run(true);
    let (tape_out, tape_dx, tape_grads) = run(false);
    assert_eq!(full_out.map(|o| o.len()), Some(m * c));
    assert!(tape_out.is_none());
    assert_eq!(full_dx, tape_dx);
    assert_eq!(full_grads, tape_grads);
    assert!(full_grads[2].a.iter().any(|&g| g != 0.0));
}

#[test]
fn dropout_masks_the_lora_input_and_its_gradient() {
    let mut rng = SplitMix64::new(7);
    let (m, k, n, r) = (6, 40, 9, 4);
    let pair = random_pair(&mut rng, r, k, n, 1.0);
    let x = random(&mut rng, m * k);
    let dy = random(&mut rng, m * n);
    let mut y = vec![0.0; m * n];
    let mut dropout = Dropout {
        p: 0.5,
        rng: SplitMix64::new(1),
    };
    let saved = pair.forward_add(&x, &mut y, Some(&mut dropout)).unwrap();
    // The same mask drawn again, applied by hand: x̃ = x ⊙ mask, y = s·(x̃·Aᵀ)·Bᵀ.
    let mut again = Dropout {
        p: 0.5,
        rng: SplitMix64::new(1),
    };
    let mask: Vec<f32> = (0..m * k)
        .map(|_| if again.rng.next_f64() < 0.5 { 0.0 } else { 2.0 })
        .collect();
    assert!(mask.contains(&0.0) && mask.contains(&2.0));
    let dropped: Vec<f32> = x.iter().zip(&mask).map(|(x, m)| x * m).collect();
    let mut y_plain = vec![0.0; m * n];
    let plain = pair.forward_add(&dropped, &mut y_plain, None).unwrap();
    assert!(rel_err(&y, &to_f64(&y_plain)) < 1e-6);
    let (mut dx, mut dx_plain) = (vec![0.0; m * k], vec![0.0; m * k]);
    let (mut g, mut g_plain) = (pair.zero_grads(), pair.zero_grads());
    pair.backward(&x, &saved, &dy, Some(&mut dx), &mut g)
        .unwrap();
    pair.backward(&dropped, &plain, &dy, Some(&mut dx_plain), &mut g_plain)
        .unwrap();
    let masked: Vec<f32> = dx_plain.iter().zip(&mask).map(|(d, m)| d * m).collect();
    assert!(rel_err(&dx, &to_f64(&masked)) < 1e-6);
    assert!(rel_err(&g.a, &to_f64(&g_plain.a)) < 1e-6 && rel_err(&g.b, &to_f64(&g_plain.b)) < 1e-6);
    // The reference kernel draws the same mask from the same generator and agrees.
    let mut y_ref = vec![0.0; m * n];
    let mut same = Dropout {
        p: 0.5,
        rng: SplitMix64::new(1),
    };
    let saved_ref = pair
        .forward_add_with(Kernel::Reference, &x, &mut y_ref, Some(&mut same))
        .unwrap();
    assert!(rel_err(&y_ref, &to_f64(&y)) < 1e-6);
    let (mut dx_ref, mut g_ref) = (vec![0.0; m * k], pair.zero_grads());
    pair.backward_with(
        Kernel::Reference,
        &x,
        &saved_ref,
        &dy,
        Some(&mut dx_ref),
        &mut g_ref,
    )
    .unwrap();
    assert!(rel_err(&dx_ref, &to_f64(&dx)) < 1e-6);
    assert!(rel_err(&g_ref.a, &to_f64(&g.a)) < 1e-6 && rel_err(&g_ref.b, &to_f64(&g.b)) < 1e-6);
}

#[test]
fn init_follows_peft() {
    let mut rng = SplitMix64::new(3);
    let k = 256;
    let kaiming = LoraPair::init(8, k, 32, 2.0, LoraInit::Kaiming, &mut rng);
    let bound = 1.0 / (k as f32).sqrt();
    assert!(kaiming.a.iter().all(|v| v.abs() <= bound));
    assert!(
        kaiming.a.iter().any(|v| v.abs() > 0.9 * bound),
        "fills the whole range"
    );
    assert!(kaiming.b.iter().all(|&v| v == 0.0));
    let gaussian = LoraPair::init(8, k, 32, 2.0, LoraInit::Gaussian, &mut rng);
    let var = gaussian.a.iter().map(|v| (v * v) as f64).sum::<f64>() / gaussian.a.len() as f64;
    assert!(
        (var.sqrt() - 1.0 / 8.0).abs() < 0.01,
        "std {} ≠ 1/r",
        var.sqrt()
    );
}

#[test]
fn scaling_is_alpha_over_r_or_sqrt_r() {
    let mut c = LoraConfig::new(16, 32.0);
    assert_eq!(c.scaling(), 2.0);
    c.use_rslora = true;
    assert_eq!(c.scaling(), 8.0);
}

#[test]
fn invalid_settings_name_their_argument() {
    let arg_of = |e: PeftError| match e {
        PeftError::Config { arg, .. } => arg,
        other => panic!("not a config error: {other}"),
    };
    let check = |edit: &dyn Fn(&mut LoraConfig), arg: &str| {
        let mut c = LoraConfig::new(8, 16.0);
        edit(&mut c);
        assert_eq!(arg_of(c.validate(4).unwrap_err()), arg);
    };
    check(&|c| c.r = 0, "r");
    check(&|c| c.lora_alpha = -1.0, "lora_alpha");
    check(&|c| c.lora_dropout = 1.0, "lora_dropout");
    check(&|c| c.bias = "all".into(), "bias");
    check(&|c| c.target_modules.clear(), "target_modules");
    check(
        &|c| c.layers_to_transform = Some(vec![4]),
        "layers_to_transform",
    );
    assert_eq!(
        arg_of(LoraConfig::parse_targets(&["q_proj", "qkv"]).unwrap_err()),
        "target_modules"
    );
    assert_eq!(
        LoraConfig::parse_targets(&["all-linear"]).unwrap(),
        Target::ALL.to_vec()
    );
    assert_eq!(
        arg_of(LoraConfig::parse_init("orthogonal").unwrap_err()),
        "init_lora_weights"
    );
    assert_eq!(
        arg_of(LoraConfig::parse_modules_to_save(&["norm"]).unwrap_err()),
        "modules_to_save"
    );
    assert_eq!(
        arg_of("step".parse::<ScheduleKind>().unwrap_err()),
        "lr_scheduler"
    );
    let adam = |betas, eps, weight_decay| {
        Optimizer::new(
            OptimizerKind::AdamW {
                betas,
                eps,
                weight_decay,
            },
            &[1],
        )
        .unwrap_err()
    };
    assert_eq!(arg_of(adam((1.0, 0.999), 1e-8, 0.0)), "betas");
    assert_eq!(arg_of(adam((0.9, 0.999), 0.0, 0.0)), "eps");
    assert_eq!(arg_of(adam((0.9, 0.999), 1e-8, -1.0)), "weight_decay");
}

#[test]
fn adapter_config_json_round_trips() {
    let mut c = LoraConfig::new(4, 8.0);
    c.target_modules = vec![Target::QProj, Target::VProj];
    c.use_rslora = true;
    c.layers_to_transform = Some(vec![0, 2]);
    c.init_lora_weights = LoraInit::Gaussian;
    let json = c.to_peft_json(Some("base"));
    let mut back = LoraConfig::from_peft_json(&json).unwrap();
    back.random_state = c.random_state;
    assert_eq!(back, c);
    let mut dora = json.clone();
    dora["use_dora"] = true.into();
    assert!(matches!(
        LoraConfig::from_peft_json(&dora),
        Err(PeftError::Config {
            arg: "use_dora",
            ..
        })
    ));
}

/// AdamW against the update written out in f64 for two steps.
#[test]
fn adamw_follows_torch_arithmetic() {
    let (lr, b1, b2, eps, wd) = (0.01f64, 0.9, 0.999, 1e-8, 0.1);
    let mut opt = Optimizer::new(
        OptimizerKind::AdamW {
            betas: (b1 as f32, b2 as f32),
            eps: eps as f32,
            weight_decay: wd as f32,
        },
        &[2],
    )
    .unwrap();
    let mut p = vec![0.5f32, -1.0];
    let grads = [[0.3f32, -0.2], [0.1, 0.4]];
    let (mut pe, mut m, mut v) = ([0.5f64, -1.0], [0.0f64; 2], [0.0f64; 2]);
    for (t, g) in grads.iter().enumerate() {
        opt.step(vec![&mut p], &[g], lr as f32).unwrap();
        let t = t as i32 + 1;
        for i in 0..2 {
            let gi = g[i] as f64;
            pe[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let mhat = m[i] / (1.0 - b1.powi(t));
            let denom = v[i].sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            pe[i] -= lr * mhat / denom;
        }
    }
    assert!(rel_err(&p, &pe) < 1e-6, "{p:?} vs {pe:?}");
}

#[test]
fn sgd_is_a_plain_step() {
    let mut opt = Optimizer::new(OptimizerKind::Sgd { weight_decay: 0.0 }, &[2]).unwrap();
    let mut p = vec![1.0f32, 2.0];
    opt.step(vec![&mut p], &[&[0.5, -0.5]], 0.1).unwrap();
    assert_eq!(p, vec![0.95, 2.05]);
}

#[test]
fn schedules_follow_hf() {
    let s = |kind| Schedule {
        kind,
        lr: 1.0,
        warmup: 2,
        total: 10,
    };
    for kind in [
        ScheduleKind::Constant,
        ScheduleKind::Linear,
        ScheduleKind::Cosine,
    ] {
        assert_eq!(s(kind).lr_at(0), 0.0);
        assert_eq!(s(kind).lr_at(1), 0.5);
        assert_eq!(s(kind).lr_at(2), 1.0);
    }
    assert_eq!(s(ScheduleKind::Constant).lr_at(9), 1.0);
    assert!((s(ScheduleKind::Linear).lr_at(6) - 0.5).abs() < 1e-6);
    assert!((s(ScheduleKind::Cosine).lr_at(6) - 0.5).abs() < 1e-6);
    assert_eq!(s(ScheduleKind::Linear).lr_at(10), 0.0);
}

#[test]
fn clipping_scales_to_the_max_norm() {
    let (mut a, mut b) = (vec![3.0f32], vec![4.0f32]);
    let norm = clip_grad_norm(vec![&mut a, &mut b], 1.0);
    assert_eq!(norm, 5.0);
    assert!(((a[0] * a[0] + b[0] * b[0]).sqrt() - 1.0).abs() < 1e-5);
    let mut c = vec![0.1f32];
    clip_grad_norm(vec![&mut c], 1.0);
    assert_eq!(c, vec![0.1]);
}
