//! The CLIP, T5 and open_clip tokenizers reproduce the reference ids of every public
//! case, and report bad tokenizer files by name.

mod common;

use std::path::Path;

use dancegrpo::io::safetensors::SafetensorsFile;
use dancegrpo::text::{batch_ids, ClipTokenizer, Encoding, Padding, T5Tokenizer, TextHandling};

fn case_strings(case: &Path, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(case.join("case.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = json[key]
        .as_array()
        .unwrap_or_else(|| panic!("case.json has no `{key}`"));
    list.iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn expected_rows(file: &Path, name: &str) -> Vec<Vec<i64>> {
    let t = SafetensorsFile::open(file).unwrap().tensor(name).unwrap();
    (0..t.size()[0])
        .map(|i| Vec::<i64>::try_from(&t.get(i)).unwrap())
        .collect()
}

fn assert_rows(encodings: &[Encoding], expected: &[Vec<i64>], what: &str) {
    assert_eq!(encodings.len(), expected.len(), "{what}: row count");
    assert!(!expected.is_empty(), "{what}: nothing to compare");
    for (i, (e, want)) in encodings.iter().zip(expected).enumerate() {
        assert_eq!(&e.ids, want, "{what}: row {i}");
    }
    let t = batch_ids(encodings).unwrap();
    assert_eq!(
        t.size(),
        vec![expected.len() as i64, expected[0].len() as i64]
    );
}

#[test]
fn clip_ids_match_the_reference() {
    for case in common::public_cases() {
        let tok = ClipTokenizer::from_dir(&case.join("text_encoders/tokenizer")).unwrap();
        let prompts = case_strings(&case, "prompts (dataset order)");
        let enc: Vec<Encoding> = prompts
            .iter()
            .map(|p| tok.encode_default(p).unwrap())
            .collect();
        let want = expected_rows(
            &case.join("text_encoders/expected.safetensors"),
            "clip_input_ids",
        );
        assert_rows(&enc, &want, &format!("{} clip", case.display()));
        // The explicit form gives the same ids.
        assert_eq!(
            tok.encode(&prompts[0], 77, Padding::EndOfText).unwrap(),
            enc[0]
        );
    }
}

#[test]
fn t5_ids_match_the_reference() {
    for case in common::public_cases() {
        let tok = T5Tokenizer::from_dir(&case.join("text_encoders/tokenizer_2")).unwrap();
        let prompts = case_strings(&case, "prompts (dataset order)");
        let want = expected_rows(
            &case.join("text_encoders/expected.safetensors"),
            "t5_input_ids",
        );
        let len = want[0].len();
        assert_eq!(tok.max_length(), len);
        let enc: Vec<Encoding> = prompts
            .iter()
            .map(|p| tok.encode(p, len).unwrap())
            .collect();
        assert_rows(&enc, &want, &format!("{} t5", case.display()));
    }
}

#[test]
fn reward_ids_match_the_reference_from_json_and_from_open_clip_merges() {
    for case in common::public_cases() {
        let captions = case_strings(&case, "sample_captions");
        let want = expected_rows(&case.join("expected.safetensors"), "reward/input_ids");
        let from_json =
            ClipTokenizer::from_tokenizer_json(&case.join("reward/tokenizer.json")).unwrap();
        assert_eq!(from_json.padding(), Padding::Zero);
        let gz = case.join("reward/bpe_simple_vocab_16e6.txt.gz");
        let from_gz = ClipTokenizer::from_open_clip_bpe(&gz).unwrap();
        for (name, tok) in [("tokenizer.json", &from_json), ("bpe gz", &from_gz)] {
            let enc: Vec<Encoding> = captions
                .iter()
                .map(|c| tok.encode(c, 77, Padding::Zero).unwrap())
                .collect();
            assert_rows(&enc, &want, &format!("{} reward {name}", case.display()));
        }
    }
}

/// The FLUX CLIP tokenizer of the first public case.
fn clip() -> ClipTokenizer {
    let case = &common::public_cases()[0];
    ClipTokenizer::from_dir(&case.join("text_encoders/tokenizer")).unwrap()
}

fn t5() -> T5Tokenizer {
    let case = &common::public_cases()[0];
    T5Tokenizer::from_dir(&case.join("text_encoders/tokenizer_2")).unwrap()
}

#[test]
fn clip_empty_prompt_is_start_end_then_padding() {
    let tok = clip();
    let e = tok.encode("", 77, Padding::EndOfText).unwrap();
    assert_eq!(e.ids[..2], [49406, 49407]);
    assert!(e.ids[2..].iter().all(|&i| i == 49407));
    let z = tok.encode("   ", 77, Padding::Zero).unwrap();
    assert_eq!(z.ids[..3], [49406, 49407, 0]);
    assert!(!e.truncated && !z.truncated);
}

#[test]
fn clip_long_prompt_is_truncated_keeping_the_end_token() {
    let tok = clip();
    let long = "a photo of a red fox ".repeat(30);
    let e = tok.encode(&long, 77, Padding::EndOfText).unwrap();
    assert_eq!(e.ids.len(), 77);
    assert_eq!(e.ids[0], 49406);
    assert_eq!(e.ids[76], 49407);
    assert_ne!(e.ids[75], 49407);
    assert!(e.truncated);
    // Exactly 75 tokens fit: "a" is one token, so 75 of them are not truncated.
    let fits = tok
        .encode(&"a ".repeat(75), 77, Padding::EndOfText)
        .unwrap();
    assert!(!fits.truncated);
    assert!(
        tok.encode(&"a ".repeat(76), 77, Padding::EndOfText)
            .unwrap()
            .truncated
    );
}

#[test]
fn clip_normalises_whitespace_and_case() {
    let tok = clip();
    let a = tok.encode_default("A Photo\tof  a RED\n fox").unwrap();
    let b = tok.encode_default("  a photo of a red fox ").unwrap();
    assert_eq!(a, b);
    // "a</w>" = 320, "photo</w>" = 1125 in the CLIP vocab.
    assert_eq!(a.ids[1..3], [320, 1125]);
}

#[test]
fn clip_recognises_special_tokens_in_text() {
    let tok = clip();
    let e = tok.encode_default("a<|endoftext|>").unwrap();
    assert_eq!(e.ids[..4], [49406, 320, 49407, 49407]);
}

#[test]
fn t5_long_prompt_is_truncated_keeping_eos() {
    let tok = t5();
    let e = tok.encode(&"a photo of a red fox ".repeat(20), 32).unwrap();
    assert_eq!(e.ids.len(), 32);
    assert_eq!(e.ids[31], 1);
    assert!(e.ids[..31].iter().all(|&i| i > 2));
    assert!(e.truncated);
}

#[test]
fn t5_empty_prompt_is_eos_then_padding() {
    let e = t5().encode("", 32).unwrap();
    assert_eq!(e.ids[0], 1);
    assert!(e.ids[1..].iter().all(|&i| i == 0));
    assert!(!e.truncated);
}

#[test]
fn t5_unknown_characters_fuse_into_one_unk() {
    let tok = t5();
    // "▁a" and "▁fox" are pieces; the CJK characters are not (unk id 2), and a
    // run of unknown characters becomes a single unk.
    let a = tok.tokenize("a fox").unwrap();
    let b = tok.tokenize("a 狐狸 fox").unwrap();
    assert_eq!(b.len(), a.len() + 2, "{a:?} vs {b:?}");
    assert_eq!(b[0], a[0]);
    assert_eq!(b[2], 2);
    assert_eq!(b[3..], a[1..]);
}

#[test]
fn t5_collapses_runs_of_spaces() {
    let tok = t5();
    assert_eq!(
        tok.tokenize("a   fox").unwrap(),
        tok.tokenize("a fox").unwrap()
    );
}

#[test]
fn missing_tokenizer_files_are_named() {
    let dir = common::temp_dir("tok-missing");
    let err = ClipTokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    let err = T5Tokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("spiece.model"),
        "{err}"
    );
    let gz = dir.join("bpe_simple_vocab_16e6.txt.gz");
    let err = ClipTokenizer::from_open_clip_bpe(&gz)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("bpe_simple_vocab_16e6.txt.gz"), "{err}");
}

#[test]
fn malformed_tokenizer_json_names_file_and_field() {
    let dir = common::temp_dir("tok-malformed");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, "{ not json").unwrap();
    let err = ClipTokenizer::from_tokenizer_json(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("invalid JSON"),
        "{err}"
    );

    let case = &common::public_cases()[0];
    let src = case.join("text_encoders/tokenizer_2/tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    json["model"]["vocab"][5] = serde_json::json!(["▁x", "high"]);
    std::fs::write(&path, json.to_string()).unwrap();
    let err = T5Tokenizer::from_tokenizer_json(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("model.vocab") && err.contains("entry 5"),
        "{err}"
    );

    json["model"]["vocab"][5] = serde_json::json!(["▁x", -3.0]);
    json["model"]["unk_id"] = serde_json::json!(999);
    std::fs::write(&path, json.to_string()).unwrap();
    let err = T5Tokenizer::from_tokenizer_json(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.unk_id") && err.contains("999"), "{err}");

    json["model"]["type"] = serde_json::json!("WordPiece");
    std::fs::write(&path, json.to_string()).unwrap();
    let err = T5Tokenizer::from_tokenizer_json(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.type") && err.contains("WordPiece"),
        "{err}"
    );
}

/// A `vocab.json` + `merges.txt` pair tokenizes as transformers' slow
/// `CLIPTokenizer` with ftfy (FLUX's pipeline) or as `CLIPTokenizerFast`
/// (`CLIPProcessor`), as asked; 7 of the 14 prompts tell the two apart.
#[test]
fn clip_slow_and_fast_handling_match_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clip-slow");
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = json["cases"].as_array().unwrap();
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let mut differ = 0;
    for (handling, key) in [
        (TextHandling::SlowFtfy, "slow"),
        (TextHandling::Fast, "fast"),
    ] {
        let tok = ClipTokenizer::from_vocab_merges(&vocab, &merges, handling).unwrap();
        let (start, end) = tok.special_ids();
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            let want: Vec<i64> = serde_json::from_value(case[key].clone()).unwrap();
            let mut got = vec![start];
            got.extend(tok.tokenize(prompt));
            got.push(end);
            assert_eq!(got, want, "{key}: {prompt:?}");
            differ += usize::from(key == "slow" && case["slow"] != case["fast"]);
        }
    }
    assert_eq!((cases.len(), differ), (14, 7));
    // A directory holding both forms follows the loader that is named: the slow
    // tokenizer reads the pair, the fast one `tokenizer.json`.
    let both = common::temp_dir("clip-slow-both");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(dir.join(f), both.join(f)).unwrap();
    }
    let json = common::public_cases()[0].join("text_encoders/tokenizer/tokenizer.json");
    std::fs::copy(&json, both.join("tokenizer.json")).unwrap();
    let prompt = cases[2]["prompt"].as_str().unwrap();
    let slow = ClipTokenizer::from_dir_as(&both, TextHandling::SlowFtfy).unwrap();
    let pair = ClipTokenizer::from_vocab_merges(&vocab, &merges, TextHandling::SlowFtfy).unwrap();
    assert_eq!(slow.tokenize(prompt), pair.tokenize(prompt));
    let fast = ClipTokenizer::from_dir(&both).unwrap();
    let from_json = ClipTokenizer::from_tokenizer_json(&json).unwrap();
    assert_eq!(fast.tokenize(prompt), from_json.tokenize(prompt));
    assert_ne!(fast.tokenize(prompt), slow.tokenize(prompt));
}
