"""Runs MixGRPO's own run_sample_step (Tencent-Hunyuan/MixGRPO e5cdd6a,
fastvideo/utils/sampling_utils.py) with DPM-Solver++ 2M after the window on a
fake elementwise "transformer" and records every step's input, velocity and
output: the fixture of dancegrpo's test `dpm_steps_replay_mixgrpo`
(crates/dancegrpo/tests/data/mixgrpo/dpm_post.json).

    python tools/mixgrpo_dpm_fixture.py MIXGRPO_CHECKOUT OUT.json

Needs only torch (the diffusers and tqdm imports of that file are stubbed).
"""
import json, sys, types
import torch

# stubs for imports the sampling code does not need here
m = types.ModuleType("diffusers.utils.torch_utils")
m.randn_tensor = lambda shape, generator=None, device=None, dtype=None: torch.randn(shape, generator=generator, device=device, dtype=dtype)
for name in ["diffusers", "diffusers.utils"]:
    sys.modules[name] = types.ModuleType(name)
sys.modules["diffusers.utils.torch_utils"] = m
t = types.ModuleType("tqdm"); t.tqdm = lambda it, **k: it; sys.modules["tqdm"] = t
ns = {}
exec(open(sys.argv[1] + "/fastvideo/utils/sampling_utils.py").read(), ns)

class Fake:
    def __init__(self): self.calls = []
    def eval(self): pass
    def __call__(self, hidden_states, timestep, **kw):
        z = hidden_states.float()
        v = 0.5 * z + 0.1 * torch.sin(3.0 * z) + (timestep.float().view(-1, 1, 1) - 0.5)
        self.calls.append((z.clone(), timestep.float().clone(), v.clone()))
        return [v]

def run(steps, window, compress, variant):
    torch.manual_seed(0)
    args = types.SimpleNamespace(dpm_algorithm_type="dpmsolver++", dpm_apply_strategy="post",
        sample_strategy="progressive", dpm_post_compress_ratio=compress, dpm_solver_order=2,
        dpm_solver_type=variant, flow_grpo_sampling=True, eta=0.7, shift=3.0, drop_last_sample=False)
    sigma = ns["sd3_time_shift"](3.0, torch.linspace(1, 0, steps + 1))
    det = [i not in window for i in range(steps)]
    z = torch.randn(1, 16, 4)
    fake = Fake()
    enc = torch.zeros(1, 8, 4)
    out = ns["run_sample_step"](args, z, range(steps), sigma, fake, enc, torch.zeros(1, 4),
                                torch.zeros(8, 3), torch.zeros(16, 3), True, det)
    all_latents = out[2][0]
    return {
        "steps": steps, "window": window, "compress": compress, "variant": variant,
        "latents": all_latents.reshape(all_latents.shape[0], -1).tolist(),
        "velocities": [c[2].reshape(-1).tolist() for c in fake.calls],
        "timesteps": [c[1][0].item() for c in fake.calls],
    }

cases = [run(25, [0, 1, 2, 3], 0.4, "midpoint"), run(25, [4, 5, 6, 7], 0.2, "midpoint"),
         run(12, [2, 3, 4, 5], 0.6, "heun")]
json.dump({"source": "Tencent-Hunyuan/MixGRPO e5cdd6a fastvideo/utils/sampling_utils.py run_sample_step, dpmsolver++ post, order 2, flow_grpo_sampling, shift 3, a fake elementwise model", "cases": cases}, open(sys.argv[2], "w"))
print([ (len(c["latents"]), len(c["velocities"])) for c in cases])
