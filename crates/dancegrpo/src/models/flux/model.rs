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
mod checkpoint;
mod ulysses;
mod units;
use crate::adapter::AdapterSwitch;
use crate::error::{Error, Result};
use crate::models::lora::LoraConfig;
use crate::models::{ActivationCheckpointing, FlowInputs, Residency, VelocityModel};
use crate::nn::{cast, layer_norm, upcast_kind, Linear};
use crate::weights::{Checkpoint, ParamStore, Source, VarBuilder};

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

    fn velocity_sequence_parallel(
        &self,
        inputs: &FlowInputs,
        c: &dyn crate::dist::Collective,
    ) -> Result<Tensor> {
        self.velocity_ulysses(inputs, c)
    }

    fn check_sequence_split(&self, image_tokens: i64, world: i64) -> Result<()> {
        let heads = self.config.num_attention_heads;
        if image_tokens % world != 0 || heads % world != 0 {
            return Err(Error::Input(format!(
                "sequence parallelism over {world} processes needs image tokens ({image_tokens}) and heads ({heads}) divisible by {world}"
            )));
        }
        Ok(())
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
                checkpoint::backward_per_block(self, inputs, loss_fn)
            }
        }
    }

    fn plain_backward(&self) -> bool {
        self.checkpointing == ActivationCheckpointing::Off
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
mod tests;
