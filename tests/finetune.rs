//! LoRA training flows on every fixture model: the loss falls, a resumed run continues
//! exactly, QLoRA's gradients stay with the dequantised-f32 ones, merging and unmerging, and
//! the merged model written as an HF directory loads back to the same logits.

mod common;

use common::*;
use llama_core::{DType, SplitMix64};
use llama_fixtures::assert_close;
use llama_model::{save_hf, LlamaModel, RunPlan, StepOptions, TrainConfig, Trainer};
use llama_peft::{LoraAdapter, LoraConfig};

#[test]
fn training_lowers_the_loss() {
    for dir in model_dirs() {
        let mut model = load_model(&dir);
        fresh_adapter(&mut model, 0.0);
        let data = pattern_batches(&model, 1, 8, 2);
        let mut trainer = Trainer::new(&model, train_config(24, 1)).unwrap();
        let plan = RunPlan {
            total_steps: 24,
            shuffle: true,
            seed: 5,
            save_every: None,
            out_dir: None,
        };
        let mut losses = Vec::new();
        trainer
            .run(&mut model, &data, &plan, &mut |r| {
                losses.push(r.loss);
                Ok(())
            })
            .unwrap();
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(
            last < 0.5 * first,
            "{}: loss {first} → {last}",
            dir.display()
        );
    }
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_one_exactly() {
    for dir in model_dirs() {
        let out = scratch("resume");
        let plan = |total| RunPlan {
            total_steps: total,
            shuffle: true,
            seed: 3,
            save_every: Some(3),
            out_dir: Some(out.clone()),
        };
        let config = |total| TrainConfig {
            gradient_checkpointing: true,
            ..train_config(total, 2)
        };
        // uninterrupted: 6 steps (checkpoint-3 written on the way)
        let mut model = load_model(&dir);
        fresh_adapter(&mut model, 0.1);
        let data = pattern_batches(&model, 2, 7, 2);
        let mut trainer = Trainer::new(&model, config(6)).unwrap();
        let mut whole = Vec::new();
        trainer
            .run(&mut model, &data, &plan(6), &mut |r| {
                whole.push(r.loss);
                Ok(())
            })
            .unwrap();
        // resumed from step 3 on a freshly loaded model
        let mut resumed_model = load_model(&dir);
        let mut resumed =
            Trainer::resume(&mut resumed_model, &out.join("checkpoint-3"), config(6)).unwrap();
        assert_eq!(resumed.steps_done(), 3);
        let mut tail = Vec::new();
        resumed
            .run(&mut resumed_model, &data, &plan(6), &mut |r| {
                tail.push(r.loss);
                Ok(())
            })
            .unwrap();
        assert_eq!(tail, whole[3..], "{}", dir.display());
        assert_eq!(
            resumed_model.adapter(),
            model.adapter(),
            "{}",
            dir.display()
        );
        std::fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn qlora_gradients_match_the_dequantised_model() {
    for dir in model_dirs() {
        let mut nf4 = load_model(&dir);
        nf4.convert_projections(DType::Nf4).unwrap();
        fresh_adapter(&mut nf4, 0.0);
        randomise(&mut nf4);
        // the same NF4 values, dequantised to dense f32
        let mut dense = load_model(&dir);
        dense.convert_projections(DType::Nf4).unwrap();
        dense.convert_projections(DType::F32).unwrap();
        dense.set_adapter(nf4.adapter().cloned()).unwrap();
        let b = &pattern_batches(&nf4, 4, 2, 2)[0];
        let (q, d) = (grads_of(&mut nf4, b), grads_of(&mut dense, b));
        assert_close(
            &format!("{} QLoRA grads", dir.display()),
            &q,
            &d,
            &[q.len()],
            1e-5,
        );
        // and NF4 is a real change of the weights: the base model's gradients differ
        let mut base = load_model(&dir);
        base.set_adapter(nf4.adapter().cloned()).unwrap();
        let f = grads_of(&mut base, b);
        assert!(
            llama_fixtures::rel_error(&q, &f) > 1e-4,
            "{}",
            dir.display()
        );
    }
}

#[test]
fn merging_keeps_the_logits_and_unmerging_restores_the_weights() {
    for dir in model_dirs() {
        let mut model = load_model(&dir);
        fresh_adapter(&mut model, 0.0);
        randomise(&mut model);
        let ids: Vec<u32> = (0..10)
            .map(|i| (i * 7 % model.config.vocab_size) as u32)
            .collect();
        let with_adapter = model.forward(&ids, 1).unwrap();
        let base_q = model.layers[0]
            .self_attn
            .q_proj
            .to_f32()
            .unwrap()
            .into_owned();
        let adapter = model.merge_adapter().unwrap().unwrap();
        let merged = model.forward(&ids, 1).unwrap();
        assert_close(
            "merged logits",
            &merged,
            &with_adapter,
            &[merged.len()],
            1e-5,
        );
        let out = scratch("merged");
        save_hf(&model, None, &out, DType::F32).unwrap();
        let reloaded = load_model(&out).forward(&ids, 1).unwrap();
        assert_close(
            "reloaded merged logits",
            &reloaded,
            &with_adapter,
            &[merged.len()],
            1e-5,
        );
        model.unmerge_adapter(adapter).unwrap();
        let q = model.layers[0].self_attn.q_proj.to_f32().unwrap();
        assert_close("unmerged q_proj", &q, &base_q, &[q.len()], 1e-5);
        let again = model.forward(&ids, 1).unwrap();
        assert_close(
            "unmerged logits",
            &again,
            &with_adapter,
            &[again.len()],
            1e-5,
        );
        std::fs::remove_dir_all(&out).ok();
    }
}

/// An adapter that also trains embed_tokens and lm_head (peft's modules_to_save).
fn adapter_with_modules(model: &mut LlamaModel) {
    let mut config = LoraConfig::new(4, 8.0);
    config.modules_to_save =
        LoraConfig::parse_modules_to_save(&["embed_tokens", "lm_head"]).unwrap();
    model.get_peft_model(config).unwrap();
    randomise_pairs(model);
}

/// Random non-zero pairs (the modules keep the base's values).
fn randomise_pairs(model: &mut LlamaModel) {
    let mut rng = SplitMix64::new(13);
    let mut adapter = model.adapter().unwrap().clone();
    for layer in &mut adapter.layers {
        for p in layer.0.iter_mut().flatten() {
            for v in p.a.iter_mut().chain(p.b.iter_mut()) {
                *v = (rng.next_f64() as f32 - 0.5) * 0.2;
            }
        }
    }
    model.set_adapter(Some(adapter)).unwrap();
}

#[test]
fn saved_module_gradients_match_finite_differences() {
    for dir in model_dirs() {
        let mut model = load_model(&dir);
        adapter_with_modules(&mut model);
        let b = pattern_batches(&model, 6, 2, 2).remove(0);
        let mut grads = model.adapter().unwrap().zero_grads();
        let options = StepOptions {
            gradient_checkpointing: true,
            grad_scale: 1.0,
            dropout_seed: None,
        };
        model.loss_and_grads(&b, &mut grads, &options).unwrap();
        for (m, g) in grads.modules.iter().enumerate() {
            let g = g.as_ref().expect("both modules are trained");
            // the three largest entries, each against a central difference of the loss
            let mut order: Vec<usize> = (0..g.len()).collect();
            order.sort_by(|&i, &j| g[j].abs().total_cmp(&g[i].abs()));
            for &at in &order[..3] {
                let h = 1e-2f32;
                let loss_at = |delta: f32| {
                    let mut adapter = model.adapter().unwrap().clone();
                    let module = [
                        &mut adapter.modules.embed_tokens,
                        &mut adapter.modules.lm_head,
                    ][m]
                        .as_mut()
                        .unwrap();
                    let llama_ops::Weight::Dense { data, .. } = module else {
                        panic!("modules are dense f32")
                    };
                    data[at] += delta;
                    let mut probe = load_model(&dir);
                    probe.set_adapter(Some(adapter)).unwrap();
                    probe.loss(&b.ids, &b.labels, b.batch).unwrap() as f64
                };
                let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
                let rel = (numeric - g[at] as f64).abs() / (g[at] as f64).abs();
                assert!(
                    rel < 0.05,
                    "{} module {m} entry {at}: analytic {} numeric {numeric}",
                    dir.display(),
                    g[at]
                );
            }
        }
    }
}

#[test]
fn saved_modules_round_trip_and_merge() {
    for dir in model_dirs() {
        let mut model = load_model(&dir);
        adapter_with_modules(&mut model);
        // move the modules away from the base so that applying them shows
        let data = pattern_batches(&model, 7, 4, 2);
        let mut trainer = Trainer::new(&model, train_config(4, 1)).unwrap();
        let plan = RunPlan {
            total_steps: 4,
            shuffle: false,
            seed: 1,
            save_every: None,
            out_dir: None,
        };
        trainer
            .run(&mut model, &data, &plan, &mut |_| Ok(()))
            .unwrap();
        let ids: Vec<u32> = data[0].ids.clone();
        let with = model.forward(&ids, data[0].batch).unwrap();
        let out = scratch("modules");
        model.adapter().unwrap().save(&out, None).unwrap();
        let mut fresh = load_model(&dir);
        let base = fresh.forward(&ids, data[0].batch).unwrap();
        assert!(
            llama_fixtures::rel_error(&base, &with) > 1e-3,
            "{}",
            dir.display()
        );
        fresh
            .set_adapter(Some(LoraAdapter::load(&out, fresh.dims()).unwrap()))
            .unwrap();
        assert_eq!(fresh.adapter(), model.adapter());
        let adapter = fresh.merge_adapter().unwrap().unwrap();
        let merged = fresh.forward(&ids, data[0].batch).unwrap();
        assert_close("merged with modules", &merged, &with, &[with.len()], 1e-5);
        fresh.unmerge_adapter(adapter).unwrap();
        fresh.set_adapter(None).unwrap();
        let again = fresh.forward(&ids, data[0].batch).unwrap();
        assert_close("unmerged base", &again, &base, &[base.len()], 1e-5);
        std::fs::remove_dir_all(&out).ok();
    }
}
