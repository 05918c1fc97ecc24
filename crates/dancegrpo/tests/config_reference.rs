//! `docs/configuration.md` is generated from the configuration types' doc
//! comments (read with `syn`) and their defaults (serialised by serde): this test
//! fails when the page and the code disagree. `DANCEGRPO_BLESS=1 cargo test
//! --test config_reference` rewrites the page.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dancegrpo::dist::ParallelConfig;
use dancegrpo::grpo::LrSchedule;
use dancegrpo::models::lora::LoraConfig;
use dancegrpo::precision::PrecisionConfig;
use dancegrpo::sampler::cache::{BlockCache, StepCache};
use dancegrpo::sampler::tree::Tree;
use dancegrpo::sampler::SdeWindow;
use dancegrpo::train::config::{
    DataSource, EvalConfig, GrpoConfig, ModelSource, OptimConfig, RewardSpec, RunConfig,
    SamplerConfig,
};
use dancegrpo::train::ema::EmaConfig;
use dancegrpo::train::health::HealthConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The library's files that define configuration types.
const SOURCES: &[&str] = &[
    "train/config.rs",
    "train/health.rs",
    "train/ema.rs",
    "precision.rs",
    "dist/sharding.rs",
    "plan/check.rs",
    "rewards/spec.rs",
    "rewards/jpeg.rs",
    "rewards/clip_score.rs",
    "models/lora.rs",
    "models/mod.rs",
    "sampler/draws.rs",
    "sampler/forms.rs",
    "sampler/window.rs",
    "sampler/tree.rs",
    "sampler/cache.rs",
    "grpo/advantage.rs",
    "grpo/guard.rs",
    "grpo/lr.rs",
    "grpo/settings.rs",
    "grpo/update.rs",
];

/// The enums tagged by `kind` that have a section of their own, and its header.
const TAGGED: &[(&str, &str)] = &[
    ("ModelSource", "[model]"),
    ("DataSource", "[data]"),
    ("RewardSpec", "[[rewards]]"),
    ("LrSchedule", "[optim.lr_schedule]"),
    ("CachePolicy", "[eval.cache]"),
];

/// GitHub's anchor of a `## \`header\`` heading.
fn anchor(header: &str) -> String {
    header
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '_' || *c == '-')
        .collect()
}

/// A documented field.
struct Field {
    name: String,
    ty: String,
    doc: String,
}

/// A struct, or one variant of an enum.
struct Shape {
    name: String,
    doc: String,
    fields: Vec<Field>,
}

/// What the sources declare, by type name.
#[derive(Default)]
struct Types {
    structs: BTreeMap<String, Shape>,
    enums: BTreeMap<String, (String, Vec<Shape>)>,
}

fn doc_of(attrs: &[syn::Attribute]) -> String {
    let lines: Vec<String> = attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .filter_map(|a| match &a.meta {
            syn::Meta::NameValue(nv) => match &nv.value {
                syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => Some(s.value().trim().to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    // rustdoc links become code spans
    lines.join(" ").trim().replace("[`", "`").replace("`]", "`")
}

fn type_name(ty: &syn::Type) -> String {
    match ty {
        syn::Type::Path(p) => {
            let seg = p.path.segments.last().expect("a type path has a segment");
            match &seg.arguments {
                syn::PathArguments::AngleBracketed(a) => {
                    let inner: Vec<String> = a
                        .args
                        .iter()
                        .filter_map(|g| match g {
                            syn::GenericArgument::Type(t) => Some(type_name(t)),
                            _ => None,
                        })
                        .collect();
                    format!("{}<{}>", seg.ident, inner.join(", "))
                }
                _ => seg.ident.to_string(),
            }
        }
        syn::Type::Tuple(t) => {
            let parts: Vec<String> = t.elems.iter().map(type_name).collect();
            format!("({})", parts.join(", "))
        }
        _ => "?".into(),
    }
}

fn fields_of(fields: &syn::Fields) -> Vec<Field> {
    fields
        .iter()
        .filter_map(|f| {
            Some(Field {
                name: f.ident.as_ref()?.to_string(),
                ty: type_name(&f.ty),
                doc: doc_of(&f.attrs),
            })
        })
        .collect()
}

fn read_types() -> Types {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut types = Types::default();
    for file in SOURCES {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        for item in ast.items {
            match item {
                syn::Item::Struct(s) => {
                    let shape = Shape {
                        name: s.ident.to_string(),
                        doc: doc_of(&s.attrs),
                        fields: fields_of(&s.fields),
                    };
                    types.structs.insert(shape.name.clone(), shape);
                }
                syn::Item::Enum(e) => {
                    let variants = e
                        .variants
                        .iter()
                        .map(|v| Shape {
                            name: serde_rename(&v.attrs)
                                .unwrap_or_else(|| snake(&v.ident.to_string())),
                            doc: doc_of(&v.attrs),
                            fields: fields_of(&v.fields),
                        })
                        .collect();
                    types
                        .enums
                        .insert(e.ident.to_string(), (doc_of(&e.attrs), variants));
                }
                _ => {}
            }
        }
    }
    types
}

/// A variant's own `#[serde(rename = "...")]`.
fn serde_rename(attrs: &[syn::Attribute]) -> Option<String> {
    let mut name = None;
    for a in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        let _ = a.parse_nested_meta(|m| {
            if m.path.is_ident("rename") {
                name = Some(m.value()?.parse::<syn::LitStr>()?.value());
            }
            Ok(())
        });
    }
    name
}

/// serde's `rename_all = "snake_case"`.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// `value` through `T` and back: what serde fills in for the fields it lacks.
fn round_trip<T: Serialize + DeserializeOwned>(value: &toml::Table) -> Option<toml::Table> {
    let t: T = toml::Value::Table(value.clone()).try_into().ok()?;
    match toml::Value::try_from(&t).ok()? {
        toml::Value::Table(t) => Some(t),
        _ => None,
    }
}

/// The default of each field: `Some(value)`, or `None` when it is required.
type Defaults = BTreeMap<String, Option<String>>;

/// The defaults of the fields of `T` read from a minimal `example` (TOML): a
/// field the example lacks takes serde's value; one it has is required unless
/// `T` still deserialises without it.
fn defaults<T: Serialize + DeserializeOwned>(example: &str) -> Defaults {
    let ex: toml::Table = toml::from_str(example).unwrap();
    let full = round_trip::<T>(&ex).unwrap_or_else(|| panic!("example does not load: {example}"));
    let mut out = Defaults::new();
    for (key, value) in &full {
        let default = match ex.contains_key(key) {
            false => Some(value.to_string()),
            true => {
                let mut less = ex.clone();
                less.remove(key);
                round_trip::<T>(&less).and_then(|t| t.get(key).map(|v| v.to_string()))
            }
        };
        out.insert(key.clone(), default);
    }
    out
}

/// How a Rust field type reads in TOML.
fn toml_type(ty: &str, types: &Types) -> String {
    if let Some(inner) = ty.strip_prefix("Option<").and_then(|t| t.strip_suffix('>')) {
        return format!("{} (optional)", toml_type(inner, types));
    }
    if let Some(inner) = ty.strip_prefix("Vec<").and_then(|t| t.strip_suffix('>')) {
        return format!("array of {}", toml_type(inner, types));
    }
    match ty {
        "f64" | "f32" => "float".into(),
        "i64" | "u64" | "u32" | "u8" | "usize" | "i32" => "integer".into(),
        "bool" => "boolean".into(),
        "PathBuf" => "path".into(),
        "String" => "string".into(),
        "(f64, f64)" => "[float, float]".into(),
        other => match TAGGED.iter().find(|(name, _)| *name == other) {
            Some((_, section)) => format!("a table like [`{section}`](#{})", anchor(section)),
            None if types.enums.contains_key(other) => {
                format!("[{other}](#{})", other.to_lowercase())
            }
            None => format!("table ({other})"),
        },
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn table(out: &mut String, fields: &[Field], defaults: &Defaults, types: &Types) {
    out.push_str("| field | type | default | meaning |\n|---|---|---|---|\n");
    for f in fields {
        if f.name == "kind" {
            continue;
        }
        let default = match defaults.get(&f.name) {
            Some(Some(v)) => format!("`{}`", cell(v)),
            Some(None) => "required".into(),
            None if f.ty.starts_with("Option<") => "absent".into(),
            None => "required".into(),
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            f.name,
            toml_type(&f.ty, types),
            default,
            cell(&f.doc)
        ));
    }
    out.push('\n');
}

/// A section backed by a struct with `Default`.
fn section<T: Serialize + DeserializeOwned>(
    out: &mut String,
    header: &str,
    ty: &str,
    types: &Types,
) {
    section_like::<T>(out, header, ty, "", types);
}

/// [`section`] of a table whose `example` holds its required fields.
fn section_like<T: Serialize + DeserializeOwned>(
    out: &mut String,
    header: &str,
    ty: &str,
    example: &str,
    types: &Types,
) {
    let shape = &types.structs[ty];
    out.push_str(&format!("## `{header}`\n\n{}\n\n", shape.doc));
    table(out, &shape.fields, &defaults::<T>(example), types);
}

/// A section backed by an enum tagged by `kind`, one minimal example per variant.
fn tagged<T: Serialize + DeserializeOwned>(
    out: &mut String,
    header: &str,
    ty: &str,
    examples: &[&str],
    types: &Types,
) {
    let (doc, variants) = &types.enums[ty];
    out.push_str(&format!("## `{header}`\n\n{doc} One of:\n\n"));
    assert_eq!(
        variants.len(),
        examples.len(),
        "{ty}: one example per variant"
    );
    for (v, example) in variants.iter().zip(examples) {
        assert!(
            example.contains(&format!("kind = \"{}\"", v.name)),
            "{example}"
        );
        out.push_str(&format!("### `kind = \"{}\"`\n\n{}\n\n", v.name, v.doc));
        if !v.fields.is_empty() {
            table(out, &v.fields, &defaults::<T>(example), types);
        }
    }
}

/// The values of each enum a field above takes (`rename_all = "snake_case"`).
fn values(out: &mut String, types: &Types, used: &[&str]) {
    out.push_str("## Values\n\n");
    for name in used {
        let (doc, variants) = &types.enums[*name];
        out.push_str(&format!("### {name}\n\n{doc}\n\n"));
        for v in variants {
            out.push_str(&format!("- `\"{}\"`: {}\n", v.name, v.doc));
        }
        out.push('\n');
    }
}

fn generate() -> String {
    let types = read_types();
    let mut out = String::from(
        "# Configuration reference\n\n\
         Every field of a run's TOML file (`dancegrpo train --config`), generated from the \
         configuration types' doc comments and defaults by `crates/dancegrpo/tests/config_reference.rs` \
         (`DANCEGRPO_BLESS=1 cargo test --test config_reference` rewrites it; the test fails when it is \
         stale). A walk-through: [training.md](training.md); complete files: \
         [`configs/demo.toml`](../configs/demo.toml), [`configs/flux-dev-hps.toml`](../configs/flux-dev-hps.toml). \
         Any field can be overridden on the command line with `--set section.key=value`.\n\n",
    );
    tagged::<ModelSource>(
        &mut out,
        "[model]",
        "ModelSource",
        &[
            "kind = \"dir\"\npath = \"/m\"",
            "kind = \"tiny\"\nseed = 0",
            "kind = \"random\"\npath = \"/m\"",
        ],
        &types,
    );
    tagged::<DataSource>(
        &mut out,
        "[data]",
        "DataSource",
        &[
            "kind = \"synthetic\"\nprompts = 16\nseed = 0",
            "kind = \"dataset\"\npath = \"/d\"",
            "kind = \"reference\"\npath = \"/d\"",
        ],
        &types,
    );
    tagged::<RewardSpec>(
        &mut out,
        "[[rewards]]",
        "RewardSpec",
        &[
            "kind = \"jpeg\"\nobjective = \"compressibility\"",
            "kind = \"hpsv2\"\npath = \"/r\"",
            "kind = \"clip_score\"\npath = \"/r\"",
            "kind = \"pickscore\"\npath = \"/r\"",
            "kind = \"remote\"\nurl = \"http://127.0.0.1:1/\"",
        ],
        &types,
    );
    section::<SamplerConfig>(&mut out, "[sampler]", "SamplerConfig", &types);
    section::<SdeWindow>(&mut out, "[sampler.window]", "SdeWindow", &types);
    let tree = "branches = 2\nat = [1]";
    section_like::<Tree>(&mut out, "[sampler.tree]", "Tree", tree, &types);
    section::<GrpoConfig>(&mut out, "[grpo]", "GrpoConfig", &types);
    section::<OptimConfig>(&mut out, "[optim]", "OptimConfig", &types);
    tagged::<LrSchedule>(
        &mut out,
        "[optim.lr_schedule]",
        "LrSchedule",
        &[
            "kind = \"constant_with_warmup\"\nwarmup_steps = 0",
            "kind = \"cosine_with_warmup\"\nwarmup_steps = 0\ntotal_steps = 10",
        ],
        &types,
    );
    section::<LoraConfig>(&mut out, "[optim.lora]", "LoraConfig", &types);
    section::<EmaConfig>(&mut out, "[optim.ema]", "EmaConfig", &types);
    section::<RunConfig>(&mut out, "[run]", "RunConfig", &types);
    section::<EvalConfig>(&mut out, "[eval]", "EvalConfig", &types);
    let blocks =
        "step_start = 20\nstep_interval = 2\nstep_end = 47\nblock_start = 10\nblock_end = 30";
    out.push_str(&format!(
        "## `[eval.cache]`\n\n{} One of (`kind = \"blocks\"` or `kind = \"steps\"` and the fields below):\n\n",
        types.enums["CachePolicy"].0
    ));
    section_like::<BlockCache>(&mut out, "kind = \"blocks\"", "BlockCache", blocks, &types);
    section_like::<StepCache>(
        &mut out,
        "kind = \"steps\"",
        "StepCache",
        "threshold = 0.1",
        &types,
    );
    section::<PrecisionConfig>(&mut out, "[precision]", "PrecisionConfig", &types);
    section::<ParallelConfig>(&mut out, "[parallel]", "ParallelConfig", &types);
    section::<HealthConfig>(&mut out, "[health]", "HealthConfig", &types);
    let mut used: Vec<&str> = Vec::new();
    for line in out.lines() {
        for name in types.enums.keys() {
            if line.contains(&format!("[{name}](#")) && !used.contains(&name.as_str()) {
                used.push(name);
            }
        }
    }
    values(&mut out, &types, &used);
    out.trim_end().to_string() + "\n"
}

fn page() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md")
}

#[test]
fn configuration_reference_is_generated_from_the_code() {
    let now = generate();
    if std::env::var_os("DANCEGRPO_BLESS").is_some() {
        std::fs::write(page(), &now).unwrap();
    }
    let page_text = std::fs::read_to_string(page()).unwrap_or_default();
    assert!(
        page_text == now,
        "docs/configuration.md is stale: run `DANCEGRPO_BLESS=1 ./dev.sh cargo test --release --test config_reference`"
    );
    // it says what a user needs
    for needle in [
        "| `group_size` | integer | `12` |",
        "### `kind = \"remote\"`",
        "| `url` | string | required |",
        "| `learning_rate` | float | `0.00001` |",
        "- `\"shared_per_iteration\"`:",
    ] {
        assert!(now.contains(needle), "{needle}\n{now}");
    }
}
