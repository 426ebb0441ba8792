//! `fastllama chat`: a multi-turn conversation on the model's chat template, each answer
//! streamed as it comes, the history kept in the KV cache (each turn prefills only itself).
//! Reads turns from a terminal (with a prompt) or from piped stdin, one line per turn.

use std::io::{BufRead, IsTerminal, Write};

use clap::Args;
use llama_model::{ChatSession, Decoder, GenerationConfig, LoadedModel, TextStream};

use crate::commands::SamplingArgs;
use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message opening the conversation (else the template's own default, if any).
    #[arg(long)]
    system: Option<String>,
    /// The longest answer, in tokens.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// End an answer when its text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

const HELP: &str = "/reset starts a new conversation, /exit (or Ctrl-D) ends";

pub fn chat_cmd(args: &ChatArgs) -> Result<(), String> {
    let LoadedModel {
        model, tokenizer, ..
    } = args.model.load()?;
    let tokenizer = tokenizer.map_err(|e| format!("chat needs the model's tokenizer: {e}"))?;
    if tokenizer.chat_template().is_none() {
        return Err("the model has no chat template; use generate instead".into());
    }
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.config(),
        eos_token_ids: model.config.eos_token_ids.clone(),
    };
    let mut engine = args.model.engine(model)?;
    let mut session = ChatSession::new(&engine, args.system.clone()).map_err(|e| e.to_string())?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("chatting on {} — {HELP}", engine.device_name());
        eprint!("> ");
    }
    let mut stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        let text = line.trim();
        match text {
            "" => {}
            "/exit" | "/quit" => break,
            "/reset" => {
                session.reset();
                eprintln!("(a new conversation)");
            }
            _ if text.starts_with('/') => eprintln!("unknown command {text}: {HELP}"),
            _ => {
                let mut stream = TextStream::new(&tokenizer, &args.stop);
                let report = session.turn(&mut engine, &tokenizer, text, &config, &mut |_, id| {
                    if let Ok(piece) = stream.push(id) {
                        let _ = write!(stdout, "{piece}");
                        let _ = stdout.flush();
                    }
                    !stream.stopped()
                });
                match report {
                    Ok(report) => {
                        println!("{}", stream.finish().unwrap_or_default());
                        if report.dropped > 0 {
                            eprintln!(
                                "(the conversation passed the context of {} tokens: the oldest {} exchange(s) were dropped)",
                                engine.max_seq_length(),
                                report.dropped
                            );
                        }
                    }
                    // A turn that cannot run is reported; the conversation goes on.
                    Err(e) => eprintln!("error: {e}"),
                }
            }
        }
        if interactive {
            eprint!("> ");
        }
    }
    Ok(())
}
