//! `dancegrpo preprocess` end to end with the fixture's tiny FLUX text encoders:
//! exact embeddings, interrupted runs resumed byte for byte, prompt-file
//! problems, the reference's `.pt` format, and training on the result.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::{case_dir, copy_dir, write_reference};
use dancegrpo::data::EmbeddingDataset;
use dancegrpo::data::PromptSet;
use dancegrpo::io::safetensors::SafetensorsFile;
use dancegrpo::io::torch_pt::write_torch_pt_view;
use tch::{Kind, Tensor};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dancegrpo"))
}

fn run(args: &[&str]) -> Output {
    bin()
        .args(["preprocess", "--threads", "1"])
        .args(args)
        .output()
        .expect("running dancegrpo")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

fn fails(o: Output) -> String {
    assert!(!o.status.success(), "should fail: {}", stderr(&o));
    stderr(&o)
}

/// The fixture's FLUX text-encoder directory (tokenizer/, tokenizer_2/, text_encoder/, text_encoder_2/).
fn encoders() -> PathBuf {
    case_dir().join("text_encoders")
}

fn fixture_prompt() -> String {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(case_dir().join("case.json")).unwrap()).unwrap();
    json["prompts (dataset order)"][0]
        .as_str()
        .unwrap()
        .to_string()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dancegrpo-prep-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file of a directory (name, bytes), sorted by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Eleven prompts (the fixture's third), a blank line and a CJK one.
fn write_prompts(path: &Path) {
    let mut lines: Vec<String> = (0..10)
        .map(|i| {
            format!(
                "prompt number {i}: a small {} house",
                ["red", "blue", "green"][i % 3]
            )
        })
        .collect();
    lines.insert(2, fixture_prompt());
    lines.insert(5, "   ".into());
    lines.insert(7, "一只红狐狸".into());
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn fixture_prompt_is_encoded_exactly() {
    let dir = temp_dir("exact");
    let prompts = dir.join("prompts.txt");
    write_prompts(&prompts);
    let out = dir.join("ds");
    let enc = encoders();
    let common = [
        "--model",
        s(&enc),
        "--prompts",
        s(&prompts),
        "--max-sequence-length",
        "32",
    ];
    ok(run(&[
        &common[..],
        &["--out", s(&out), "--batch", "3", "--shard-size", "4"],
    ]
    .concat()));
    let ds = EmbeddingDataset::open(&out).unwrap();
    assert_eq!(ds.len(), 12); // the CJK prompt is kept without --skip-cjk
    let e = ds.get(2).unwrap();
    assert_eq!(e.caption, fixture_prompt());
    let expected = SafetensorsFile::open(encoders().join("expected.safetensors")).unwrap();
    let want_text = expected.tensor("prompt_embeds").unwrap().get(0);
    let want_pooled = expected.tensor("pooled_prompt_embeds").unwrap().get(0);
    assert_eq!(e.text.size(), [32, 32]);
    // the text_encoding stage's tolerance: bit-exact on a CPU with the
    // reference's AVX-512 kernels, float32 rounding (about 1e-7) elsewhere
    for (name, ours, want) in [
        ("prompt_embeds", &e.text, &want_text),
        ("pooled_prompt_embeds", &e.pooled, &want_pooled),
    ] {
        let (rel, _) = dancegrpo::align::errors(ours, want);
        assert!(rel <= 1e-5, "{name} differ from the reference: rel {rel:e}");
    }
    let info = ds.info();
    assert_eq!((info.text_len, info.text_dim, info.pooled_dim), (32, 32, 4));
    assert_eq!(info.shard_count(), 3);
    assert_eq!(info.counts.as_ref().unwrap().skipped_empty, 1);

    // bf16: the encoders run in bf16, the shards hold bf16, close to the f32 reference
    let out16 = dir.join("ds16");
    ok(run(&[
        &common[..],
        &["--out", s(&out16), "--dtype", "bf16"],
    ]
    .concat()));
    let ds16 = EmbeddingDataset::open(&out16).unwrap();
    let e16 = ds16.get(2).unwrap();
    assert_eq!(e16.text.kind(), Kind::BFloat16);
    let rel = (e16.text.to_kind(Kind::Float) - &want_text)
        .norm()
        .double_value(&[])
        / want_text.norm().double_value(&[]);
    assert!(rel < 0.05, "bf16 relative error {rel}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_interrupted_run_resumes_byte_identical() {
    let dir = temp_dir("resume");
    let prompts = dir.join("prompts.txt");
    write_prompts(&prompts);
    let args = |out: &Path| -> Vec<String> {
        [
            "--model",
            s(&encoders()),
            "--prompts",
            s(&prompts),
            "--out",
            s(out),
            "--max-sequence-length",
            "32",
            "--batch",
            "2",
            "--shard-size",
            "3",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    // `extra` flags replace the same flags of `v`, or are appended
    let runv = |v: &[String], extra: &[&str]| {
        let mut a: Vec<String> = v.to_vec();
        for pair in extra.chunks(2) {
            match a.iter().position(|x| x == pair[0]) {
                Some(i) if pair.len() == 2 => a[i + 1] = pair[1].to_string(),
                _ => a.extend(pair.iter().map(|x| x.to_string())),
            }
        }
        run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let full = dir.join("full");
    ok(runv(&args(&full), &[]));
    let want = files(&full);
    assert_eq!(want.len(), 2 + 4); // dataset.json, manifest.jsonl, 4 shards of 3, 3, 3, 3

    // 1. stopped after 2 shards, then a crash's debris: a partial manifest line,
    //    a shard without manifest lines, a temporary file
    let part = dir.join("part");
    let o = runv(&args(&part), &["--stop-after-shards", "2"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = EmbeddingDataset::open(&part)
        .err()
        .expect("incomplete dataset opens")
        .to_string();
    assert!(
        e.contains("incomplete") && e.contains("2 of 4 shards"),
        "{e}"
    );
    std::fs::copy(
        full.join("shard-00002.safetensors"),
        part.join("shard-00002.safetensors"),
    )
    .unwrap();
    std::fs::write(part.join(".shard-00003.safetensors.tmp-99999"), b"junk").unwrap();
    let mut m = std::fs::read(part.join("manifest.jsonl")).unwrap();
    m.extend_from_slice(br#"{"index":6,"prompt":"prompt num"#);
    std::fs::write(part.join("manifest.jsonl"), &m).unwrap();
    let o = ok(runv(&args(&part), &[]));
    assert!(
        stderr(&o).contains("resumed after 2 complete shards"),
        "{}",
        stderr(&o)
    );
    assert!(
        files(&part) == want,
        "resumed dataset differs from an uninterrupted run"
    );

    // 2. a crash after shard 2 was renamed into place, while its lines were appended
    let part2 = dir.join("part2");
    copy_dir(&full, &part2);
    let manifest = std::fs::read_to_string(full.join("manifest.jsonl")).unwrap();
    let cut: usize = manifest
        .split_inclusive('\n')
        .take(7)
        .map(str::len)
        .sum::<usize>()
        + 10;
    std::fs::write(part2.join("manifest.jsonl"), &manifest[..cut]).unwrap();
    std::fs::remove_file(part2.join("shard-00003.safetensors")).unwrap();
    let info = std::fs::read_to_string(full.join("dataset.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["complete"] = false.into();
    v["counts"] = serde_json::Value::Null;
    std::fs::write(
        part2.join("dataset.json"),
        serde_json::to_string_pretty(&v).unwrap(),
    )
    .unwrap();
    let o = ok(runv(&args(&part2), &[]));
    assert!(
        stderr(&o).contains("resumed after 2 complete shards"),
        "{}",
        stderr(&o)
    );
    assert!(
        files(&part2) == want,
        "resumed dataset differs from an uninterrupted run"
    );

    // 3. rerunning on a complete dataset changes nothing
    let o = ok(runv(&args(&full), &[]));
    assert!(stderr(&o).contains("already complete"), "{}", stderr(&o));
    assert!(files(&full) == want);

    // 4. other settings or other prompts are refused, naming what differs
    let part3 = dir.join("part3");
    assert_eq!(
        runv(&args(&part3), &["--stop-after-shards", "1"])
            .status
            .code(),
        Some(3)
    );
    let e = fails(runv(&args(&part3), &["--max-sequence-length", "16"]));
    assert!(e.contains("max_sequence_length") && e.contains("16"), "{e}");
    let e = fails(runv(&args(&part3), &["--batch", "5"]));
    assert!(
        e.contains("batch 2") && e.contains("batch 5") && e.contains("set by --batch"),
        "{e}"
    );
    let e = fails(runv(&args(&part3), &["--dtype", "bf16"]));
    assert!(e.contains("dtype"), "{e}");
    let text = std::fs::read_to_string(&prompts).unwrap();
    std::fs::write(
        &prompts,
        text.replacen("prompt number 1", "prompt NUMBER 1", 1),
    )
    .unwrap();
    let e = fails(runv(&args(&part3), &[]));
    assert!(
        e.contains("line 2") && e.contains("prompts file changed"),
        "{e}"
    );
    std::fs::write(&prompts, text.clone() + "one more prompt\n").unwrap();
    let e = fails(runv(&args(&part3), &[]));
    assert!(
        e.contains("prompts file changed") && e.contains("13"),
        "{e}"
    );
    std::fs::write(&prompts, &text).unwrap();
    ok(runv(&args(&part3), &[]));
    assert!(files(&part3) == want);

    // 5. a directory that is not a dataset is not overwritten
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let e = fails(runv(&args(&other), &[]));
    assert!(
        e.contains("not a dataset") && e.contains("notes.txt"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prompt_file_problems_are_counted_or_named() {
    let dir = temp_dir("problems");
    let prompts = dir.join("prompts.txt");
    let long = vec!["word"; 60].join(" ");
    std::fs::write(
        &prompts,
        format!("a cat\n\n  \t \r\n一只猫在雪地里\n{long}\nカタカナ and a dog\nlast\n"),
    )
    .unwrap();
    let out = dir.join("ds");
    let enc = encoders();
    let base = [
        "--model",
        s(&enc),
        "--prompts",
        s(&prompts),
        "--max-sequence-length",
        "32",
    ];
    let o = ok(run(&[&base[..], &["--out", s(&out), "--skip-cjk"]].concat()));
    let err = stderr(&o);
    assert!(err.contains("2 empty lines, 1 CJK prompts"), "{err}");
    assert!(
        err.contains("truncated: 0 prompts for CLIP (77 tokens), 1 for T5 (32 tokens)"),
        "{err}"
    );
    assert!(err.contains("truncated (T5): prompt 1 (line 5)"), "{err}");
    assert!(
        err.contains("prompts/s") && err.contains("peak RSS"),
        "{err}"
    );
    let ds = EmbeddingDataset::open(&out).unwrap();
    let captions: Vec<String> = (0..ds.len()).map(|i| ds.get(i).unwrap().caption).collect();
    assert_eq!(
        captions,
        ["a cat", long.as_str(), "カタカナ and a dog", "last"]
    );
    assert_eq!(ds.entry(1).unwrap().truncated_t5, Some(true));
    assert_eq!(ds.entry(1).unwrap().truncated_clip, Some(false));
    let c = ds.info().counts.clone().unwrap();
    assert_eq!((c.skipped_empty, c.skipped_cjk, c.truncated_t5), (2, 1, 1));

    // not UTF-8: the line is named
    std::fs::write(&prompts, b"fine\nalso fine\nbroken \xc3\x28 here\n").unwrap();
    let e = fails(run(&[&base[..], &["--out", s(&dir.join("ds2"))]].concat()));
    assert!(
        e.contains("line 3") && e.contains("UTF-8") && e.contains("prompts.txt"),
        "{e}"
    );

    // a missing tokenizer file / encoder directory is named
    std::fs::write(&prompts, "a cat\n").unwrap();
    let model = dir.join("model");
    copy_dir(&encoders(), &model);
    std::fs::remove_file(model.join("tokenizer_2/tokenizer.json")).unwrap();
    let args = |m: &Path| {
        vec![
            "--model".to_string(),
            s(m).into(),
            "--prompts".into(),
            s(&prompts).into(),
            "--out".into(),
            s(&dir.join("ds3")).into(),
        ]
    };
    let runv = |v: Vec<String>| run(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let e = fails(runv(args(&model)));
    assert!(
        e.contains("tokenizer_2/tokenizer.json") && e.contains("T5 tokenizer"),
        "{e}"
    );
    std::fs::remove_dir_all(model.join("text_encoder")).unwrap();
    let e = fails(runv(args(&model)));
    assert!(
        e.contains("text_encoder") && e.contains("CLIP text encoder"),
        "{e}"
    );
    // an empty prompts file
    std::fs::write(&prompts, "\n\n").unwrap();
    let e = fails(run(&[&base[..], &["--out", s(&dir.join("ds4"))]].concat()));
    assert!(e.contains("no prompts"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_reference_format_is_converted() {
    let dir = temp_dir("reference");
    let refdir = dir.join("ref");
    let (embeds, pooled, captions) = write_reference(&refdir, 5, 6, 8, 4);
    let out = dir.join("ds");
    let o = ok(run(&[
        "--from-reference",
        s(&refdir),
        "--out",
        s(&out),
        "--shard-size",
        "2",
    ]));
    assert!(stderr(&o).contains("5 prompts"), "{}", stderr(&o));
    let ds = EmbeddingDataset::open(&out).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.info().dtype.name(), "bf16");
    for i in 0..5 {
        let e = ds.get(i).unwrap();
        assert_eq!(e.caption, captions[i as usize]);
        assert!(e.text.equal(&embeds.get(i as i64)), "prompt {i}");
        assert!(e.pooled.equal(&pooled.get(i as i64)), "pooled {i}");
        assert_eq!(ds.entry(i).unwrap().truncated_t5, None);
    }
    // to f32 on request
    let out32 = dir.join("ds32");
    ok(run(&[
        "--from-reference",
        s(&refdir),
        "--out",
        s(&out32),
        "--dtype",
        "f32",
    ]));
    let e = EmbeddingDataset::open(&out32).unwrap().get(3).unwrap();
    assert!(e.text.equal(&embeds.get(3).to_kind(Kind::Float)));

    // problems are named: non-zero text_ids, a missing file, a bad index
    write_torch_pt_view(
        &refdir.join("text_ids/3.pt"),
        &Tensor::from_slice(&[0f32, 1., 0.]),
        0,
        &[3],
        &[1],
    )
    .unwrap();
    let e = fails(run(&[
        "--from-reference",
        s(&refdir),
        "--out",
        s(&dir.join("bad1")),
    ]));
    assert!(
        e.contains("text_ids/3.pt") && e.contains("not zeros"),
        "{e}"
    );
    std::fs::remove_file(refdir.join("text_ids/3.pt")).unwrap();
    let e = fails(run(&[
        "--from-reference",
        s(&refdir),
        "--out",
        s(&dir.join("bad2")),
    ]));
    assert!(e.contains("text_ids/3.pt"), "{e}");
    std::fs::write(refdir.join("videos2caption.json"), r#"[{"caption": "x", "text_ids": "0.pt", "prompt_embed_path": "../../etc/passwd", "pooled_prompt_embeds_path": "0.pt"}]"#).unwrap();
    let e = fails(run(&[
        "--from-reference",
        s(&refdir),
        "--out",
        s(&dir.join("bad3")),
    ]));
    assert!(
        e.contains("item 0") && e.contains("prompt_embed_path"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_trainer_trains_on_a_dataset_and_refuses_a_half_written_one() {
    let dir = temp_dir("train");
    let prompts = dir.join("prompts.txt");
    write_prompts(&prompts);
    let ds = dir.join("ds");
    let prep = |out: &Path, extra: &[&str]| {
        run(&[
            &[
                "--model",
                s(&encoders()),
                "--prompts",
                s(&prompts),
                "--out",
                s(out),
            ][..],
            &["--max-sequence-length", "32", "--shard-size", "5"],
            extra,
        ]
        .concat())
    };
    ok(prep(&ds, &[]));
    let train = |data: &Path, run_dir: &Path| {
        bin()
            .args(["train", "--threads", "1", "--out", s(run_dir)])
            .args(["--set", "data.kind=\"dataset\"", "--set"])
            .arg(format!("data.path=\"{}\"", s(data)))
            .args([
                "--set",
                "run.iterations=2",
                "--set",
                "run.checkpoint_every=2",
            ])
            .args(["--set", "run.image_every=0"])
            .output()
            .unwrap()
    };
    let run_dir = dir.join("run");
    ok(train(&ds, &run_dir));
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    let config = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    assert!(config.contains("kind = \"dataset\""), "{config}");

    // a half-written dataset is refused, and so is a missing one
    let half = dir.join("half");
    assert_eq!(
        prep(&half, &["--stop-after-shards", "1"]).status.code(),
        Some(3)
    );
    let e = fails(train(&half, &dir.join("run2")));
    assert!(
        e.contains("data.path") && e.contains("incomplete") && e.contains("rerun"),
        "{e}"
    );
    let e = fails(train(&dir.join("nothing"), &dir.join("run3")));
    assert!(e.contains("dataset.json"), "{e}");
    // embeddings of another width than the model's
    let refdir = dir.join("ref");
    let _ = write_reference(&refdir, 2, 6, 8, 4);
    let wide = dir.join("wide");
    ok(run(&["--from-reference", s(&refdir), "--out", s(&wide)]));
    let e = fails(train(&wide, &dir.join("run4")));
    assert!(
        e.contains("width 8") && e.contains("joint_attention_dim 32"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
