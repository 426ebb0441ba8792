//! The model on the GPU (bf16) against the CPU (f32) for every fixture model: the logits of a
//! prefill and of decode steps within bf16 tolerance, and the same greedy ids. Skipped, and
//! counted, without a CUDA device.

use llama_fixtures::{check_close, cuda_or_skip, fixtures_dir, Fixture};
use llama_model::{generate, load, CudaLlamaModel, Decoder, GenerationConfig, Precision};

#[test]
fn gpu_model_matches_the_cpu_model() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let dir = fixtures_dir().join("models");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("config.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let mut cpu = load(&dir.join(&name), Precision::Exact, &mut |_, _| {})
            .unwrap()
            .model;
        let mut cuda = CudaLlamaModel::upload(&gpu, &cpu).unwrap();
        let fixture = Fixture::open(&format!("models/{name}/reference"));
        let (ids, shape) = fixture.i64("input_ids");
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let (batch, vocab) = (shape[0], cpu.config.vocab_size);
        // Prefill everything but the last position, then one decode step.
        let seq = shape[1];
        let cut = |t0: usize, t1: usize| -> Vec<u32> {
            ids.chunks_exact(seq)
                .flat_map(|s| s[t0..t1].to_vec())
                .collect()
        };
        let mut cpu_cache = Decoder::new_cache(&cpu, batch, seq, None).unwrap();
        let mut gpu_cache = cuda.new_cache(batch, seq, None).unwrap();
        let split = (seq - 1).max(1);
        for (t0, t1) in [(0, split), (split, seq)]
            .into_iter()
            .filter(|(a, b)| b > a)
        {
            let expected =
                Decoder::forward_cached(&mut cpu, &cut(t0, t1), batch, &mut cpu_cache).unwrap();
            let got = cuda
                .forward_cached(&cut(t0, t1), batch, &mut gpu_cache)
                .unwrap();
            if let Err(m) = check_close(
                &format!("{name} logits after {t1}"),
                &got,
                &expected,
                &[batch, vocab],
                2e-2,
            ) {
                panic!("{m}");
            }
        }
        let (prompt, _) = fixture.i64("greedy_prompt");
        let prompt: Vec<u32> = prompt.iter().map(|&i| i as u32).collect();
        let config = GenerationConfig {
            max_new_tokens: 16,
            ..Default::default()
        };
        let on_cpu = generate(
            &mut cpu,
            std::slice::from_ref(&prompt),
            &config,
            &mut |_, _| true,
        )
        .unwrap();
        let on_gpu = generate(
            &mut cuda,
            std::slice::from_ref(&prompt),
            &config,
            &mut |_, _| true,
        )
        .unwrap();
        assert_eq!(on_gpu.ids, on_cpu.ids, "{name}: greedy ids");
    }
}
