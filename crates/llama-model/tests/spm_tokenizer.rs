//! A SentencePiece-vocabulary GGUF (`tokenizer.ggml.model = llama`: pieces, scores and types,
//! no merges) turned into a tokenizer (suite `fast-model`): the ids and decoded text equal HF
//! transformers' for the same file (`tests/data/spm_tokenizer.json`, made with
//! `tests/data/make_spm_tokenizer.py`): "▁" spaces, runs of spaces, newlines, digits, byte
//! fallback for characters the small vocabulary lacks, an empty text; BOS first.

use std::path::PathBuf;

use llama_model::gguf::GgufFile;
use llama_model::Tokenizer;
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

#[test]
fn sentencepiece_gguf_tokenizes_as_transformers_does() {
    let file = GgufFile::open(&data("spm-tokenizer.gguf")).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(data("spm_tokenizer.json")).unwrap())
            .unwrap();
    let bos = expected["bos_id"].as_u64().unwrap() as u32;
    let cases = expected["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut differs_from_sentencepiece = 0;
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let spm_ids: Vec<u32> = serde_json::from_value(case["sentencepiece_ids"].clone()).unwrap();
        differs_from_sentencepiece += usize::from(ids != spm_ids);
        assert_eq!(tokenizer.encode(text, false).unwrap(), ids, "{text:?}");
        let with_bos = tokenizer.encode(text, true).unwrap();
        assert_eq!(with_bos[0], bos, "{text:?}");
        assert_eq!(&with_bos[1..], &ids[..], "{text:?}");
        let decoded = case["decoded"].as_str().unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), decoded, "{text:?}");
    }
    // The cases reach the places where HF's merge table and sentencepiece part ways.
    assert!(differs_from_sentencepiece > 0);
    assert_eq!(tokenizer.vocab_size(), token_count(&file));
}

/// The vocabulary's size as the file declares it.
fn token_count(file: &GgufFile) -> usize {
    let tokens = file.get("tokenizer.ggml.tokens").unwrap();
    tokens.as_array().unwrap().len()
}

/// What the conversion cannot use is a typed error naming it: no scores (and no merges), scores
/// of the wrong count, a tokenizer model it does not know.
#[test]
fn unusable_sentencepiece_metadata_is_an_error() {
    use llama_model::gguf::GgufValue;
    let open = || GgufFile::open(&data("spm-tokenizer.gguf")).unwrap();
    let error = |file: &GgufFile| match Tokenizer::from_gguf(file) {
        Ok(_) => panic!("the tokenizer was made"),
        Err(e) => e.to_string(),
    };
    let mut file = open();
    file.metadata.remove("tokenizer.ggml.scores");
    assert!(error(&file).contains("tokenizer.ggml.scores is missing"));
    let mut file = open();
    let scores = file.metadata.get_mut("tokenizer.ggml.scores").unwrap();
    let GgufValue::Array(values) = scores else {
        panic!("scores are an array")
    };
    values.pop();
    let n = token_count(&file);
    let short = format!("{} values for {n} tokens", n - 1);
    assert!(error(&file).contains(&short), "{}", error(&file));
    let mut file = open();
    file.metadata.insert(
        "tokenizer.ggml.model".into(),
        GgufValue::String("bert".into()),
    );
    assert!(error(&file).contains("\"bert\" is not supported"));
}
