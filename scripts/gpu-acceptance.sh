#!/usr/bin/env bash
# scripts/gpu-acceptance.sh: the GPU acceptance run, one JSON summary on stdout.
#
#   scripts/gpu-acceptance.sh [--bin PATH] [--device cuda:0|cpu] [--small]
#                             [--fixtures CASE_DIR] [--gpu-memory 139GiB] [--out DIR]
#
# On a CUDA machine with the `cuda` binary and that machine's torch 2.11 libraries:
#   1. `dancegrpo env`;
#   2. `align` on the public fixture on the device (float32, TF32 off), judged as on
#      the CPU (against the float64 truth, relative to the reference's own error);
#   3. the device's bf16 matmul rate (`bench matmul`), the peak MFU is reported against;
#   4. GRPO training on a FLUX.1-dev-shaped transformer with random weights drawn on
#      the device (19 double + 38 single blocks, inner 3072, T5 length 512, pooled 768,
#      guidance embeddings; FLUX's VAE; the fixture's small HPSv2-style reward), bf16,
#      at 512x512 and 1024x1024, (a) LoRA rank 64 and (b) full fine-tuning with
#      `sharding = "full"` on one process; each run first asks `plan` whether it fits
#      and is skipped, with the figure, when it does not.
#   Per run: seconds per iteration (the second; the first warms up) and its stages,
#   transformer TFLOP per iteration counted analytically (`plan`), MFU against the
#   measured peak, and peak device memory (the CUDA caching allocator's);
#   5. fast inference on the same model at the smaller size, bf16, 50 ODE steps
#      (`bench generate`): the DiTCache seed schedule and a whole-step cache against
#      no cache (speed-up; the quality figures mean little on random weights);
#   6. with 2 or more GPUs (2 Gloo processes on the CPU) and a torch launcher:
#      Ulysses sequence parallelism over all of them against one (`bench generate
#      --sequence-parallel N`); skipped, saying why, otherwise;
#   7. the host CPU, for the speed issue's bfloat16 target (3x our float32 on a CPU
#      with AMX or AVX512-BF16; this project's own machines have AVX512-BF16 at most,
#      no AMX, and reach 1.6x): the medium
#      timing preset (tiny with --small), fast settings, float32 then bfloat16, on all
#      the host's cores, with the CPU's model and its AMX / AVX512-BF16 flags.
# `--device cpu --small` runs the same end to end on a small shape in a minute or so
# (a test runs it), so the script cannot rot while no GPU is lent.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/target/release/dancegrpo
DEVICE=cuda:0
SMALL=0
FIXTURES=$ROOT/../shared/fixtures/public/flux_tiny_a
GPU_MEMORY=
OUT=

while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --small) SMALL=1; shift ;;
        --fixtures) FIXTURES=$2; shift 2 ;;
        --gpu-memory) GPU_MEMORY=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "gpu-acceptance: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -x "$BIN" ] || { echo "gpu-acceptance: no binary at $BIN (--bin)" >&2; exit 2; }
[ -f "$FIXTURES/case.json" ] || { echo "gpu-acceptance: no case at $FIXTURES (--fixtures)" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d -t dancegrpo-acceptance.XXXXXX)}
mkdir -p "$OUT"
log() { echo "gpu-acceptance: $*" >&2; }
start=$(date +%s)

# device memory for the plans: the GPU's, else the host's
if [ -z "$GPU_MEMORY" ]; then
    if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null; then
        GPU_MEMORY="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i "${DEVICE#cuda:}" | head -1)MiB"
    else
        GPU_MEMORY="$(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo)MiB"
    fi
fi

log "env"
"$BIN" env --json > "$OUT/env.json"

log "align on $DEVICE"
"$BIN" align "$FIXTURES" --device "$DEVICE" --json > "$OUT/align.json" || true

log "bf16 matmul rate"
size=8192; [ "$SMALL" = 1 ] && size=512
"$BIN" bench matmul --device "$DEVICE" --dtype bf16 --size "$size" --repeats 10 | tail -1 > "$OUT/matmul.json"

# the model directory: architectures only, weights drawn on the device
model=$OUT/model
mkdir -p "$model/transformer" "$model/vae"
if [ "$SMALL" = 1 ]; then
    cat > "$model/transformer/config.json" <<'EOF'
{"_class_name": "FluxTransformer2DModel", "attention_head_dim": 16, "num_attention_heads": 4,
 "num_layers": 2, "num_single_layers": 2, "in_channels": 64, "joint_attention_dim": 64,
 "pooled_projection_dim": 32, "guidance_embeds": true, "axes_dims_rope": [4, 6, 6]}
EOF
    cp "$FIXTURES/vae/config.json" "$model/vae/config.json"
    sizes="64 128"; text_len=32; rank=8
else
    cp "$ROOT/crates/dancegrpo/tests/data/flux1-dev/transformer/config.json" "$model/transformer/"
    cp "$ROOT/crates/dancegrpo/tests/data/flux1-dev/vae/config.json" "$model/vae/"
    sizes="512 1024"; text_len=512; rank=64
fi

run_one() { # size mode
    local size=$1 mode=$2 name="run-$1-$2" cfg
    cfg=$OUT/$name.toml
    {
        echo "[model]"; echo "kind = \"random\""; echo "path = \"$model\""
        echo "[data]"; echo "kind = \"synthetic\""; echo "prompts = 2"; echo "seed = 0"; echo "text_len = $text_len"
        echo "[[rewards]]"; echo "kind = \"hpsv2\""; echo "path = \"$FIXTURES/reward\""
        echo "[sampler]"; echo "height = $size"; echo "width = $size"; echo "steps = 4"
        echo "group_size = 2"; echo "rollout_batch = 2"; echo "decode_batch = 1"
        echo "[grpo]"; echo "timestep_fraction = 0.5"
        echo "[optim]"; echo "gradient_accumulation = 2"; echo "activation_checkpointing = \"per_block\""
        [ "$mode" = lora ] && { echo "[optim.lora]"; echo "rank = $rank"; echo "alpha = $((2 * rank)).0"; }
        echo "[run]"; echo "iterations = 2"; echo "prompts_per_iteration = 1"
        echo "checkpoint_every = 100"; echo "keep_checkpoints = 1"; echo "tensorboard = false"
        echo "[eval]"; echo "every = 0"; echo "prompts = 1"
        echo "[precision]"; echo "mode = \"bf16\""
        [ "$mode" = full ] && { echo "[parallel]"; echo "sharding = \"full\""; }
    } > "$cfg"
    "$BIN" plan "$cfg" --gpu-memory "$GPU_MEMORY" --json > "$OUT/$name.plan.json" || true
    if python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["fits"] else 1)' "$OUT/$name.plan.json"; then
        log "$name: training"
        rm -rf "${OUT:?}/$name"
        if "$BIN" train --config "$cfg" --out "$OUT/$name" --device "$DEVICE" > "$OUT/$name.stdout" 2> "$OUT/$name.stderr"; then
            echo 0 > "$OUT/$name.exit"
        else
            echo $? > "$OUT/$name.exit"
            log "$name: failed (see $OUT/$name.stderr)"
        fi
    else
        log "$name: skipped, plan says it does not fit in $GPU_MEMORY"
    fi
}

for size in $sizes; do
    for mode in lora full; do
        run_one "$size" "$mode"
    done
done

# fast inference: caches on one process, then sequence parallelism
gen_size=${sizes%% *}; gen_steps=50   # the smaller size: 3 settings x 2 samplings x 50 steps stay ~1 min
[ "$SMALL" = 1 ] && gen_steps=12
gen_args=(bench generate "random:$model" --size "$gen_size" --text-len "$text_len" --steps "$gen_steps"
          --images 1 --rounds 1 --precision bf16 --device "$DEVICE")
log "bench generate: caches"
"$BIN" "${gen_args[@]}" --cache seed --cache 'steps-0.05={kind="steps",threshold=0.05}' \
    > "$OUT/generate.txt" 2> "$OUT/generate.stderr" || log "bench generate failed (see $OUT/generate.stderr)"
if [ "$DEVICE" = cpu ]; then
    procs=2
else
    # the GPUs torch sees (CUDA_VISIBLE_DEVICES respected)
    procs=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("cuda_device_count") or 1)' "$OUT/env.json")
fi
launcher=()
if python3 -c 'import torch.distributed.run' 2>/dev/null; then
    launcher=(python3 -m torch.distributed.run)
elif command -v torchrun >/dev/null; then
    launcher=(torchrun)
fi
if [ "$procs" -lt 2 ]; then
    echo "one device" > "$OUT/sequence-parallel.skipped"
elif [ ${#launcher[@]} = 0 ]; then
    echo "no torch launcher (python3 -m torch.distributed.run, torchrun)" > "$OUT/sequence-parallel.skipped"
else
    log "bench generate: sequence parallelism over $procs processes"
    "${launcher[@]}" --standalone --nproc-per-node "$procs" --no-python "$BIN" "${gen_args[@]}" \
        --sequence-parallel "$procs" > "$OUT/sequence-parallel.txt" 2> "$OUT/sequence-parallel.stderr" \
        || log "sequence parallelism failed (see $OUT/sequence-parallel.stderr)"
fi

log "host CPU: bench train, float32 and bfloat16"
preset=medium; [ "$SMALL" = 1 ] && preset=tiny
fast=(--rollout-batch 4 --decode-batch 4 --update-batching window)
for precision in fp32 bf16; do
    "$BIN" bench train --preset "$preset" --threads "$(nproc)" --iterations 2 "${fast[@]}" \
        --precision "$precision" > "$OUT/cpu-$precision.txt" 2> "$OUT/cpu-$precision.stderr" \
        || log "bench train $precision failed (see $OUT/cpu-$precision.stderr)"
done

OUT="$OUT" SIZES="$sizes" DEVICE="$DEVICE" SMALL="$SMALL" SECONDS_TOTAL=$(( $(date +%s) - start )) python3 - <<'EOF'
import json, os
out = os.environ["OUT"]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
env, align, matmul = load("env.json"), load("align.json"), load("matmul.json")
peak = matmul["tflops"] if matmul else None
runs = []
for size in os.environ["SIZES"].split():
    for mode in ("lora", "full"):
        name = f"run-{size}-{mode}"
        plan = load(f"{name}.plan.json")
        run = {"size": int(size), "mode": mode, "plan_gib": plan and round(plan["total"] / 2**30, 2),
               "fits": plan and plan["fits"]}
        metrics = os.path.join(out, name, "metrics.jsonl")
        exit_path = os.path.join(out, f"{name}.exit")
        ran = os.path.exists(exit_path) and open(exit_path).read().strip() == "0"
        if ran and os.path.exists(metrics):
            lines = [json.loads(l) for l in open(metrics) if l.strip()]
            last = lines[-1]
            s = last["seconds"]
            total = s["rollout"] + s["decode"] + s["reward"] + s["update"]
            t = plan["tflop"]
            tflop = t["rollout"] + t["update"]
            run.update(iterations=len(lines), seconds_per_iteration=round(total, 4),
                       stages={k: round(v, 4) for k, v in s.items()},
                       tflop_per_iteration=round(tflop, 6), recompute_tflop=round(t["recompute"], 6),
                       mfu=round(tflop / total / peak, 4) if peak and total > 0 else None)
            for l in open(os.path.join(out, f"{name}.stdout")):
                if l.startswith("peak memory: "):
                    run["peak_memory_mib"] = json.loads(l[len("peak memory: "):])
        else:
            run["status"] = "skipped (does not fit)" if plan and not plan["fits"] else "failed"
        if ran:
            run["status"] = "ok"
        runs.append(run)
def bench_line(name):
    try:
        with open(os.path.join(out, name)) as f:
            lines = [l for l in f if l.startswith("{")]
        figures = json.loads(lines[-1])["figures"]
    except (OSError, ValueError, IndexError, KeyError):
        return None
    keep = ("label", "processes", "seconds_per_image", "speedup", "blocks_run", "psnr", "ssim", "latent_rel_l2")
    return [{k: f[k] for k in keep} for f in figures]
skipped = os.path.join(out, "sequence-parallel.skipped")
sequence = ({"skipped": open(skipped).read().strip()} if os.path.exists(skipped)
            else {"figures": bench_line("sequence-parallel.txt")})
def host_cpu():
    flags, model = set(), None
    for l in open("/proc/cpuinfo"):
        key, _, value = l.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "model name" and model is None:
            model = value.strip()
    def seconds(precision):
        try:
            lines = [l for l in open(os.path.join(out, f"cpu-{precision}.txt")) if l.startswith("{")]
            return json.loads(lines[-1])["seconds_per_iteration"]
        except (OSError, ValueError, IndexError, KeyError):
            return None
    fp32, bf16 = seconds("fp32"), seconds("bf16")
    return {"model": model, "cores": os.cpu_count(), "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "fp32_seconds_per_iteration": fp32,
            "bf16_seconds_per_iteration": bf16, "bf16_speedup": round(fp32 / bf16, 3) if fp32 and bf16 else None}
stages = align["stages"] if align else []
summary = {
    "device": os.environ["DEVICE"], "small": os.environ["SMALL"] == "1",
    "libtorch": env and env.get("libtorch"), "cuda_available": env and env.get("cuda_available"),
    "cuda_feature": env and env.get("cuda_feature"),
    "align": {"pass": bool(align and align["pass"]),
              "stages": {s["name"]: {"pass": s["pass"], "worst": s["worst"], "vs_truth": s.get("truth_err"),
                                     "bound": s["bound"]} for s in stages}},
    "bf16_matmul_tflops": peak, "runs": runs,
    "generate": bench_line("generate.txt"), "sequence_parallel": sequence, "host_cpu": host_cpu(), "seconds": int(os.environ["SECONDS_TOTAL"]), "out": out,
}
print(json.dumps(summary))
EOF
