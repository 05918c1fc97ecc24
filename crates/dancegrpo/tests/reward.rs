//! The HPSv2 reward: the align stage on every public case, `.pt` / safetensors
//! loading, hostile or malformed `.pt` files, and bad reward inputs.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use dancegrpo::align::{run_case, Precision, Stage};
use dancegrpo::io::safetensors::{write_safetensors, SafetensorsFile};
use dancegrpo::io::torch_pt::read_torch_pt;
use dancegrpo::models::open_clip::{OpenClip, OpenClipConfig};
use dancegrpo::rewards::hps::HpsReward;
use dancegrpo::rewards::{Reward, RewardBatch, Score};
use dancegrpo::weights::Checkpoint;
use tch::{Device, Kind, Tensor};

fn reward_dir(case: &Path) -> PathBuf {
    case.join("reward")
}

#[test]
fn reward_stage_passes_on_every_public_case() {
    for case in common::public_cases() {
        let report = run_case(&case, &[Stage::Reward], Precision::F32).unwrap();
        let stage = &report.stages[0];
        assert_eq!(stage.name, "reward");
        assert!(stage.pass, "{}: {stage:?}", case.display());
        // every float tensor is judged against the float64 truth, at most 1e-6
        // off it wherever the reference itself is closer than 2.5e-7
        for t in stage.tensors.iter().filter(|t| t.bound > 0.0) {
            assert!(t.truth_err.is_some(), "{} has no truth", t.name);
            assert!(t.bound <= (4.0 * t.ref_err.unwrap()).max(1e-6), "{t:?}");
        }
        for suffix in ["(pt)", "(safetensors)"] {
            assert!(
                stage.tensors.iter().any(|t| t.name.ends_with(suffix)),
                "{suffix} missing"
            );
        }
    }
}

#[test]
fn pt_and_safetensors_hold_bit_identical_tensors() {
    for case in common::public_cases() {
        let dir = reward_dir(&case);
        let pt = read_torch_pt(&dir.join("HPS_v2.1_compressed.pt")).unwrap();
        let st = SafetensorsFile::open(dir.join("open_clip_model.safetensors")).unwrap();
        let mut pt_names: Vec<&str> = pt.iter().map(|(n, _)| n.as_str()).collect();
        pt_names.sort();
        let st_names: Vec<&str> = st.names().collect();
        assert_eq!(pt_names, st_names);
        for (name, t) in &pt {
            let s = st.tensor(name).unwrap();
            assert_eq!(t.kind(), s.kind(), "{name}");
            assert_eq!(t.size(), s.size(), "{name}");
            assert!(t.equal(&s), "{name} differs");
        }
        // and the models built from them
        let config = OpenClipConfig::from_dir(&dir).unwrap();
        let a = OpenClip::load(
            config.clone(),
            &dir.join("HPS_v2.1_compressed.pt"),
            Kind::Float,
            Device::Cpu,
        )
        .unwrap();
        let b = OpenClip::from_dir(&dir, Kind::Float, Device::Cpu).unwrap();
        for ((na, ta), (nb, tb)) in a.parameters().iter().zip(&b.parameters()) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{na}");
        }
    }
}

// ---------------------------------------------------------------- hand-made .pt files

/// A protocol-2 pickle written opcode by opcode.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    fn op(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(self, s: &str) -> Self {
        let mut b = vec![b'X'];
        b.extend((s.len() as u32).to_le_bytes());
        b.extend(s.as_bytes());
        self.op(&b)
    }
    fn int(self, i: u8) -> Self {
        self.op(&[b'K', i])
    }
    fn global(self, module: &str, name: &str) -> Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    /// `_rebuild_tensor_v2(storage(key, numel float32), offset, size, stride, False, OrderedDict())`.
    fn tensor(self, key: &str, numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Self {
        let mut p = self
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .str("storage")
            .global("torch", "FloatStorage")
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b"tQ")
            .int(offset)
            .op(b"(");
        for s in size {
            p = p.int(*s);
        }
        p = p.op(b"t(");
        for s in stride {
            p = p.int(*s);
        }
        p.op(b"t")
            .op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")R")
            .op(b"tR")
    }
    fn finish(self) -> Vec<u8> {
        self.op(b".").0
    }
}

/// Writes a torch-style zip: `archive/data.pkl`, `archive/byteorder`, `archive/data/<key>`.
fn write_pt(path: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn pt_err(path: &Path) -> String {
    match read_torch_pt(path) {
        Ok(t) => panic!("{} should not load ({} tensors)", path.display(), t.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn strided_tensor_with_offset_and_module_prefix() {
    let dir = common::temp_dir("pt-strided");
    let path = dir.join("w.pt");
    // {"state_dict": {"module.w": view of storage [0..6) at offset 1, size (2,2), stride (1,2)},
    //  "module.b": the whole storage "1" as (3,)}
    let p = Pickle::new()
        .op(b"}")
        .str("state_dict")
        .op(b"}(")
        .str("module.w")
        .tensor("0", 6, 1, &[2, 2], &[1, 2])
        .str("module.b")
        .tensor("1", 3, 0, &[3], &[1])
        .op(b"us")
        .finish();
    write_pt(
        &path,
        &p,
        &[
            ("0", f32_bytes(&[0., 1., 2., 3., 4., 5.])),
            ("1", f32_bytes(&[7., 8., 9.])),
        ],
    );
    let tensors = read_torch_pt(&path).unwrap();
    assert_eq!(tensors.len(), 2);
    assert_eq!(tensors[0].0, "w");
    let w = Vec::<f32>::try_from(&tensors[0].1.flatten(0, -1)).unwrap();
    assert_eq!(w, [1., 3., 2., 4.]);
    assert_eq!(tensors[1].0, "b");
    assert_eq!(Vec::<f32>::try_from(&tensors[1].1).unwrap(), [7., 8., 9.]);

    // a view reaching past its storage is refused
    let p = Pickle::new()
        .op(b"}")
        .str("w")
        .tensor("0", 6, 3, &[2, 2], &[1, 2])
        .op(b"s")
        .finish();
    write_pt(&path, &p, &[("0", f32_bytes(&[0.; 6]))]);
    let e = pt_err(&path);
    assert!(e.contains("`w`") && e.contains("storage"), "{e}");
    // a storage file shorter than announced is refused
    let p = Pickle::new()
        .op(b"}")
        .str("w")
        .tensor("0", 6, 0, &[6], &[1])
        .op(b"s")
        .finish();
    write_pt(&path, &p, &[("0", f32_bytes(&[0.; 5]))]);
    let e = pt_err(&path);
    assert!(e.contains("20 bytes"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pickle_calling_os_system_is_refused_and_never_run() {
    let dir = common::temp_dir("pt-evil");
    let marker = dir.join("pwned");
    let path = dir.join("evil.pt");
    let cmd = format!("touch {}", marker.display());
    let p = Pickle::new()
        .global("os", "system")
        .str(&cmd)
        .op(&[0x85])
        .op(b"R")
        .finish();
    write_pt(&path, &p, &[]);
    let e = pt_err(&path);
    assert!(e.contains("os.system"), "{e}");
    assert!(e.contains("evil.pt"), "{e}");
    // STACK_GLOBAL spelling of builtins.eval
    let p = Pickle::new()
        .str("builtins")
        .str("eval")
        .op(&[0x93])
        .str(&format!("__import__('os').system('{cmd}')"))
        .op(&[0x85])
        .op(b"R")
        .finish();
    write_pt(&path, &p, &[]);
    let e = pt_err(&path);
    assert!(e.contains("builtins.eval"), "{e}");
    // an opcode torch.save never emits (INST)
    let p = Pickle::new().op(b"(ios\nsystem\n").finish();
    write_pt(&path, &p, &[]);
    let e = pt_err(&path);
    assert!(e.contains("INST"), "{e}");
    assert!(!marker.exists(), "pickled code was executed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pt_with_unexpected_contents_is_refused() {
    let dir = common::temp_dir("pt-odd");
    let path = dir.join("odd.pt");
    // a list instead of a dict
    write_pt(
        &path,
        &Pickle::new().op(b"](").int(1).int(2).op(b"e").finish(),
        &[],
    );
    let e = pt_err(&path);
    assert!(e.contains("list") && e.contains("odd.pt"), "{e}");
    // a dict whose entry is not a tensor
    let p = Pickle::new()
        .op(b"}")
        .str("state_dict")
        .op(b"}")
        .str("epoch")
        .int(3)
        .op(b"ss")
        .finish();
    write_pt(&path, &p, &[]);
    let e = pt_err(&path);
    assert!(e.contains("`epoch`") && e.contains("int"), "{e}");
    // not a zip at all
    std::fs::write(&path, b"\x80\x02}q\x00.").unwrap();
    let e = pt_err(&path);
    assert!(e.contains("zip"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- checkpoints and inputs

#[test]
fn checkpoint_missing_a_tower_is_named() {
    let case = &common::public_cases()[0];
    let dir = reward_dir(case);
    let config = OpenClipConfig::from_dir(&dir).unwrap();
    let st = SafetensorsFile::open(dir.join("open_clip_model.safetensors")).unwrap();
    let tmp = common::temp_dir("clip-towers");
    for (drop_prefix, expect) in [("visual.", "image tower"), ("", "text tower")] {
        let kept: Vec<(String, Tensor)> = st
            .names()
            .filter(|n| {
                if drop_prefix.is_empty() {
                    n.starts_with("visual.")
                } else {
                    !n.starts_with(drop_prefix)
                }
            })
            .map(|n| (n.to_string(), st.tensor(n).unwrap()))
            .collect();
        let path = tmp.join("partial.safetensors");
        write_safetensors(&path, &kept, &BTreeMap::new()).unwrap();
        let e = match OpenClip::load(config.clone(), &path, Kind::Float, Device::Cpu) {
            Ok(_) => panic!("a checkpoint without the {expect} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(expect) && e.contains("partial.safetensors"),
            "{e}"
        );
    }
    // a single missing tensor is named too
    let ck = Checkpoint::from_tensors(
        "memory".into(),
        st.names()
            .filter(|n| *n != "visual.proj")
            .map(|n| (n.to_string(), st.tensor(n).unwrap()))
            .collect(),
    )
    .unwrap();
    let e = match OpenClip::new(
        config,
        dancegrpo::weights::Source::Checkpoint(&ck),
        Kind::Float,
        Device::Cpu,
    ) {
        Ok(_) => panic!("loaded without visual.proj"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("visual.proj"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn case_reward(case: &Path) -> (HpsReward, Tensor) {
    let dir = reward_dir(case);
    let model = OpenClip::from_dir(&dir, Kind::Float, Device::Cpu).unwrap();
    let expected = SafetensorsFile::open(case.join("expected.safetensors")).unwrap();
    let ids = Vec::<i64>::try_from(&expected.tensor("reward/input_ids").unwrap().get(0)).unwrap();
    let tokenize = Box::new(move |_: &str| Ok(ids.clone()));
    let images = expected.tensor("decode/image_uint8").unwrap();
    (HpsReward::new(model, tokenize).with_batch_size(3), images)
}

#[test]
fn reward_trait_scores_and_rejects_bad_inputs() {
    let case = &common::public_cases()[0];
    let (mut reward, images) = case_reward(case);
    let expected = SafetensorsFile::open(case.join("expected.safetensors")).unwrap();
    let b = images.size()[0] as usize;
    let prompts = vec!["a prompt".to_string(); b];

    // The trait (batched by 3) gives the reference rewards when every prompt
    // tokenizes to the stored ids (the public case has one prompt).
    let scores = reward
        .score(&RewardBatch {
            images: &images,
            prompts: &prompts,
        })
        .unwrap();
    let want = Vec::<f32>::try_from(&expected.tensor("rewards").unwrap()).unwrap();
    let all_same = {
        let ids = expected.tensor("reward/input_ids").unwrap();
        ids.eq_tensor(&ids.get(0).unsqueeze(0))
            .all()
            .int64_value(&[])
            != 0
    };
    assert_eq!(reward.name(), "hpsv2");
    assert_eq!(scores.len(), b);
    if all_same {
        for (s, w) in scores.iter().zip(&want) {
            let Score::Value(v) = s else { panic!("{s:?}") };
            assert!((v - w).abs() <= 1e-6 * w.abs().max(1e-3), "{v} vs {w}");
        }
    }

    // RGBA images
    let rgba = Tensor::zeros([b as i64, 8, 8, 4], (Kind::Uint8, Device::Cpu));
    let e = reward
        .score(&RewardBatch {
            images: &rgba,
            prompts: &prompts,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("(B, H, W, 3)"), "{e}");
    // fewer prompts than images (none at all)
    let e = reward
        .score(&RewardBatch {
            images: &images,
            prompts: &[],
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("0 prompts"), "{e}");
    // a tokenizer returning the wrong number of ids
    let model = OpenClip::from_dir(&reward_dir(case), Kind::Float, Device::Cpu).unwrap();
    let mut short = HpsReward::new(model, Box::new(|_: &str| Ok(vec![49406, 49407])));
    let e = short
        .score(&RewardBatch {
            images: &images,
            prompts: &prompts,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 ids"), "{e}");
    // ids of the wrong batch size for score_ids
    let ids = Tensor::zeros([1, 77], (Kind::Int64, Device::Cpu));
    let imgs2 = images.narrow(0, 0, 2.min(b as i64));
    if imgs2.size()[0] == 2 {
        assert!(reward.score_ids(&imgs2, &ids).is_err());
    }
}
