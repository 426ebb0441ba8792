//! Decoding with the KV cache: a left-padded batch of sequences of different lengths, prefilled
//! and then decoded token by token, gives each sequence the outputs it gets alone without a
//! cache; and the cache grows once per increment, truncates, resets and refuses to pass the
//! context.

mod common;

use llama_attn::KvCache;
use llama_fixtures::{assert_close, TestRng};

#[test]
fn left_padded_batch_decodes_like_each_sequence_alone() {
    let mut rng = TestRng::new(1);
    let (hidden, heads, kv_heads) = (48, 6, 2);
    let mut attn = common::random_layer(&mut rng, hidden, heads, kv_heads, 4096);
    let (prompt_lens, new_tokens) = ([7usize, 3, 5], 4);
    let batch = prompt_lens.len();
    let longest = *prompt_lens.iter().max().unwrap();
    let tokens: Vec<Vec<f32>> = prompt_lens
        .iter()
        .map(|&n| rng.vec((n + new_tokens) * hidden, 1.0))
        .collect();

    // Each sequence alone, no cache, all its tokens at positions 0..n.
    let alone: Vec<Vec<f32>> = tokens
        .iter()
        .map(|x| {
            let n = x.len() / hidden;
            let ids: Vec<u32> = (0..n as u32).collect();
            attn.forward(x, 1, &ids, None).unwrap().0
        })
        .collect();

    // The batch: prompts left-padded to the longest, prefilled, then decoded one token a step.
    let padding: Vec<usize> = prompt_lens.iter().map(|&n| longest - n).collect();
    let mut cache = attn.new_cache(batch, 4, 4, 64).unwrap();
    cache.set_padding(padding.clone()).unwrap();
    let mut x = vec![0f32; batch * longest * hidden];
    let mut ids = vec![0u32; batch * longest];
    for b in 0..batch {
        let at = (b * longest + padding[b]) * hidden;
        x[at..at + prompt_lens[b] * hidden].copy_from_slice(&tokens[b][..prompt_lens[b] * hidden]);
        for t in padding[b]..longest {
            ids[b * longest + t] = (t - padding[b]) as u32;
        }
    }
    let out = attn.forward_cached(&x, batch, &ids, &mut cache).unwrap();
    for b in 0..batch {
        let got = &out[(b * longest + padding[b]) * hidden..(b + 1) * longest * hidden];
        assert_close(
            &format!("prefill of sequence {b}"),
            got,
            &alone[b][..prompt_lens[b] * hidden],
            &[prompt_lens[b], hidden],
            1e-5,
        );
    }
    for step in 0..new_tokens {
        let x: Vec<f32> = (0..batch)
            .flat_map(|b| tokens[b][(prompt_lens[b] + step) * hidden..][..hidden].to_vec())
            .collect();
        let ids: Vec<u32> = prompt_lens.iter().map(|&n| (n + step) as u32).collect();
        let out = attn.forward_cached(&x, batch, &ids, &mut cache).unwrap();
        for b in 0..batch {
            let expected = &alone[b][(prompt_lens[b] + step) * hidden..][..hidden];
            assert_close(
                &format!("step {step} of sequence {b}"),
                &out[b * hidden..(b + 1) * hidden],
                expected,
                &[hidden],
                1e-5,
            );
        }
    }
}

#[test]
fn the_cache_grows_by_increments_and_stops_at_the_context() {
    let (batch, kv_heads, d) = (2, 3, 4);
    let mut cache = KvCache::new(batch, kv_heads, d, 0, 4, 10).unwrap();
    let token = |v: f32| vec![v; batch * kv_heads * d];
    for t in 0..9 {
        cache
            .append(&token(t as f32), &token(-(t as f32)), 1)
            .unwrap();
    }
    // 9 tokens in increments of 4: capacity 4, 8, then 10 (the context), three copies.
    assert_eq!((cache.len(), cache.capacity(), cache.grows()), (9, 10, 3));
    assert_eq!(cache.memory_bytes(), 2 * batch * kv_heads * 10 * d * 4);
    // Every slab holds its tokens in order after the copies.
    for slab in 0..batch * kv_heads {
        for t in 0..9 {
            assert_eq!(cache.keys()[(slab * 10 + t) * d], t as f32);
            assert_eq!(cache.values()[(slab * 10 + t) * d], -(t as f32));
        }
    }
    let err = cache
        .append(
            &vec![0.0; batch * kv_heads * 2 * d],
            &vec![0.0; batch * kv_heads * 2 * d],
            2,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("exceed the context of 10"),
        "{err}"
    );
    assert!(cache.append(&token(0.0)[1..], &token(0.0)[1..], 1).is_err());
    cache.truncate(5);
    assert_eq!(cache.len(), 5);
    cache.reset();
    assert!(cache.is_empty() && cache.padding().is_none());
    assert!(cache.set_padding(vec![0; 3]).is_err());
    assert!(KvCache::new(batch, kv_heads, d, 11, 4, 10).is_err());
}
