#!/usr/bin/env python3
"""CPU timing of ONE GRPO iteration of the original Python DanceGRPO trainer on a benchmark preset
(shared/bench/{tiny,small,medium}: read its README.md and case.json).

A developer tool, not part of the build: the yardstick our `bench train` is compared with.

What it mirrors
---------------
Repository github.com/XueZeyue/DanceGRPO at commit 2149f36f22db601f9dbf70472fea11576f62a0f6
(the commit named in every case.json), file `fastvideo/train_grpo_flux.py`:

    L62-63    sd3_time_shift                L66-105   flux_step (incl. the inert stray expression L99)
    L113-146  prepare_latent_image_ids, pack_latents, unpack_latents
    L148-192  run_sample_step (batch-1 SDE rollout, autocast("cuda") regions: inert on CPU)
    L195-227  grpo_one_step (one trained timestep: transformer.train(), forward, flux_step log-prob)
    L231-341  sample_reference_model (shared bf16 noise draw, per-sample rollout, enable_tiling,
              VaeImageProcessor(16) decode + postprocess + PNG save, HPS reward per sample)
    L344-350  gather_tensor               L352-521  train_one_step (repeat_interleave to G, advantages,
              per-sample randperm, int((S-1)*fraction) forward+backward per sample, clip + AdamW +
              lr_scheduler.step every gradient_accumulation_steps samples, prints, barrier)
    L547-586  HPS reward model set-up (create_model_and_transforms(..., precision='amp',
              light_augmentation=True, output_dict=True), get_tokenizer, eval)
    L591-595, L613-617, L630-668, L713-762   models, AdamW, get_scheduler, LatentDataset +
              DistributedSampler + DataLoader, the loader wrapper and the step loop (step_time is
              measured around train_one_step exactly as main() does)
  and `fastvideo/dataset/latent_flux_rl_datasets.py` L19-94 (LatentDataset, latent_collate_function),
  `fastvideo/utils/communications_flux.py` L262-345 (prepare_sequence_parallel_data,
  sp_parallel_dataloader_wrapper: sp_size 1, frame = 19 branch).
The reward stack is HPSv2's vendored open_clip, imported exactly as the trainer does
(`from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer`; PyPI hpsv2 1.2.0 =
github.com/tgxs002/HPSv2 866735ec: factory.py L309-391, transform.py L26-157 ResizeMaxSize /
image_transform), with the preset's open_clip model config registered under its harness name
(`add_model_config`).

Where it differs from the reference (all forced by CPU / no weights; see also case.json run_conditions)
  * float32 everywhere; no FSDP (world_size 1), so `transformer.clip_grad_norm_` is
    `torch.nn.utils.clip_grad_norm_`; no gradient checkpointing; a single-process gloo group stands
    in for NCCL (all_gather / all_reduce AVG / barrier run on it; were AVG refused, SUM / world_size).
  * the collate yields the captions as a tuple, which train_one_step's type check rejects: they are
    handed on as a list (case.json run_conditions).
  * the initial noise is drawn in bfloat16 (as the reference) and handed on as float32 (same values);
    the VAE is float32 (the reference loads it in bf16 on GPU).
  * weights are seeded random (model_init_seed_base + 0/1/2 for transformer/VAE/reward; init as
    case.json "models.init" describes): no from_pretrained, no HPS checkpoint load.
  * the prompt embeddings come from the case's inputs.safetensors; they are written once as the
    per-prompt .pt files LatentDataset torch.loads (under --workdir), with videos2caption.json.
  * PNGs go to <workdir>/images/flux_0_<i>.png, hps_reward.txt to <workdir>/; the trainer's prints
    and tqdm bars go to <workdir>/train.log; wandb / checkpointing are left out (outside the timed
    train_one_step call in the reference too).
  * --num-workers defaults to 0 (the trainer's CLI default is 10, the published script uses 4; the
    case does not fix it and worker processes would only add noise on a 2-core machine).

Environment (verified on python 3.11.7; torch 2.11.0 comes from the project's venv via PYTHONPATH;
resolved then: huggingface_hub 0.36.2, tokenizers 0.20.3, safetensors 0.8.0, numpy 2.4.6, and
pillow 13.0.0 or 11.3.0: both ran)
-----------
    python3.11 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install diffusers==0.32.0 transformers==4.46.1 safetensors pillow numpy \
        tqdm regex psutil pyyaml ftfy==6.3.1
    # packages whose dependency lists would pull a second torch: install without deps
    /tmp/refenv/bin/pip install --no-deps accelerate==1.16.0 torchvision==0.26.0 hpsv2==1.2.0 \
        clint==0.5.1 args==0.1.0 einops==0.8.2 wcwidth
    # the hpsv2 1.2.0 wheel lacks its BPE vocabulary (identical file, sha256 924691ac...):
    cp ../shared/fixtures/public/flux_tiny_a/reward/bpe_simple_vocab_16e6.txt.gz \
        /tmp/refenv/lib/python3.11/site-packages/hpsv2/src/open_clip/
    # hpsv2's factory does `from turtle import forward`: python needs tkinter (python3-tk).

Run from the repository root (torch 2.11 from the project venv):
    PYTHONPATH=$(readlink -f .venv)/lib/python3.11/site-packages \
        /tmp/refenv/bin/python tools/reference_bench.py --preset tiny [--threads 2] [--iterations 3] \
        [--warmup 1] [--workdir /tmp/reference_bench/tiny] [--num-workers 0] [--bench-dir ../shared/bench]

Output: one JSON line: s/iter (mean of the timed iterations) and each iteration's seconds, the split
rollout (transformer sampling loops) / decode (VAE decode + postprocess + PNG) / reward (HPS
preprocess + tokenize + forward) / update (iteration minus sample_reference_model, the case's
definition: loader, advantages, forward+backward, clip, AdamW), and peak RSS (ru_maxrss) in MiB.
"""
import argparse
import contextlib
import json
import math
import os
import random
import resource
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REF_COMMIT = "2149f36f22db601f9dbf70472fea11576f62a0f6"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", required=True, choices=["tiny", "small", "medium"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations")
    default_bench = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "bench"))
    if not os.path.isdir(default_bench):
        default_bench = "/work/shared/bench"
    p.add_argument("--bench-dir", default=default_bench)
    p.add_argument("--workdir", default=None, help="scratch dir (default /tmp/reference_bench/<preset>)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (trainer's dataloader_num_workers)")
    return p.parse_args()


ARGS = parse_args()
# threads must be fixed before torch (and its OpenMP pool) is loaded
for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_k] = str(ARGS.threads)
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
warnings.filterwarnings("ignore")  # autocast("cuda") on a machine without CUDA, pin_memory, ...

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

torch.set_num_threads(ARGS.threads)

import diffusers  # noqa: E402
from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: E402
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402

try:
    from accelerate.utils import set_seed  # the trainer's seeding (L32, L538)
except Exception:  # pragma: no cover - same effect on CPU
    def set_seed(seed):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

try:
    from hpsv2.src.open_clip import add_model_config, create_model_and_transforms, get_tokenizer
except FileNotFoundError as e:  # the PyPI wheel ships without bpe_simple_vocab_16e6.txt.gz
    sys.exit(f"hpsv2's open_clip cannot load its BPE vocabulary ({e}); copy "
             "shared/fixtures/public/flux_tiny_a/reward/bpe_simple_vocab_16e6.txt.gz there (see docstring)")

# --------------------------------------------------------------------------------------------
# timing accumulators (not in the reference; only perf_counter reads around its own code)
TM = {}


@contextlib.contextmanager
def timed(key):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        TM[key] = TM.get(key, 0.0) + time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# train_grpo_flux.py L62-146
def sd3_time_shift(shift, t):
    return (shift * t) / (1 + (shift - 1) * t)


def flux_step(model_output, latents, eta, sigmas, index, prev_sample, grpo, sde_solver):
    sigma = sigmas[index]
    dsigma = sigmas[index + 1] - sigma
    prev_sample_mean = latents + dsigma * model_output
    pred_original_sample = latents - sigma * model_output
    delta_t = sigma - sigmas[index + 1]
    std_dev_t = eta * math.sqrt(delta_t)
    if sde_solver:
        score_estimate = -(latents - pred_original_sample * (1 - sigma)) / sigma ** 2
        log_term = -0.5 * eta ** 2 * score_estimate
        prev_sample_mean = prev_sample_mean + log_term * dsigma
    if grpo and prev_sample is None:
        prev_sample = prev_sample_mean + torch.randn_like(prev_sample_mean) * std_dev_t
    if grpo:
        log_prob = (
            -((prev_sample.detach().to(torch.float32) - prev_sample_mean.to(torch.float32)) ** 2)
            / (2 * (std_dev_t ** 2))
        )
        # the reference's L99 is a separate (discarded) expression statement: evaluated, not applied
        - math.log(std_dev_t) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
        log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
        return prev_sample, pred_original_sample, log_prob
    return prev_sample_mean, pred_original_sample


def prepare_latent_image_ids(batch_size, height, width, device, dtype):
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    hh, ww, cc = ids.shape
    return ids.reshape(hh * ww, cc).to(device=device, dtype=dtype)


def pack_latents(latents, batch_size, num_channels_latents, height, width):
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch_size, (height // 2) * (width // 2), num_channels_latents * 4)


def unpack_latents(latents, height, width, vae_scale_factor):
    batch_size, num_patches, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch_size, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch_size, channels // (2 * 2), height, width)


# L148-192
def run_sample_step(args, z, progress_bar, sigma_schedule, transformer, encoder_hidden_states,
                    pooled_prompt_embeds, text_ids, image_ids, grpo_sample):
    if grpo_sample:
        all_latents = [z]
        all_log_probs = []
        for i in progress_bar:
            sigma = sigma_schedule[i]
            timestep_value = int(sigma * 1000)
            timesteps = torch.full([encoder_hidden_states.shape[0]], timestep_value, device=z.device,
                                   dtype=torch.long)
            transformer.eval()
            with torch.autocast("cuda", torch.bfloat16):
                pred = transformer(
                    hidden_states=z,
                    encoder_hidden_states=encoder_hidden_states,
                    timestep=timesteps / 1000,
                    guidance=torch.tensor([3.5], device=z.device, dtype=torch.bfloat16),
                    txt_ids=text_ids.repeat(encoder_hidden_states.shape[1], 1),
                    pooled_projections=pooled_prompt_embeds,
                    img_ids=image_ids,
                    joint_attention_kwargs=None,
                    return_dict=False,
                )[0]
            z, pred_original, log_prob = flux_step(pred, z.to(torch.float32), args.eta, sigmas=sigma_schedule,
                                                   index=i, prev_sample=None, grpo=True, sde_solver=True)
            z.to(torch.bfloat16)  # as the reference: result discarded
            all_latents.append(z)
            all_log_probs.append(log_prob)
        latents = pred_original
        all_latents = torch.stack(all_latents, dim=1)
        all_log_probs = torch.stack(all_log_probs, dim=1)
        return z, latents, all_latents, all_log_probs


# L195-227
def grpo_one_step(args, latents, pre_latents, encoder_hidden_states, pooled_prompt_embeds, text_ids,
                  image_ids, transformer, timesteps, i, sigma_schedule):
    transformer.train()
    with torch.autocast("cuda", torch.bfloat16):
        pred = transformer(
            hidden_states=latents,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timesteps / 1000,
            guidance=torch.tensor([3.5], device=latents.device, dtype=torch.bfloat16),
            txt_ids=text_ids.repeat(encoder_hidden_states.shape[1], 1),
            pooled_projections=pooled_prompt_embeds,
            img_ids=image_ids.squeeze(0),
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]
    z, pred_original, log_prob = flux_step(pred, latents.to(torch.float32), args.eta, sigma_schedule, i,
                                           prev_sample=pre_latents.to(torch.float32), grpo=True, sde_solver=True)
    return log_prob


# L231-341
def sample_reference_model(args, device, transformer, vae, encoder_hidden_states, pooled_prompt_embeds,
                           text_ids, reward_model, tokenizer, caption, preprocess_val):
    w, h, t = args.w, args.h, args.t
    sample_steps = args.sampling_steps
    sigma_schedule = torch.linspace(1, 0, args.sampling_steps + 1)
    sigma_schedule = sd3_time_shift(args.shift, sigma_schedule)
    assert len(sigma_schedule) == sample_steps + 1, "sigma_schedule must have length sample_steps + 1"

    B = encoder_hidden_states.shape[0]
    SPATIAL_DOWNSAMPLE = 8
    IN_CHANNELS = 16
    latent_w, latent_h = w // SPATIAL_DOWNSAMPLE, h // SPATIAL_DOWNSAMPLE
    batch_size = 1
    batch_indices = torch.chunk(torch.arange(B), B // batch_size)

    all_latents, all_log_probs, all_rewards, all_image_ids = [], [], [], []
    if args.init_same_noise:
        input_latents = torch.randn((1, IN_CHANNELS, latent_h, latent_w), device=device, dtype=torch.bfloat16)

    for index, batch_idx in enumerate(batch_indices):
        with timed("rollout"):
            batch_encoder_hidden_states = encoder_hidden_states[batch_idx]
            batch_pooled_prompt_embeds = pooled_prompt_embeds[batch_idx]
            batch_text_ids = text_ids[batch_idx]
            batch_caption = [caption[i] for i in batch_idx]
            if not args.init_same_noise:
                input_latents = torch.randn((len(batch_idx), IN_CHANNELS, latent_h, latent_w), device=device,
                                            dtype=torch.bfloat16)
            input_latents_new = pack_latents(input_latents, len(batch_idx), IN_CHANNELS, latent_h, latent_w)
            # CPU float32 run: the bf16 draw is handed on as float32 (same values; case.json run_conditions)
            input_latents_new = input_latents_new.to(torch.float32)
            image_ids = prepare_latent_image_ids(len(batch_idx), latent_h // 2, latent_w // 2, device, torch.bfloat16)
            grpo_sample = True
            progress_bar = tqdm(range(0, sample_steps), desc="Sampling Progress")
            with torch.no_grad():
                z, latents, batch_latents, batch_log_probs = run_sample_step(
                    args, input_latents_new, progress_bar, sigma_schedule, transformer,
                    batch_encoder_hidden_states, batch_pooled_prompt_embeds, batch_text_ids, image_ids, grpo_sample)
            all_image_ids.append(image_ids)
            all_latents.append(batch_latents)
            all_log_probs.append(batch_log_probs)

        with timed("decode"):
            vae.enable_tiling()
            image_processor = VaeImageProcessor(16)
            rank = int(os.environ["RANK"])
            with torch.inference_mode():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    latents = unpack_latents(latents, h, w, 8)
                    latents = (latents / 0.3611) + 0.1159
                    image = vae.decode(latents, return_dict=False)[0]
                    decoded_image = image_processor.postprocess(image)
            decoded_image[0].save(os.path.join(args.workdir, "images", f"flux_{rank}_{index}.png"))

        with timed("reward"):
            if args.use_hpsv2:
                with torch.no_grad():
                    image_path = decoded_image[0]
                    image = preprocess_val(image_path).unsqueeze(0).to(device=device, non_blocking=True)
                    text = tokenizer([batch_caption[0]]).to(device=device, non_blocking=True)
                    with torch.amp.autocast("cuda"):
                        outputs = reward_model(image, text)
                        image_features, text_features = outputs["image_features"], outputs["text_features"]
                        logits_per_image = image_features @ text_features.T
                        hps_score = torch.diagonal(logits_per_image)
                    all_rewards.append(hps_score)

    all_latents = torch.cat(all_latents, dim=0)
    all_log_probs = torch.cat(all_log_probs, dim=0)
    all_rewards = torch.cat(all_rewards, dim=0)
    all_image_ids = torch.stack(all_image_ids, dim=0)
    return all_rewards, all_latents, all_log_probs, sigma_schedule, all_image_ids


# L344-350
def gather_tensor(tensor):
    if not dist.is_initialized():
        return tensor
    world_size = dist.get_world_size()
    gathered = [torch.zeros_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


def all_reduce_avg(t):
    # NCCL's ReduceOp.AVG; gloo has no AVG: SUM over the single rank is the same value
    try:
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    except (RuntimeError, ValueError):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()


# L352-521
def train_one_step(args, device, transformer, vae, reward_model, tokenizer, optimizer, lr_scheduler, loader,
                   noise_scheduler, max_grad_norm, preprocess_val):
    total_loss = 0.0
    optimizer.zero_grad()
    encoder_hidden_states, pooled_prompt_embeds, text_ids, caption = next(loader)
    caption = list(caption)  # the collate gives a tuple; the trainer's type check wants a list (case.json)
    if args.use_group:
        def repeat_tensor(tensor):
            if tensor is None:
                return None
            return torch.repeat_interleave(tensor, args.num_generations, dim=0)

        encoder_hidden_states = repeat_tensor(encoder_hidden_states)
        pooled_prompt_embeds = repeat_tensor(pooled_prompt_embeds)
        text_ids = repeat_tensor(text_ids)
        if isinstance(caption, str):
            caption = [caption] * args.num_generations
        elif isinstance(caption, list):
            caption = [item for item in caption for _ in range(args.num_generations)]
        else:
            raise ValueError(f"Unsupported caption type: {type(caption)}")

    with timed("sample_reference_model"):
        reward, all_latents, all_log_probs, sigma_schedule, all_image_ids = sample_reference_model(
            args, device, transformer, vae, encoder_hidden_states, pooled_prompt_embeds, text_ids,
            reward_model, tokenizer, caption, preprocess_val)
    batch_size = all_latents.shape[0]
    timestep_value = [int(sigma * 1000) for sigma in sigma_schedule][:args.sampling_steps]
    timestep_values = [timestep_value[:] for _ in range(batch_size)]
    device = all_latents.device
    timesteps = torch.tensor(timestep_values, device=all_latents.device, dtype=torch.long)

    samples = {
        "timesteps": timesteps.detach().clone()[:, :-1],
        "latents": all_latents[:, :-1][:, :-1],
        "next_latents": all_latents[:, 1:][:, :-1],
        "log_probs": all_log_probs[:, :-1],
        "rewards": reward.to(torch.float32),
        "image_ids": all_image_ids,
        "text_ids": text_ids,
        "encoder_hidden_states": encoder_hidden_states,
        "pooled_prompt_embeds": pooled_prompt_embeds,
    }
    gathered_reward = gather_tensor(samples["rewards"])
    if dist.get_rank() == 0:
        print("gathered_hps_reward", gathered_reward)
        with open(os.path.join(args.workdir, "hps_reward.txt"), "a") as f:
            f.write(f"{gathered_reward.mean().item()}\n")

    if args.use_group:
        n = len(samples["rewards"]) // args.num_generations
        advantages = torch.zeros_like(samples["rewards"])
        for i in range(n):
            start_idx = i * args.num_generations
            end_idx = (i + 1) * args.num_generations
            group_rewards = samples["rewards"][start_idx:end_idx]
            group_mean = group_rewards.mean()
            group_std = group_rewards.std() + 1e-8
            advantages[start_idx:end_idx] = (group_rewards - group_mean) / group_std
        samples["advantages"] = advantages
    else:
        samples["advantages"] = (samples["rewards"] - gathered_reward.mean()) / (gathered_reward.std() + 1e-8)

    perms = torch.stack([torch.randperm(len(samples["timesteps"][0])) for _ in range(batch_size)]).to(device)
    for key in ["timesteps", "latents", "next_latents", "log_probs"]:
        samples[key] = samples[key][torch.arange(batch_size).to(device)[:, None], perms]
    samples_batched = {k: v.unsqueeze(1) for k, v in samples.items()}
    samples_batched_list = [dict(zip(samples_batched, x)) for x in zip(*samples_batched.values())]
    train_timesteps = int(len(samples["timesteps"][0]) * args.timestep_fraction)
    for i, sample in list(enumerate(samples_batched_list)):
        for _ in range(train_timesteps):
            clip_range = args.clip_range
            adv_clip_max = args.adv_clip_max
            new_log_probs = grpo_one_step(
                args, sample["latents"][:, _], sample["next_latents"][:, _], sample["encoder_hidden_states"],
                sample["pooled_prompt_embeds"], sample["text_ids"], sample["image_ids"], transformer,
                sample["timesteps"][:, _], perms[i][_], sigma_schedule)
            advantages = torch.clamp(sample["advantages"], -adv_clip_max, adv_clip_max)
            ratio = torch.exp(new_log_probs - sample["log_probs"][:, _])
            unclipped_loss = -advantages * ratio
            clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
            loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss)) / (
                args.gradient_accumulation_steps * train_timesteps)
            loss.backward()
            avg_loss = loss.detach().clone()
            all_reduce_avg(avg_loss)
            total_loss += avg_loss.item()
        if (i + 1) % args.gradient_accumulation_steps == 0:
            # FSDP's transformer.clip_grad_norm_ without FSDP (world_size 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(transformer.parameters(), max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if dist.get_rank() % 8 == 0:
            print("hps reward", sample["rewards"].item())
            print("ratio", ratio)
            print("advantage", sample["advantages"].item())
            print("final loss", loss.item())
        dist.barrier()
    return total_loss, grad_norm.item()


# --------------------------------------------------------------------------------------------
# fastvideo/dataset/latent_flux_rl_datasets.py L19-94
class LatentDataset(Dataset):
    def __init__(self, json_path, num_latent_t, cfg_rate):
        self.json_path = json_path
        self.cfg_rate = cfg_rate
        self.datase_dir_path = os.path.dirname(json_path)
        self.prompt_embed_dir = os.path.join(self.datase_dir_path, "prompt_embed")
        self.pooled_prompt_embeds_dir = os.path.join(self.datase_dir_path, "pooled_prompt_embeds")
        self.text_ids_dir = os.path.join(self.datase_dir_path, "text_ids")
        with open(self.json_path, "r") as f:
            self.data_anno = json.load(f)
        self.num_latent_t = num_latent_t
        self.uncond_prompt_embed = torch.zeros(256, 4096).to(torch.float32)
        self.uncond_prompt_mask = torch.zeros(256).bool()
        self.lengths = [d["length"] if "length" in d else 1 for d in self.data_anno]

    def __getitem__(self, idx):
        prompt_embed_file = self.data_anno[idx]["prompt_embed_path"]
        pooled_prompt_embeds_file = self.data_anno[idx]["pooled_prompt_embeds_path"]
        text_ids_file = self.data_anno[idx]["text_ids"]
        if random.random() < self.cfg_rate:
            prompt_embed = self.uncond_prompt_embed  # (unreachable with cfg 0, as in the reference)
        else:
            prompt_embed = torch.load(os.path.join(self.prompt_embed_dir, prompt_embed_file),
                                      map_location="cpu", weights_only=True)
            pooled_prompt_embeds = torch.load(os.path.join(self.pooled_prompt_embeds_dir, pooled_prompt_embeds_file),
                                              map_location="cpu", weights_only=True)
            text_ids = torch.load(os.path.join(self.text_ids_dir, text_ids_file), map_location="cpu",
                                  weights_only=True)
        return prompt_embed, pooled_prompt_embeds, text_ids, self.data_anno[idx]["caption"]

    def __len__(self):
        return len(self.data_anno)


def latent_collate_function(batch):
    prompt_embeds, pooled_prompt_embeds, text_ids, caption = zip(*batch)
    prompt_embeds = torch.stack(prompt_embeds, dim=0)
    pooled_prompt_embeds = torch.stack(pooled_prompt_embeds, dim=0)
    text_ids = torch.stack(text_ids, dim=0)
    return prompt_embeds, pooled_prompt_embeds, text_ids, caption


# fastvideo/utils/communications_flux.py L262-271 (sp_size 1) and L312-345
def prepare_sequence_parallel_data(encoder_hidden_states, pooled_prompt_embeds, text_ids, caption):
    return encoder_hidden_states, pooled_prompt_embeds, text_ids, caption


def sp_parallel_dataloader_wrapper(dataloader, device, train_batch_size, sp_size, train_sp_batch_size):
    while True:
        for data_item in dataloader:
            encoder_hidden_states, pooled_prompt_embeds, text_ids, caption = data_item
            encoder_hidden_states = encoder_hidden_states.to(device)
            pooled_prompt_embeds = pooled_prompt_embeds.to(device)
            text_ids = text_ids.to(device)
            frame = 19
            if frame == 1:
                yield encoder_hidden_states, pooled_prompt_embeds, text_ids, caption
            else:
                encoder_hidden_states, pooled_prompt_embeds, text_ids, caption = prepare_sequence_parallel_data(
                    encoder_hidden_states, pooled_prompt_embeds, text_ids, caption)
                assert train_batch_size * sp_size >= train_sp_batch_size
                for it in range(train_batch_size * sp_size // train_sp_batch_size):
                    st_idx = it * train_sp_batch_size
                    ed_idx = (it + 1) * train_sp_batch_size
                    encoder_hidden_states = encoder_hidden_states[st_idx:ed_idx]
                    pooled_prompt_embeds = pooled_prompt_embeds[st_idx:ed_idx]
                    text_ids = text_ids[st_idx:ed_idx]
                    yield encoder_hidden_states, pooled_prompt_embeds, text_ids, caption


# --------------------------------------------------------------------------------------------
# seeded random weights (case.json "models.init"); timing does not depend on the values
def init_flux_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
        for m in model.modules():
            if type(m).__name__ in ("RMSNorm", "LayerNorm") and getattr(m, "weight", None) is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))


def perturb_vae_(vae, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm) and m.affine:
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=g))


def perturb_clip_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name or name.endswith("class_embedding"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def hp_get(hp, prefix):
    for k, v in hp.items():
        if k == prefix or k.startswith(prefix + " "):
            return v
    raise KeyError(prefix)


def make_args(case, workdir):
    hp = case["hyperparameters"]
    a = argparse.Namespace()
    for k in ["h", "w", "t", "num_generations", "sampling_steps", "eta", "shift", "timestep_fraction",
              "clip_range", "adv_clip_max", "gradient_accumulation_steps", "learning_rate", "weight_decay",
              "max_grad_norm", "lr_scheduler", "lr_warmup_steps", "init_same_noise", "use_group", "use_hpsv2",
              "train_sp_batch_size", "sp_size"]:
        setattr(a, k, hp_get(hp, k))
    a.train_batch_size = hp_get(hp, "train_batch_size")
    a.adam_betas = tuple(hp["adam_betas"])
    a.adam_eps = hp["adam_eps"]
    a.lr_num_cycles, a.lr_power, a.cfg, a.num_latent_t = 1, 1.0, 0.0, 1
    seeds = case["seeds"]
    a.seed = next(v for k, v in seeds.items() if k.startswith("train_seed"))
    a.sampler_seed = seeds["sampler_seed"]
    a.model_init_seed_base = seeds["model_init_seed_base"]
    a.workdir = workdir
    a.dataloader_num_workers = ARGS.num_workers
    return a


def write_dataset(case_dir, case, workdir):
    """The preprocessed-embedding layout LatentDataset reads (videos2caption.json + .pt files)."""
    t = load_file(os.path.join(case_dir, "inputs.safetensors"))
    prompts = case["prompts (dataset order)"]
    anno = []
    for sub in ("prompt_embed", "pooled_prompt_embeds", "text_ids"):
        os.makedirs(os.path.join(workdir, "data", sub), exist_ok=True)
    for i, cap in enumerate(prompts):
        torch.save(t["prompt_embeds"][i].clone(), os.path.join(workdir, "data", "prompt_embed", f"{i}.pt"))
        torch.save(t["pooled_prompt_embeds"][i].clone(), os.path.join(workdir, "data", "pooled_prompt_embeds", f"{i}.pt"))
        torch.save(t["text_ids"][i].clone(), os.path.join(workdir, "data", "text_ids", f"{i}.pt"))
        anno.append({"prompt_embed_path": f"{i}.pt", "pooled_prompt_embeds_path": f"{i}.pt", "text_ids": f"{i}.pt",
                     "caption": cap})
    path = os.path.join(workdir, "data", "videos2caption.json")
    with open(path, "w") as f:
        json.dump(anno, f)
    return path


def main():
    case_dir = os.path.join(ARGS.bench_dir, ARGS.preset)
    with open(os.path.join(case_dir, "case.json")) as f:
        case = json.load(f)
    workdir = ARGS.workdir or os.path.join("/tmp/reference_bench", ARGS.preset)
    os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
    args = make_args(case, workdir)
    device = torch.device("cpu")
    rank = int(os.environ["RANK"])

    dist.init_process_group("gloo", init_method=f"file://{workdir}/pg_store_{os.getpid()}", rank=0, world_size=1)

    # reward model (L547-586), the preset's config registered under the harness's registry name
    reward_name = next(v for k, v in case["models"].items() if k.startswith("reward_model_name"))
    cfg_dir = os.path.join(workdir, "open_clip_configs")
    os.makedirs(cfg_dir, exist_ok=True)
    with open(os.path.join(case_dir, "reward", "model_config.json")) as f:
        model_cfg = json.load(f)
    with open(os.path.join(cfg_dir, f"{reward_name}.json"), "w") as f:
        json.dump(model_cfg, f)
    add_model_config(cfg_dir)
    torch.manual_seed(args.model_init_seed_base + 2)
    reward_model, preprocess_train, preprocess_val = create_model_and_transforms(
        reward_name, None, precision="amp", device=device, jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    perturb_clip_(reward_model, args.model_init_seed_base + 2)  # stands in for load_state_dict(HPS ckpt)
    tokenizer = get_tokenizer(reward_name)
    reward_model = reward_model.to(device)
    reward_model.eval()

    # transformer (L591-595; master weights float32) and VAE (L613-617; float32 on CPU)
    torch.manual_seed(args.model_init_seed_base)
    transformer = FluxTransformer2DModel.from_config(
        FluxTransformer2DModel.load_config(os.path.join(case_dir, "transformer"))).to(torch.float32)
    init_flux_(transformer, args.model_init_seed_base)
    torch.manual_seed(args.model_init_seed_base + 1)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(case_dir, "vae"))).to(torch.float32)
    perturb_vae_(vae, args.model_init_seed_base + 1)
    vae = vae.to(device)
    transformer.train()
    noise_scheduler = None

    params_to_optimize = list(filter(lambda p: p.requires_grad, transformer.parameters()))
    optimizer = torch.optim.AdamW(params_to_optimize, lr=args.learning_rate, betas=args.adam_betas,
                                  weight_decay=args.weight_decay, eps=args.adam_eps)
    init_steps = 0
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=1000000, num_cycles=args.lr_num_cycles, power=args.lr_power,
                                 last_epoch=init_steps - 1)

    json_path = write_dataset(case_dir, case, workdir)
    train_dataset = LatentDataset(json_path, args.num_latent_t, args.cfg)
    sampler = DistributedSampler(train_dataset, rank=rank, num_replicas=1, shuffle=True, seed=args.sampler_seed)
    train_dataloader = DataLoader(train_dataset, sampler=sampler, collate_fn=latent_collate_function,
                                  pin_memory=True, batch_size=args.train_batch_size,
                                  num_workers=args.dataloader_num_workers, drop_last=True)
    loader = sp_parallel_dataloader_wrapper(train_dataloader, device, args.train_batch_size, args.sp_size,
                                            args.train_sp_batch_size)
    sampler.set_epoch(0)

    n_params = {
        "transformer": sum(p.numel() for p in transformer.parameters()),
        "vae_decoder": sum(p.numel() for p in vae.decoder.parameters()),
        "reward": sum(p.numel() for p in reward_model.parameters()),
    }

    set_seed(args.seed + rank)  # once, before the warm-up iteration (case.json seeds)
    log = open(os.path.join(workdir, "train.log"), "w")
    iters = []
    loss = grad_norm = None
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        progress_bar = tqdm(range(0, 100000), initial=init_steps, desc="Steps")
        for step in range(init_steps + 1, init_steps + 1 + ARGS.warmup + ARGS.iterations):
            TM.clear()
            start_time = time.perf_counter()
            loss, grad_norm = train_one_step(args, device, transformer, vae, reward_model, tokenizer, optimizer,
                                             lr_scheduler, loader, noise_scheduler, args.max_grad_norm,
                                             preprocess_val)
            step_time = time.perf_counter() - start_time
            srm = TM.get("sample_reference_model", 0.0)
            iters.append({"iter_s": step_time, "rollout_s": TM.get("rollout", 0.0), "decode_s": TM.get("decode", 0.0),
                          "reward_s": TM.get("reward", 0.0), "sample_reference_model_s": srm,
                          "update_s": step_time - srm})
            progress_bar.set_postfix({"loss": f"{loss:.4f}", "step_time": f"{step_time:.2f}s", "grad_norm": grad_norm})
            progress_bar.update(1)
        progress_bar.close()
    log.close()
    dist.destroy_process_group()

    timed_iters = iters[ARGS.warmup:]
    mean = lambda k: sum(it[k] for it in timed_iters) / max(1, len(timed_iters))  # noqa: E731
    out = {
        "bench": "reference_python_dancegrpo",
        "reference": f"XueZeyue/DanceGRPO@{REF_COMMIT[:8]} fastvideo/train_grpo_flux.py train_one_step",
        "preset": ARGS.preset,
        "threads": ARGS.threads,
        "warmup": ARGS.warmup,
        "iterations": len(timed_iters),
        "s_per_iter": round(mean("iter_s"), 4),
        "iter_s": [round(it["iter_s"], 4) for it in timed_iters],
        "rollout_s": round(mean("rollout_s"), 4),
        "decode_s": round(mean("decode_s"), 4),
        "reward_s": round(mean("reward_s"), 4),
        "update_s": round(mean("update_s"), 4),
        "sample_reference_model_s": round(mean("sample_reference_model_s"), 4),
        "warmup_iter_s": [round(it["iter_s"], 4) for it in iters[:ARGS.warmup]],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "params": n_params,
        "last_loss": loss,
        "last_grad_norm": grad_norm,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "num_workers": ARGS.num_workers,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
