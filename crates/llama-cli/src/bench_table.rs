//! The bench table, shared by `fastllama bench` and `cargo xtask bench` (which includes this
//! file): one row per result object of `fastllama bench --json` (or of a peer giving the same
//! keys), with each rate's ratio to a reference row when there is one.

use serde_json::Value;

/// The Markdown table of `results` for a prefill of `prompt_tokens` and `gen_tokens` decode
/// steps; `reference` (a peer's result) adds "(N×)" after each of our rates.
pub fn table(
    prompt_tokens: usize,
    gen_tokens: usize,
    results: &[Value],
    reference: Option<&Value>,
) -> String {
    let versus = reference.map_or(String::new(), |r| {
        let engine = r["engine"].as_str().unwrap_or("peer");
        let short = engine.split(" (").next().unwrap_or(engine);
        format!(" (× {short})")
    });
    let mut out = format!(
        "| engine | device | threads | prefill {prompt_tokens} tok/s{versus} | decode {gen_tokens} tok/s{versus} | peak RSS MiB | device MiB |\n"
    );
    out += "| --- | --- | --- | --- | --- | --- | --- |\n";
    if let Some(r) = reference {
        out += &row(r, None);
    }
    for result in results {
        out += &row(result, reference);
    }
    out
}

fn row(result: &Value, reference: Option<&Value>) -> String {
    let num = |v: &Value, k: &str| v[k].as_f64();
    let rate = |k: &str| {
        let Some(ours) = num(result, k) else {
            return "-".to_string();
        };
        let ratio = reference
            .and_then(|r| num(r, k))
            .map_or(String::new(), |theirs| format!(" ({:.2}×)", ours / theirs));
        format!("{ours:.1}{ratio}")
    };
    let mib = |k: &str| num(result, k).map_or("-".to_string(), |m| format!("{m:.0}"));
    format!(
        "| {} | {} | {} | {} | {} | {} | {} |\n",
        result["engine"].as_str().unwrap_or("?"),
        result["device"].as_str().unwrap_or("cpu"),
        result["threads"],
        rate("prefill_tokens_per_s"),
        rate("decode_tokens_per_s"),
        mib("peak_rss_mib"),
        mib("device_used_mib"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_carry_ratios_to_the_reference() {
        let peer = json!({"engine": "llama.cpp (llama-cpp-python 0.3.36)", "threads": 2,
            "prefill_tokens_per_s": 200.0, "decode_tokens_per_s": 80.0, "peak_rss_mib": 300.0});
        let ours = json!({"engine": "fastllama (fast)", "device": "cpu", "threads": 2,
            "prefill_tokens_per_s": 300.0, "decode_tokens_per_s": 80.0, "peak_rss_mib": 200.0,
            "device_used_mib": null});
        let text = table(512, 128, &[ours], Some(&peer));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].contains("prefill 512 tok/s (× llama.cpp)"),
            "{}",
            lines[0]
        );
        assert_eq!(
            lines[2],
            "| llama.cpp (llama-cpp-python 0.3.36) | cpu | 2 | 200.0 | 80.0 | 300 | - |"
        );
        assert_eq!(
            lines[3],
            "| fastllama (fast) | cpu | 2 | 300.0 (1.50×) | 80.0 (1.00×) | 200 | - |"
        );
    }
}
