#!/usr/bin/env python3
"""Makes a case in the FORMAT.md layout (../shared/fixtures/FORMAT.md) from an existing case's
models, with an independent plain-PyTorch + diffusers replay: `expected.safetensors` (float32,
free-running, the reference's quirks) and `expected_f64.safetensors` (float64, teacher forced as
FORMAT.md's last section says). Rewards are synthetic (no open_clip here), so the case has no
reward tensors: run `align` on it with `--stages` leaving out `reward` and `text_encoding`.

A developer tool, not part of the build. It needs diffusers 0.32.0 beside the project's torch:

    .venv/bin/python -m pip install --target /tmp/pydeps diffusers==0.32.0 numpy
    PYDEPS=/tmp/pydeps LR=1e-3 SEED=11 .venv/bin/python tools/make_case.py \
        ../shared/fixtures/public/flux_tiny_a /tmp/cases/synth_k4

(Defaults: 1 prompt x G = 8 samples, 6 steps, accumulation GA = 2: 4 optimizer steps; set P, G,
GA, LR, SEED in the environment, e.g. P=3 G=4 GA=3 for 12 samples in 3 groups and 4 steps.)
"""
import sys, os, json, math, shutil, struct
sys.path.insert(0, os.environ.get('PYDEPS', '/tmp/pydeps'))
import torch
DT={"F32":torch.float32,"F64":torch.float64,"I64":torch.int64,"U8":torch.uint8,"BF16":torch.bfloat16,"F16":torch.float16,"I32":torch.int32}
def load(p):
    b=open(p,'rb').read(); n=struct.unpack('<Q',b[:8])[0]; h=json.loads(b[8:8+n]); base=8+n; out={}
    meta=h.pop('__metadata__',None)
    for k,v in h.items():
        s,e=v['data_offsets']; t=torch.frombuffer(bytearray(b[base+s:base+e]),dtype=DT[v['dtype']]) if e>s else torch.empty(0,dtype=DT[v['dtype']])
        out[k]=t.reshape(v["shape"]).clone()
    return out,meta

import diffusers.models.embeddings as E
import diffusers.models.normalization as N
from diffusers import FluxTransformer2DModel, AutoencoderKL

src, out = sys.argv[1], sys.argv[2]
env = lambda k, d: type(d)(os.environ.get(k, d))
P, G, GA, S, FRAC, LR, SEED = env('P', 1), env('G', 8), env('GA', 2), 6, 0.6, env('LR', 1e-4), env('SEED', 7)
torch.set_num_threads(1)
cj = json.load(open(src + '/case.json'))
hp = dict(cj['hyperparameters'])
hp.update({'num_generations': G, 'gradient_accumulation_steps': GA, 'sampling_steps': S, 'train_batch_size (prompts per iteration)': P,
           'timestep_fraction': FRAC, 'learning_rate': LR})
eta, shift, clip, advmax = hp['eta'], hp['shift'], hp['clip_range'], hp['adv_clip_max']
wd, (b1, b2), eps, maxnorm = hp['weight_decay'], hp['adam_betas'], hp['adam_eps'], hp['max_grad_norm']
B = P * G; T = int((S - 1) * FRAC); K = B // GA
inp_src, _ = load(src + '/inputs.safetensors')

# ---- float64 islands off (the truth's rule) -------------------------------------------
_float = torch.Tensor.float
def islands(f64):
    if f64:
        torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else _float(self, *a, **k)
    else:
        torch.Tensor.float = _float
_gte = E.get_timestep_embedding
def gte(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000):
    if timesteps.dtype != torch.float64:
        return _gte(timesteps, embedding_dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    half = embedding_dim // 2
    ex = -math.log(max_period) * torch.arange(0, half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = timesteps[:, None] * torch.exp(ex)[None, :] * scale
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb
E.get_timestep_embedding = gte
_rms = N.RMSNorm.forward
def rms(self, x):
    if x.dtype != torch.float64:
        return _rms(self, x)
    v = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(v + self.eps)
    return x * self.weight if self.weight is not None else x
N.RMSNorm.forward = rms

def models(dtype):
    c = {k: v for k, v in json.load(open(src + '/transformer/config.json')).items() if not k.startswith('_')}
    m = FluxTransformer2DModel(**c); m.load_state_dict(load(src + '/transformer/diffusion_pytorch_model.safetensors')[0]); m.to(dtype).train()
    c = {k: v for k, v in json.load(open(src + '/vae/config.json')).items() if not k.startswith('_')}
    v = AutoencoderKL(**c); v.load_state_dict(load(src + '/vae/diffusion_pytorch_model.safetensors')[0], strict=False); v.to(dtype).eval()
    return m, v

# ---- inputs ----------------------------------------------------------------------------
g = torch.Generator().manual_seed(SEED)
h = w = 8; L = 16
init = torch.randn(1, 16, h, w, generator=g).to(torch.bfloat16).float()
sde_noise = torch.randn(B, S, L, 64, generator=g)
perms = torch.stack([torch.randperm(S - 1, generator=g) for _ in range(B)])
rewards = (0.3 + 0.02 * torch.randn(B, generator=g)).float()
inputs = {k: inp_src[k] for k in ['txt_ids', 'img_ids', 'guidance']}
# prompt 0 is the source case's; the others are it plus seeded noise
extra = lambda t: torch.cat([t] + [t + 0.1 * torch.randn(t.shape, generator=g) for _ in range(P - 1)])
inputs.update(prompt_embeds=extra(inp_src['prompt_embeds'][:1]), pooled_prompt_embeds=extra(inp_src['pooled_prompt_embeds'][:1]),
              text_ids=inp_src['text_ids'][:1].repeat(P, 1))
inputs.update(init_noise=init, sde_noise=sde_noise, perms=perms)

def pack(x): return x.view(1, 16, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, L, 64)
def unpack(x): return x.view(1, h // 2, w // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, h, w)

def schedule(dtype):
    lin = torch.linspace(1, 0, S + 1, dtype=dtype)
    return lin, (shift * lin) / (1 + (shift - 1) * lin)
lin32, sig32 = schedule(torch.float32)
ti = (sig32[:S] * 1000).to(torch.int64)   # int() truncation of float32 values (all positive)

def step(v, z, i, sig, noise=None, prev=None):
    f64 = z.dtype == torch.float64
    s, sn = sig[i], sig[i + 1]; ds = sn - s
    mean = z + ds * v; x0 = z - s * v
    std = eta * math.sqrt(float(s - sn))
    score = -(z - x0 * (1 - s)) / s ** 2
    mean = mean + ((-0.5 * eta ** 2) * score) * ds
    if prev is None:
        prev = mean + noise * (std if f64 else torch.tensor(std, dtype=torch.float32))
    var2 = 2 * std ** 2
    lp = (-((prev.detach() - mean) ** 2) / (var2 if f64 else torch.tensor(var2, dtype=torch.float32))).mean(dim=tuple(range(1, mean.ndim)))
    return prev, x0, lp, std

def call(m, z, t, dtype, b):
    q = b // G
    return m(hidden_states=z, encoder_hidden_states=inputs['prompt_embeds'][q:q + 1].to(dtype), pooled_projections=inputs['pooled_prompt_embeds'][q:q + 1].to(dtype),
             timestep=t, guidance=torch.tensor([3.5], dtype=dtype), txt_ids=inputs['txt_ids'].to(dtype), img_ids=inputs['img_ids'].to(dtype), return_dict=False)[0]

def advantages(r):
    a = torch.zeros_like(r)
    for k in range(0, B, G):
        gr = r[k:k + G]; a[k:k + G] = (gr - gr.mean()) / (gr.std() + 1e-8)
    return a, torch.clamp(a, -advmax, advmax)

def train(m, lat, olp, adv, sig, dtype, rec):
    params = [p for _, p in m.named_parameters()]
    names = [n for n, _ in m.named_parameters()]
    mom = [torch.zeros_like(p) for p in params]; vel = [torch.zeros_like(p) for p in params]
    step_n = 0; total = 0.0
    for b in range(B):
        for k in range(T):
            j = int(perms[b, k])
            t = (ti[j:j + 1].to(dtype) / 1000)
            v = call(m, lat[b, j][None], t, dtype, b)
            _, _, lp, _ = step(v, lat[b, j][None], j, sig, prev=lat[b, j + 1][None])
            ratio = torch.exp(lp - olp[b, j])
            un = -adv[b] * ratio; cl = -adv[b] * torch.clamp(ratio, 1 - clip, 1 + clip)
            loss = torch.mean(torch.maximum(un, cl)) / (GA * T)
            loss.backward(); total += loss.item()
            for key, val in [('sigma_index', torch.tensor(j)), ('timesteps', ti[j]), ('timestep_input', t[0]), ('latents', lat[b, j]), ('next_latents', lat[b, j + 1]),
                             ('model_output', v[0]), ('old_log_probs', olp[b, j]), ('new_log_probs', lp[0]), ('log_ratio', (lp - olp[b, j])[0]), ('ratio', ratio[0]),
                             ('ratio_clamped', torch.clamp(ratio, 1 - clip, 1 + clip)[0]), ('unclipped_loss', un[0]), ('clipped_loss', cl[0]), ('loss', loss)]:
                rec.setdefault('train/' + key, {})[(b, k)] = val.detach().clone()
        if (b + 1) % GA == 0:
            with torch.no_grad():
                if step_n == 0:
                    for n, p in zip(names, params): rec['grad_window0/' + n] = p.grad.clone()
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad, 2) for p in params]), 2)
                coef = torch.clamp(maxnorm / (norm + 1e-6), max=1.0)
                for p in params: p.grad.mul_(coef)
                step_n += 1
                bc1 = 1 - b1 ** step_n; bc2s = (1 - b2 ** step_n) ** 0.5; ss = LR / bc1
                for p, mm, vv in zip(params, mom, vel):
                    p.mul_(1 - LR * wd); mm.lerp_(p.grad, 1 - b1); vv.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    p.addcdiv_(mm, (vv.sqrt() / bc2s).add_(eps), value=-ss)
                    p.grad = None
                rec.setdefault('optim/grad_norm', []).append(norm.clone()); rec.setdefault('optim/lr', []).append(LR)
                if step_n == 1:
                    for n, p in zip(names, params): rec['params_after_step1/' + n] = p.detach().clone()
    for n, p in zip(names, params): rec['params_after_final/' + n] = p.detach().clone()
    rec['optim/returned_grad_norm'] = float(rec['optim/grad_norm'][-1]); rec['train/total_loss'] = total

def finish(rec, dtype):
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out[k] = torch.stack([torch.stack([v[(b, kk)] for kk in range(T)]) for b in range(B)])
        elif isinstance(v, list):
            out[k] = torch.tensor([float(x) for x in v], dtype=torch.float64) if k == 'optim/lr' else torch.stack(v)
        elif isinstance(v, float):
            out[k] = torch.tensor(v, dtype=torch.float64)
        else:
            out[k] = v
    return out

def run(dtype, stored=None):
    f64 = dtype == torch.float64
    islands(f64)
    m, vae = models(dtype)
    lin, sig = schedule(dtype)
    rec = {'sigmas_linspace': lin, 'sigmas': sig, 'timestep_ints': ti,
           'std_dev_t': torch.tensor([eta * math.sqrt(float(sig[i] - sig[i + 1])) for i in range(S)], dtype=torch.float64)}
    lats, x0s, lps, vs, tis = [], [], [], [], []
    with torch.no_grad():
        for b in range(B):
            z = pack(init).to(dtype); zl, xl, ll, vl = [z[0]], [], [], []
            for i in range(S):
                zin = stored['sample/latents'][b, i][None].to(dtype) if f64 else z
                t = ti[i:i + 1].to(dtype) / 1000
                v = call(m, zin, t, dtype, b)
                z, x0, lp, _ = step(v, zin, i, sig, noise=sde_noise[b, i][None].to(dtype))
                zl.append(z[0]); xl.append(x0[0]); ll.append(lp[0]); vl.append(v[0])
            lats.append(torch.stack(zl)); x0s.append(torch.stack(xl)); lps.append(torch.stack(ll)); vs.append(torch.stack(vl))
            tis.append(ti.to(dtype) / 1000)
        rec.update({'sample/latents': torch.stack(lats), 'sample/pred_x0': torch.stack(x0s), 'sample/log_probs': torch.stack(lps),
                    'sample/model_output': torch.stack(vs), 'sample/timestep_input': torch.stack(tis)})
        if f64: rec['sample/latents'][:, 0] = stored['sample/latents'][:, 0].double()
        src_x0 = (stored if f64 else rec)['sample/pred_x0'][:, S - 1].to(dtype)
        vin = torch.cat([unpack(src_x0[b][None]) / 0.3611 + 0.1159 for b in range(B)])
        rec['decode/vae_input'] = vin
        dec_in = stored['decode/vae_input'].to(dtype) if f64 else vin
        img = torch.cat([vae.decode(dec_in[b:b + 1]).sample for b in range(B)])
        rec['decode/image'] = img
        rec['decode/image_uint8'] = stored['decode/image_uint8'] if f64 else torch.round(torch.clamp(img * 0.5 + 0.5, 0, 1).permute(0, 2, 3, 1) * 255).to(torch.uint8)
        rec['rewards'] = rewards.to(dtype)
        a, ac = advantages(rewards.to(dtype))
        rec['advantages'], rec['advantages_clamped'] = a, ac
    src_rec = stored if f64 else rec
    train(m, src_rec['sample/latents'].to(dtype), src_rec['sample/log_probs'].to(dtype), ac, sig, dtype, rec)
    out = finish(rec, dtype)
    if f64:
        for k in ['train/timesteps', 'train/sigma_index', 'train/latents', 'train/next_latents', 'train/old_log_probs', 'timestep_ints', 'decode/image_uint8']:
            out[k] = stored[k]
        out = {k: (v.double() if v.dtype.is_floating_point else v) for k, v in out.items()}
    return out

def save(path, tensors):
    hdr = {}; blobs = []; off = 0
    DT = {torch.float32: 'F32', torch.float64: 'F64', torch.int64: 'I64', torch.uint8: 'U8'}
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous()
        b = bytes(t.reshape(-1).view(torch.uint8).tolist()) if t.numel() else b''
        hdr[k] = {'dtype': DT[t.dtype], 'shape': list(t.shape), 'data_offsets': [off, off + len(b)]}
        blobs.append(b); off += len(b)
    h = json.dumps(hdr).encode(); h += b' ' * ((8 - len(h) % 8) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(h))); f.write(h)
        for b in blobs: f.write(b)

os.makedirs(out, exist_ok=True)
for d in ['transformer', 'vae', 'text_encoders']:
    if not os.path.exists(out + '/' + d): shutil.copytree(src + '/' + d, out + '/' + d)
exp = run(torch.float32)
truth = run(torch.float64, stored=exp)
islands(False)
save(out + '/inputs.safetensors', inputs)
save(out + '/expected.safetensors', exp)
save(out + '/expected_f64.safetensors', truth)
cj.update({'case': os.path.basename(out), 'hyperparameters': hp, 'sample_captions': cj['sample_captions'][:1] * B,
           'description': 'synthetic case (plain PyTorch + diffusers replay, synthetic rewards)'})
json.dump(cj, open(out + '/case.json', 'w'), indent=1)
print('wrote', out, 'K =', K, 'T =', T, 'B =', B, 'clipped in later windows:', int((exp['train/ratio'] - exp['train/ratio_clamped']).abs().gt(0).sum()))
