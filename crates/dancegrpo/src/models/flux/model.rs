//! `FluxTransformer2DModel`: embeddings, double-stream blocks, single-stream
//! blocks and the continuous AdaLN output head, with optional per-block
//! activation checkpointing for training.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use tch::{Device, Kind, Tensor};

use super::blocks::{DoubleBlock, SingleBlock};
use super::config::FluxConfig;
use super::embeddings::{Rope, TimeTextEmbed};

mod cached;
mod ulysses;
mod units;
use crate::error::{Error, Result};
use crate::models::lora::LoraConfig;
use crate::models::{ActivationCheckpointing, FlowInputs, Residency, VelocityModel};
use crate::nn::{cast, layer_norm, upcast_kind, AdapterSwitch, Linear};
use crate::weights::{Checkpoint, ParamStore, Source, VarBuilder};
pub use ulysses::SequenceParallel;

/// Named intermediate activations of one forward pass (for alignment debugging).
pub type Trace = BTreeMap<String, Tensor>;

/// The FLUX.1 transformer (a velocity model over packed latent tokens).
pub struct FluxTransformer {
    config: FluxConfig,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    x_embedder: Linear,
    transformer_blocks: Vec<DoubleBlock>,
    single_transformer_blocks: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
    params: ParamStore,
    adapters: Option<(ParamStore, LoraConfig)>,
    /// Turns the adapters off for the reference policy's velocity.
    adapter_switch: AdapterSwitch,
    checkpointing: ActivationCheckpointing,
    /// The dtype the forward pass computes in (the parameters' unless set).
    compute: Kind,
    /// Where the parameter units live while computing (sharded training).
    residency: Option<Rc<dyn Residency>>,
}

/// Embedded inputs shared by all blocks.
struct Embedded {
    img: Tensor,  // (b, L, D)
    txt: Tensor,  // (b, Lt, D)
    temb: Tensor, // (b, D)
}

impl FluxTransformer {
    /// Builds the model with parameters from `source`, of `kind` on `device`.
    pub fn new(config: FluxConfig, source: Source, kind: Kind, device: Device) -> Result<Self> {
        let params = ParamStore::new();
        let vb = VarBuilder::new(source, &params, kind, device);
        let (d, heads, hd) = (
            config.inner_dim(),
            config.num_attention_heads,
            config.attention_head_dim,
        );
        let time_text_embed = TimeTextEmbed::new(
            &vb.pp("time_text_embed"),
            d,
            config.pooled_projection_dim,
            config.guidance_embeds,
        )?;
        let context_embedder = Linear::new(
            &vb.pp("context_embedder"),
            config.joint_attention_dim,
            d,
            true,
        )?;
        let x_embedder = Linear::new(&vb.pp("x_embedder"), config.in_channels, d, true)?;
        let transformer_blocks = (0..config.num_layers)
            .map(|i| DoubleBlock::new(&vb.pp("transformer_blocks").pp(i), d, heads, hd))
            .collect::<Result<Vec<_>>>()?;
        let single_transformer_blocks = (0..config.num_single_layers)
            .map(|i| SingleBlock::new(&vb.pp("single_transformer_blocks").pp(i), d, heads, hd))
            .collect::<Result<Vec<_>>>()?;
        let norm_out = Linear::new(&vb.pp("norm_out").pp("linear"), d, 2 * d, true)?;
        let proj_out = Linear::new(&vb.pp("proj_out"), d, config.out_channels(), true)?;
        if let Source::Checkpoint(ck) = source {
            params.check_all_used(ck)?;
        }
        Ok(FluxTransformer {
            config,
            time_text_embed,
            context_embedder,
            x_embedder,
            transformer_blocks,
            single_transformer_blocks,
            norm_out,
            proj_out,
            params,
            adapters: None,
            adapter_switch: AdapterSwitch::default(),
            checkpointing: ActivationCheckpointing::Off,
            compute: kind,
            residency: None,
        })
    }

    /// Loads a diffusers `transformer/` directory (config.json + safetensors, single or sharded).
    ///
    /// ```
    /// use dancegrpo::models::flux::FluxTransformer;
    /// use dancegrpo::models::{PolicyModel, VelocityModel};
    /// use std::path::Path;
    ///
    /// // the reference fixture's tiny FLUX (FLUX.1-dev loads the same way)
    /// let dir = Path::new("../../../shared/fixtures/public/flux_tiny_a/transformer");
    /// let model = FluxTransformer::from_dir(dir, tch::Kind::Float, tch::Device::Cpu)?;
    /// assert!(model.guidance_embeds());
    /// assert!(model.parameters().len() > 10);
    /// # Ok::<(), dancegrpo::Error>(())
    /// ```
    pub fn from_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let config = FluxConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open_dir(dir, "diffusion_pytorch_model")?;
        Self::new(config, Source::Checkpoint(&ck), kind, device)
    }

    /// Writes a diffusers `transformer/` directory (`config.json` and
    /// `diffusion_pytorch_model.safetensors` with diffusers key names), each file atomically.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let params: Vec<(String, Tensor)> = self
            .params
            .named()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        self.write_dir(dir, &params)
    }

    /// Writes `params` (diffusers key names) and this architecture's config as a
    /// diffusers `transformer/` directory, each file atomically.
    pub(super) fn write_dir(&self, dir: &Path, params: &[(String, Tensor)]) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let text = self.config_json();
        crate::io::atomic::write_bytes_atomic(&dir.join("config.json"), text.as_bytes())?;
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        crate::io::safetensors::write_safetensors(
            dir.join("diffusion_pytorch_model.safetensors"),
            params,
            &meta,
        )
    }

    /// The diffusers `config.json` of this architecture.
    pub fn config_json(&self) -> String {
        let mut cfg = serde_json::to_value(&self.config).expect("serialisable config");
        cfg["_class_name"] = "FluxTransformer2DModel".into();
        cfg["_diffusers_version"] = "0.32.0".into();
        serde_json::to_string_pretty(&cfg).expect("json")
    }

    /// The architecture.
    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// Attaches LoRA adapters (A seeded from `seed`, B zero) and freezes the base
    /// weights: from then on [`VelocityModel::parameters`] lists only the
    /// adapters. Returns how many layers were adapted.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<usize> {
        if self.adapters.is_some() {
            return Err(Error::Input("LoRA adapters are already attached".into()));
        }
        let adapters = ParamStore::new();
        let n =
            crate::models::lora::attach(&self.params, &adapters, cfg, seed, &self.adapter_switch)?;
        for (_, p) in self.params.named() {
            let _ = p.set_requires_grad(false);
        }
        self.adapters = Some((adapters, cfg.clone()));
        Ok(n)
    }

    /// The adapters and their configuration, when attached.
    pub fn lora(&self) -> Option<(&ParamStore, &LoraConfig)> {
        self.adapters.as_ref().map(|(a, c)| (a, c))
    }

    /// The module names of the linear layers (`transformer_blocks.0.attn.to_q`).
    pub fn linear_names(&self) -> Vec<String> {
        self.params.linears().into_iter().map(|(n, _)| n).collect()
    }

    /// The base weights (all of them, whatever is being trained).
    pub fn base_parameters(&self) -> Vec<(String, Tensor)> {
        self.params.named()
    }

    /// Computes the forward and backward passes in `kind` (bfloat16 for mixed
    /// precision over float32 weights): inputs are cast to it on entry, every
    /// layer casts its weights to it as it uses them, and the velocity comes out
    /// in float32 (float64 for a float64 model).
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute = kind;
    }

    /// The dtype the forward pass computes in.
    pub fn compute_kind(&self) -> Kind {
        self.compute
    }

    /// Turns per-block activation checkpointing on or off for `velocity_backward`.
    pub fn set_checkpointing(&mut self, mode: ActivationCheckpointing) {
        self.checkpointing = mode;
    }

    fn check_inputs(&self, x: &FlowInputs) -> Result<()> {
        let (h, t, p) = (x.latents.size(), x.text.size(), x.pooled.size());
        let c = &self.config;
        let ok = h.len() == 3
            && t.len() == 3
            && p.len() == 2
            && h[2] == c.in_channels
            && t[2] == c.joint_attention_dim
            && p[1] == c.pooled_projection_dim
            && t[0] == h[0]
            && p[0] == h[0]
            && x.text_ids.size() == [t[1], 3]
            && x.image_ids.size() == [h[1], 3];
        if !ok {
            return Err(Error::Input(format!(
                "FLUX inputs do not fit the model (in_channels {}, joint_attention_dim {}, pooled {}): latents {h:?}, text {t:?}, pooled {p:?}, text_ids {:?}, image_ids {:?}",
                c.in_channels, c.joint_attention_dim, c.pooled_projection_dim, x.text_ids.size(), x.image_ids.size()
            )));
        }
        if self.time_text_embed.has_guidance() && x.guidance.is_none() {
            return Err(Error::Input(
                "this FLUX model has a guidance embedding: a guidance value is required".into(),
            ));
        }
        Ok(())
    }

    fn embed(&self, x: &FlowInputs) -> Embedded {
        let kind = self.compute;
        let img = self.x_embedder.forward(&cast(x.latents, kind));
        let t = x.timestep.to_kind(kind) * 1000.0;
        let g = x.guidance.map(|g| g.to_kind(kind) * 1000.0);
        let temb = self
            .time_text_embed
            .forward(&t, g.as_ref(), &cast(x.pooled, kind));
        let txt = self.context_embedder.forward(&cast(x.text, kind));
        Embedded { img, txt, temb }
    }

    fn rope(&self, x: &FlowInputs) -> Rope {
        let ids = Tensor::cat(&[x.text_ids, x.image_ids], 0);
        Rope::new(&ids, &self.config.axes_dims_rope, self.compute)
    }

    /// `AdaLayerNormContinuous` + `proj_out` on the image tokens of `x` (b, Lt + L, D).
    fn head(&self, x: &Tensor, temb: &Tensor, lt: i64) -> (Tensor, Tensor) {
        let img = x.narrow(1, lt, x.size()[1] - lt);
        let emb = self
            .norm_out
            .forward(&temb.silu().to_kind(img.kind()))
            .chunk(2, 1); // scale, shift
        let normed = layer_norm(&img, 1e-6) * (emb[0].unsqueeze(1) + 1.0) + emb[1].unsqueeze(1);
        // the velocity leaves in float32 (float64), whatever the compute dtype
        let out = self.proj_out.forward(&normed);
        (normed, cast(&out, upcast_kind(out.kind())))
    }

    /// Forward pass recording the reference's debug activations into `trace`.
    pub fn forward_traced(&self, x: &FlowInputs, mut trace: Option<&mut Trace>) -> Result<Tensor> {
        self.check_inputs(x)?;
        let mut rec = |name: String, t: &Tensor| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.insert(name, t.detach().copy());
            }
        };
        self.acquire(self.unit_embed())?;
        let e = self.embed(x);
        self.done_with(self.unit_embed())?;
        rec("x_embedder".into(), &e.img);
        rec("time_text_embed".into(), &e.temb);
        rec("context_embedder".into(), &e.txt);
        let rope = self.rope(x);
        rec("pos_embed.0".into(), &rope.cos);
        rec("pos_embed.1".into(), &rope.sin);
        let (mut img, mut txt) = (e.img, e.txt);
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            self.acquire(self.unit_double(i))?;
            (txt, img) = block.forward(&img, &txt, &e.temb, &rope);
            self.done_with(self.unit_double(i))?;
            rec(format!("transformer_blocks.{i}.0"), &txt);
            rec(format!("transformer_blocks.{i}.1"), &img);
        }
        let lt = txt.size()[1];
        let mut h = Tensor::cat(&[txt, img], 1);
        for (i, block) in self.single_transformer_blocks.iter().enumerate() {
            self.acquire(self.unit_single(i))?;
            h = block.forward(&h, &e.temb, &rope);
            self.done_with(self.unit_single(i))?;
            rec(format!("single_transformer_blocks.{i}"), &h);
        }
        self.acquire(self.unit_head())?;
        let (normed, out) = self.head(&h, &e.temb, lt);
        self.done_with(self.unit_head())?;
        rec("norm_out".into(), &normed);
        rec("proj_out".into(), &out);
        Ok(out)
    }
}

impl VelocityModel for FluxTransformer {
    fn velocity(&self, inputs: &FlowInputs) -> Result<Tensor> {
        self.forward_traced(inputs, None)
    }

    fn layout(&self) -> &dyn crate::models::TokenLayout {
        &super::packing::FluxPacking
    }

    fn cacheable_blocks(&self) -> usize {
        self.transformer_blocks.len() + self.single_transformer_blocks.len()
    }

    fn velocity_blocks(
        &self,
        inputs: &FlowInputs,
        span: std::ops::Range<usize>,
        reuse: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.forward_span(inputs, span, reuse)
    }

    fn velocity_backward(
        &self,
        inputs: &FlowInputs,
        loss_fn: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self.checkpointing {
            ActivationCheckpointing::Off => {
                let loss = loss_fn(&self.velocity(inputs)?)?;
                loss.backward();
                Ok(loss)
            }
            ActivationCheckpointing::PerBlock => {
                super::checkpoint::backward_per_block(self, inputs, loss_fn)
            }
        }
    }

    /// Under LoRA: the velocity with every adapter off (the base model),
    /// without gradients. A fully fine-tuned model holds no reference.
    fn reference_velocity(&self, inputs: &FlowInputs) -> Result<Option<Tensor>> {
        if self.adapters.is_none() {
            return Ok(None);
        }
        let _off = self.adapter_switch.off();
        tch::no_grad(|| self.velocity(inputs)).map(Some)
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        match &self.adapters {
            Some((adapters, _)) => adapters.named(),
            None => self.params.named(),
        }
    }
}

/// Access for the checkpointed backward pass (same module).
impl FluxTransformer {
    pub(super) fn parts(&self) -> (&[DoubleBlock], &[SingleBlock]) {
        (&self.transformer_blocks, &self.single_transformer_blocks)
    }

    pub(super) fn embed_inputs(&self, x: &FlowInputs) -> Result<(Tensor, Tensor, Tensor, Rope)> {
        self.check_inputs(x)?;
        let e = self.embed(x);
        Ok((e.img, e.txt, e.temb, self.rope(x)))
    }

    pub(super) fn output_head(&self, x: &Tensor, temb: &Tensor, lt: i64) -> Tensor {
        self.head(x, temb, lt).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Philox;

    struct Inputs {
        z: Tensor,
        t: Tensor,
        text: Tensor,
        pooled: Tensor,
        txt_ids: Tensor,
        img_ids: Tensor,
        g: Tensor,
    }

    fn inputs(cfg: &FluxConfig, b: i64) -> Inputs {
        let mut rng = Philox::new(3, 0);
        Inputs {
            z: rng.normal_tensor(&[b, 16, cfg.in_channels]),
            t: Tensor::from_slice(&[0.5f32, 0.25][..b as usize]), // exact in bf16 after x1000
            text: rng.normal_tensor(&[b, 8, cfg.joint_attention_dim]),
            pooled: rng.normal_tensor(&[b, cfg.pooled_projection_dim]),
            txt_ids: crate::models::flux::packing::text_ids(8, Device::Cpu),
            img_ids: crate::models::flux::packing::image_ids(8, 8, Device::Cpu),
            g: Tensor::from_slice(&[4.0f32, 4.0][..b as usize]),
        }
    }

    fn flow<'a>(x: &'a Inputs) -> FlowInputs<'a> {
        FlowInputs {
            latents: &x.z,
            timestep: &x.t,
            text: &x.text,
            pooled: &x.pooled,
            text_ids: &x.txt_ids,
            image_ids: &x.img_ids,
            guidance: Some(&x.g),
        }
    }

    fn grads(model: &FluxTransformer, x: &Inputs, w: &Tensor) -> Vec<(String, Tensor)> {
        for (_, p) in model.parameters() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let _loss = model
            .velocity_backward(&flow(x), &mut |v| Ok((v * w).sum(Kind::Float)))
            .unwrap();
        model
            .parameters()
            .into_iter()
            .map(|(n, p)| (n, p.grad().copy()))
            .collect()
    }

    #[test]
    fn every_parameter_gets_a_gradient_and_checkpointing_matches() {
        let cfg = FluxConfig {
            num_layers: 2,
            num_single_layers: 2,
            ..FluxConfig::tiny()
        };
        let mut model =
            FluxTransformer::new(cfg.clone(), Source::Seeded(11), Kind::Float, Device::Cpu)
                .unwrap();
        let x = inputs(&cfg, 2);
        let w = Philox::new(5, 0).normal_tensor(&[2, 16, cfg.in_channels]);
        let plain = grads(&model, &x, &w);
        for (name, g) in &plain {
            assert!(
                g.defined() && g.abs().max().double_value(&[]) > 0.0,
                "no gradient reached {name}"
            );
        }
        model.set_checkpointing(ActivationCheckpointing::PerBlock);
        let ckpt = grads(&model, &x, &w);
        assert_eq!(plain.len(), ckpt.len());
        for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
            let (rel, _) = crate::align::errors(b, a);
            assert!(
                rel < 1e-5,
                "{name}: checkpointed gradient differs (rel {rel:e})"
            );
        }
    }

    #[test]
    fn parameter_names_follow_diffusers_order_and_count() {
        let cfg = FluxConfig::tiny();
        let model = FluxTransformer::new(cfg, Source::Seeded(1), Kind::Float, Device::Cpu).unwrap();
        let names: Vec<String> = model.parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names[0],
            "time_text_embed.timestep_embedder.linear_1.weight"
        );
        assert_eq!(names.last().unwrap(), "proj_out.bias");
        let i = names
            .iter()
            .position(|n| n == "transformer_blocks.0.attn.add_k_proj.weight")
            .unwrap();
        assert_eq!(names[i + 4], "transformer_blocks.0.attn.add_q_proj.weight");
        assert_eq!(names.len(), 12 + 4 + 32 + 2 * 14 + 4);
    }

    #[test]
    fn bf16_forward_follows_f32() {
        let cfg = FluxConfig::tiny();
        let f32m =
            FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::Float, Device::Cpu).unwrap();
        let bf16m =
            FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::BFloat16, Device::Cpu)
                .unwrap();
        let x = inputs(&cfg, 1);
        let a = tch::no_grad(|| f32m.velocity(&flow(&x))).unwrap();
        let xb = Inputs {
            z: x.z.to_kind(Kind::BFloat16),
            text: x.text.to_kind(Kind::BFloat16),
            pooled: x.pooled.to_kind(Kind::BFloat16),
            ..inputs(&cfg, 1)
        };
        let b = tch::no_grad(|| bf16m.velocity(&flow(&xb))).unwrap();
        // the velocity leaves in float32 for the SDE step
        assert_eq!(b.kind(), Kind::Float);
        let (rel, _) = crate::align::errors(&b, &a);
        assert!(rel < 5e-2, "bf16 output too far from f32: {rel}");
    }

    #[test]
    fn bf16_compute_over_f32_weights_gives_f32_gradients() {
        let cfg = FluxConfig::tiny();
        let f32m =
            FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::Float, Device::Cpu).unwrap();
        let mut mixed =
            FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::Float, Device::Cpu).unwrap();
        mixed.set_compute_kind(Kind::BFloat16);
        let stored =
            FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::BFloat16, Device::Cpu)
                .unwrap();
        let x = inputs(&cfg, 2);
        let a = tch::no_grad(|| f32m.velocity(&flow(&x))).unwrap();
        let b = tch::no_grad(|| mixed.velocity(&flow(&x))).unwrap();
        assert_eq!(b.kind(), Kind::Float);
        let (rel, _) = crate::align::errors(&b, &a);
        assert!(rel > 1e-4 && rel < 5e-2, "bf16 compute vs f32: {rel}");
        // the same bfloat16 arithmetic as a model stored in bfloat16
        let xb = Inputs {
            z: x.z.to_kind(Kind::BFloat16),
            text: x.text.to_kind(Kind::BFloat16),
            pooled: x.pooled.to_kind(Kind::BFloat16),
            ..inputs(&cfg, 2)
        };
        let c = tch::no_grad(|| stored.velocity(&flow(&xb))).unwrap();
        assert!(b.equal(&c), "bf16 compute differs from bf16 storage");
        // gradients reach the float32 master weights in float32
        let w = Tensor::randn_like(&b);
        let _ = mixed
            .velocity_backward(&flow(&x), &mut |v| Ok((v * &w).sum(Kind::Float)))
            .unwrap();
        for (name, p) in mixed.parameters() {
            assert_eq!(p.kind(), Kind::Float, "{name}");
            assert_eq!(p.grad().kind(), Kind::Float, "{name}");
        }
    }

    #[test]
    fn mismatched_inputs_are_rejected() {
        let cfg = FluxConfig::tiny();
        let model =
            FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::Float, Device::Cpu).unwrap();
        let mut x = inputs(&cfg, 1);
        x.text = Tensor::zeros([1, 8, 7], (Kind::Float, Device::Cpu));
        let err = model.velocity(&flow(&x)).err().unwrap().to_string();
        assert!(
            err.contains("joint_attention_dim 32") && err.contains("text [1, 8, 7]"),
            "{err}"
        );
    }

    #[test]
    fn lora_starts_as_the_identity_and_trains_only_adapters() {
        let cfg = FluxConfig::tiny();
        let mut model =
            FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::Float, Device::Cpu).unwrap();
        let x = inputs(&cfg, 2);
        let before = tch::no_grad(|| model.velocity(&flow(&x))).unwrap();
        let lcfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        };
        let n = model.attach_lora(&lcfg, 7).unwrap();
        // double block: 8 attention + 4 feed-forward; each single block: q, k, v, proj_mlp
        assert_eq!(n, 12 + 2 * 4);
        let after = tch::no_grad(|| model.velocity(&flow(&x))).unwrap();
        assert!(
            before.equal(&after),
            "B = 0: the adapted model equals the base"
        );
        let names: Vec<String> = model.parameters().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().all(|n| n.contains(".lora_")), "{names:?}");
        assert!(names.contains(&"transformer_blocks.0.attn.to_q.lora_A.weight".to_string()));
        let w = Tensor::ones_like(&before);
        let g = grads(&model, &x, &w);
        // B gets a gradient (A's is zero while B is zero)
        assert!(g.iter().any(|(n, t)| n.ends_with("lora_B.weight")
            && t.abs().sum(Kind::Float).double_value(&[]) > 0.0));
        assert!(model
            .base_parameters()
            .iter()
            .all(|(_, p)| !p.requires_grad()));
        assert!(model.attach_lora(&lcfg, 7).is_err());
        // per-block checkpointing: the frozen embeddings need no backward, and
        // the adapters get the plain backward's gradients
        let plain = grads(&model, &x, &w);
        model.set_checkpointing(ActivationCheckpointing::PerBlock);
        let blocked = grads(&model, &x, &w);
        for ((n, a), (_, b)) in plain.iter().zip(&blocked) {
            let (rel, _) = crate::align::errors(b, a);
            assert!(rel < 1e-5, "{n}: {rel}");
        }
    }
}
