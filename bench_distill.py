"""bench_distill.py - time and memory of one Stage 2 round: its passes, the fused schedule vs the released three-pass one.

The released code runs (1) a no-grad student rollout, (2) teacher means at the stored states,
(3) a gradient-carrying student recomputation at the same states. distill.py fuses (1) and
(3): the student's gradient-carrying prediction IS its rollout prediction. This file holds
the three-pass schedule as the reference (test_opd.py checks that both give the same
gradient in float64) and times both in one run, so the ratio is measured under the same load.

    python bench_distill.py                  # toy: the shipped base/, ~1 min on 2 cores: a round's profile (passes,
                                             # schedules, floors) and evaluation sampling folded vs as a branch
    python bench_distill.py --sample-steps 3 --repeats 5     # docs/experiments.md, "Stage 2 on GenEval: sampled steps"
    python bench_distill.py --size tiny --threads 1   # SD3.5-M's architecture, shrunk, on the CPU: ~1 min
    python bench_distill.py --size full --dtype bf16 --repeats 2 --json runs/bench_full.json   # on a GPU

--size tiny | full (nothing is downloaded): SD3.5-Medium's transformer from its published config
(SD35M; tiny: TINY, 2 layers of width 128) with random weights and random text conditioning of
SD3's shape; K = 3 random teacher LoRAs and the trainable student LoRA (r 32) on one backbone.
Timed: one task's share of a Stage 2 round (Alg. 1) at B prompts per task on one device, CFG 4.5,
the scheduler's 10-step grid (9 steps trained: sampler.trained_steps), ODE rollouts (Eq. 12):

  fused        distill.distill_task: per step one student forward (grad), one teacher forward, the KL's backward
  three_pass   three_pass_task below: rollout (no grad), teacher means, student recomputation (grad) + backward
  floor        the network work alone: one step's student velocity with its backward plus one teacher
               velocity, x (trained steps); fused / floor is the schedule's overhead over network time

It prints a JSON (main() defines its fields; --json PATH also writes it) and a table: seconds per
round, peak memory, K adapters vs K + 1 full copies, and (full size, CUDA) whether the paper's 3
prompts per task fit an 80 GB GPU. On a shared CPU use --threads 1 (why: docs/experiments.md,
"Measuring on a shared 2-core CPU"). Measured: docs/real_scale.md, "The benchmark (bench_distill.py)".
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import runs
import sampler as S
import distill as D
from distill import distill_task

HERE = Path(__file__).resolve().parent

# SD3.5-Medium's transformer, as published (stabilityai/stable-diffusion-3.5-medium,
# transformer/config.json), in diffusers' SD3Transformer2DModel argument names: 2.24B parameters
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
             attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
             caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
             qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
# the same architecture shrunk for a CPU test: 2 layers (one dual-attention), 4 heads x 32 = 128
# wide (caption_projection_dim must equal that width), 1.2M parameters - big enough that K + 1
# copies show in a process's RSS
TINY = dict(SD35M, sample_size=16, num_layers=2, attention_head_dim=32, num_attention_heads=4,
            joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
            pos_embed_max_size=16, dual_attention_layers=(0,))
# size -> (transformer config, text tokens, latent side): SD3 text = 77 CLIP + 128 T5 tokens;
# the paper's 512 px (sampler.SD3_RES) through the VAE's factor 8
SIZES = {"tiny": (TINY, 32, 16), "full": (SD35M, 77 + S.T5_TOKENS, S.SD3_RES // 8)}
LIMIT_80GB = 78 * 2**30                      # usable bytes on an 80 GB GPU (see fit_80gb in main())
MiB = 2**20


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM of /proc/self/status (Linux). Not
    resource.getrusage(RUSAGE_SELF).ru_maxrss: on Linux a process started by subprocess keeps
    its PARENT's high-water mark through exec (measured here: 810 MB reported for a 10 MB child
    of an 800 MB parent), so a child of this benchmark would report the parent's peak. VmHWM
    belongs to the process's own memory map, which exec creates afresh."""
    f = Path("/proc/self/status")
    if f.is_file():
        return int(re.search(r"VmHWM:\s*(\d+) kB", f.read_text()).group(1)) * 1024
    import resource                                            # no /proc: ru_maxrss, bytes on macOS, kB elsewhere
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def three_pass_task(policy: S.Policy, task: str, cond: dict, x: torch.Tensor, gen: torch.Generator, ch: D.Chain,
                    scale: float | None = None) -> float:
    """The released schedule: rollout (no grad) -> teacher means -> student recompute + loss.
    Same signature and return value as distill.distill_task (the task's mean per-step KL)."""
    grid, a, n_train, teacher, bf16 = ch.grid, ch.a, ch.n_train, task, ch.bf16
    g_student, g_teacher, scale = ch.g_student, ch.g_teacher[task], 1.0 / n_train if scale is None else scale
    amp = lambda: torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=bf16)
    policy.use("student")
    # ---- pass 1: student rollout, no grad, storing the visited states ----
    states = [x]
    with torch.no_grad():
        for j in range(n_train - 1):
            t, t_next = float(grid[j]), float(grid[j + 1])
            std = S.step_std(t, t_next, a)
            with amp():
                v = policy.velocity(x, t, cond, g_student)
            mean = S.step_mean(x, v, t, t_next, a)
            x = mean + std * (torch.randn(x.shape, generator=gen).to(x) if std > 0 else 0.0)
            states.append(x)
    # ---- pass 2: teacher means at those states ----
    means_t = []
    with torch.no_grad():
        policy.use(teacher)
        for j, xj in enumerate(states):
            t, t_next = float(grid[j]), float(grid[j + 1])
            with amp():
                v = policy.velocity(xj, t, cond, g_teacher)
            means_t.append(S.step_mean(xj, v, t, t_next, a))
    # ---- pass 3: student recomputation with grad, closed-form KL, backward ----
    policy.use("student")
    total = 0.0
    for j, xj in enumerate(states):
        t, t_next = float(grid[j]), float(grid[j + 1])
        with amp():
            v = policy.velocity(xj, t, cond, g_student)
        mean_s = S.step_mean(xj, v, t, t_next, a)
        kl = S.step_kl(mean_s, means_t[j], S.step_std(t, t_next, a)).mean()
        (kl * scale).backward()
        total += float(kl.detach())
    return total / n_train


class Copies:
    """The layout WITHOUT adapters, behind the two calls distill_task makes (use, velocity):
    each teacher its own full transformer (a merged LoRA), the student its own backbone + LoRA."""

    def __init__(self, policies: dict):
        self.policies, self.active = policies, None
        self.device = policies["student"].device

    def use(self, name):
        self.active = name

    def velocity(self, *args):
        return self.policies[self.active].velocity(*args)


def build(size: str, k: int, device: torch.device, layout: str = "adapters"):
    """SD3.5-M (or tiny) with random weights, K teachers + the student -> (policy, student LoRA
    params, parameter bytes). adapters: ONE backbone carrying K teacher LoRAs + the student LoRA
    (distill.py's layout); copies: K separate full transformers + the student's own backbone."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    lora = lambda **kw: LoraConfig(r=32, lora_alpha=64, target_modules=S.LORA_TARGETS, lora_dropout=0.0, **kw)
    torch.manual_seed(0)
    with torch.device(device):                                 # built on the device: no CPU copy of 2.2B params
        tr = SD3Transformer2DModel(**SIZES[size][0])
    teachers = [f"teacher{i}" for i in range(k)]
    if layout == "adapters":
        pol = S.Policy.from_transformer(tr, device=device)
        for name in teachers:                                  # random A AND B: a teacher != the base
            pol.add_adapter(name, config=lora(init_lora_weights=False))
        pol.add_adapter("student", config=lora())              # B = 0: the student starts at the base
        student, nets = pol, [pol.net]
    else:
        pols = {n: S.Policy.from_transformer(copy.deepcopy(tr), device=device) for n in teachers}
        student = pols["student"] = S.Policy.from_transformer(tr, device=device)
        student.add_adapter("student", config=lora())
        pol, nets = Copies(pols), [p.net for p in pols.values()]
    params = list(student.adapter_params("student").values())
    for p in params:
        p.requires_grad_(True)
    student.use("student")
    pol.use("student")
    nbytes = {id(p): p.numel() * p.element_size() for net in nets for p in net.parameters()}
    return pol, params, sum(nbytes.values())


def inputs(size: str, batch: int, device: torch.device, seed: int = 0):
    """Random initial noise x_0 (fp32, 16 x side x side) and random text conditioning of SD3's
    shape, in the dict Policy.encode returns; the 'uncond' row is one embedding for every prompt,
    as encode's empty prompt."""
    cfg, n_tok, side = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device)
    x = torch.randn(batch, cfg["in_channels"], side, side, generator=g).to(device)
    e, p = rnd(batch, n_tok, cfg["joint_attention_dim"]), rnd(batch, cfg["pooled_projection_dim"])
    ue, up = rnd(1, n_tok, cfg["joint_attention_dim"]), rnd(1, cfg["pooled_projection_dim"])
    return x, {"emb": e, "pooled": p, "uemb": ue.expand_as(e), "upooled": up.expand_as(p)}


def parser() -> argparse.ArgumentParser:
    ap = runs.Parser(description=__doc__.split("\n")[0])
    pos = runs.checked(int, ">= 1")
    ap.add_argument("--size", choices=["toy", "tiny", "full"], default="toy",
                    help="toy: the shipped base/ with real prompts; tiny / full: SD3.5-M's architecture "
                         "(shrunk / as published) with random weights (default: toy)")
    ap.add_argument("--base", default=None, help="--size toy: the base checkpoint (default: base)")
    ap.add_argument("--prompts", type=pos, default=None, help="--size toy: prompts per task per round (default: distill.py's)")
    ap.add_argument("--sample-steps", type=runs.checked(int, ">= 0"), default=None,
                    help="--size toy: distill.py's --sample-steps, timed beside all steps (default: distill.py's)")
    ap.add_argument("--batches", default=None,
                    help="--size tiny|full: prompts per task on one device, comma-separated (default: 1,2,4,8)")
    ap.add_argument("--steps", type=pos, default=10, help="rollout grid steps; trained as distill.py trains them (sampler.trained_steps) (default: 10)")
    ap.add_argument("--repeats", type=pos, default=3, help="timed repeats of each schedule after a warm-up (default: 3)")
    ap.add_argument("--teachers", type=pos, default=None,
                    help="--size tiny|full: teacher LoRAs on the backbone, K (default: 3)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="--size tiny|full: fp32, or bf16 = distill.py's --bf16: fp32 weights, transformer passes "
                         "under bf16 autocast (default: fp32)")
    ap.add_argument("--fit-batch", type=pos, default=None,
                    help="--size full on CUDA: prompts per task of the 80 GB fit check (default: 3, the paper's per GPU)")
    ap.add_argument("--threads", type=runs.checked(int, ">= 0"), default=0,
                    help="torch CPU threads; 0 keeps torch's default, one per core (default: 0); 1 on a shared machine")
    ap.add_argument("--json", default=None, help="also write the JSON to this file, atomically (default: none)")
    ap.add_argument("--child", default=None,
                    help="internal: measure one configuration's peak RSS in this process, round:B or "
                         "copies:B, and print it (default: none; the CPU parent starts these)")
    return ap


def main(argv=None):
    """--size tiny | full (toy: toy() below). The JSON it prints (and writes atomically with --json PATH):

    batches[i].{fused,three_pass,floor}_s   seconds per round, median of --repeats after a warm-up, the
        three schedules interleaved in one process (same load); *_over_* their ratios; kl_*: the
        per-step KL each schedule computed (equal: the same work); oom: true (and nothing else) for a
        batch that ran out of GPU memory - the run goes on. The floor leaves out adapter switches
        (Policy.use), the kernel and KL arithmetic (Eq. 7, 12), noise draws and the Python loop;
        three_pass / floor ~ 1.25 plus that overhead (5 forward-equivalents per step instead of 4, a
        backward ~ 2 forwards). Both velocities of the floor carry CFG (one batched pass of 2B).
    batches[i].peak_bytes   peak memory of ONE fused round with every weight resident: CUDA
        torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), this process; CPU the peak
        resident set (VmHWM, peak_rss) of a child process that builds the model and runs that one round
        only, so the peak is that configuration's.
    batches[i].baseline_bytes   the same after building the model, before any round; pre_build_bytes:
        before building (CPU: the imported runtime - torch, diffusers, peft - alone).
    layouts   the K teachers as adapters on one backbone vs as K full transformers (a merged teacher
        each) + the student's own backbone with its LoRA: K + 1 transformers. param_bytes counted from
        the tensors; peak_bytes of one fused round at the smallest batch (CPU: a child each); ratios
        adapters / copies, the peak one above pre_build_bytes.
    fit_80gb  (--size full on CUDA only, measured first; null otherwise) the paper's per-GPU batch:
        --fit-batch 3 prompts per task, CFG 4.5, 10 steps, one fused round + an AdamW step on the
        student LoRA (no gradient checkpointing: distill.py's default); peak allocated and reserved vs
        78 GiB (an 80 GB card shows ~79.1 GiB to torch; ~1 GiB goes to the CUDA context and library
        workspaces, which the allocator does not count). The text encoders and the VAE are NOT resident.
    --size toy (toy()): one task's share of the main job's round (the shipped base, a rank-96
        student, a rank-32 teacher, CFG on both): fused_s (all steps), sampled_s (--sample-steps K,
        the mean over 4 draws), three_pass_s; student_step_s / teacher_step_s / walk_step_s: one
        step's passes (student velocity + backward, teacher velocity, student velocity without
        grad); floor_s = trained steps x (student + teacher), floor_sampled_s = K x (student +
        teacher) + (K (n + 1) / (K + 1) - K) x walk (the steps walked before the last drawn);
        *_over_*: ratios. eval_folded_s / eval_branch_s: evaluation sampling (S.sample, 40 steps)
        with the rank-96 student folded into the weights (Policy.merged) / as a branch.

    --dtype bf16 is distill.py's --bf16: every weight stays fp32 (backbone and LoRAs, the master
    weights), the transformer passes run under torch.autocast(bf16), the means, KL and backward in
    fp32 (a bf16 copy of the frozen backbone would hold 4.5 GB less at full size; not done, as
    distill.py). fp32: everything fp32, no autocast, no TF32. The threads used: torch_threads."""
    ap = parser()
    args = ap.parse_args(argv)
    # ---- 0. flags: each size takes its own; the others are refused (one line, exit 2) ----
    toy_only = {"--base": args.base, "--prompts": args.prompts, "--sample-steps": args.sample_steps}
    real_only = {"--batches": args.batches, "--teachers": args.teachers, "--dtype": args.dtype,
                 "--fit-batch": args.fit_batch, "--child": args.child}
    wrong = [f for f, v in (real_only if args.size == "toy" else toy_only).items() if v is not None]
    if wrong:
        ap.error(f"{', '.join(wrong)} does not apply to --size {args.size}")
    if args.fit_batch is not None and args.size != "full":
        ap.error("--fit-batch applies to --size full only")
    if args.threads:
        torch.set_num_threads(args.threads)                    # children get the same (below)
    if args.size == "toy":
        return toy(args)
    if args.batches is not None and not re.fullmatch(r"\d+(,\d+)*", args.batches):
        ap.error(f"--batches {args.batches!r} is not a comma-separated list of integers like 1,2,4,8")
    batches = [int(b) for b in (args.batches or "1,2,4,8").split(",")]
    if min(batches) < 1:
        ap.error(f"--batches {args.batches!r}: every batch must be >= 1")
    if args.child is not None and not re.fullmatch(r"(round|copies):\d+", args.child):
        ap.error(f"--child {args.child!r} is not round:B or copies:B")
    k, bf16, fit_b = args.teachers or 3, args.dtype == "bf16", args.fit_batch or 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if args.size == "full" and not cuda:                       # 2.2B params: ~5e14 FLOPs per round at batch 1
        ap.error("--size full needs a CUDA GPU (on 2 CPU cores one round takes over an hour, and the K + 1 copies need ~40 GB); "
                 "use --size tiny here")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)   # the floor's; the schedules take bf16=
    grid, g = S.time_grid(args.steps, 3.0, runs.sigma_min_of(3.0)), runs.SD3_CFG   # the scheduler's grid at shift 3, CFG 4.5 (Sec. 4)
    n_train = S.trained_steps(grid, 0.0)                                           # 9 of 10, as distill.py at real scale
    chain = lambda task: D.Chain(grid, 0.0, n_train, g, {task: g}, bf16)
    fused = lambda pol, x, cond, seed: distill_task(pol, "teacher0", cond, x, torch.Generator().manual_seed(seed),
                                                    chain("teacher0"))

    # ---- child (CPU): build one configuration, run ONE fused round, report its RSS ----
    if args.child:
        from diffusers import SD3Transformer2DModel          # noqa: F401 - imported BEFORE the pre-build
        from peft import LoraConfig                           # noqa: F401   reading, so it is the runtime's
        job, b = args.child.split(":")
        pre = peak_rss()
        pol, params, pbytes = build(args.size, k, device, "copies" if job == "copies" else "adapters")
        base = peak_rss()
        x, cond = inputs(args.size, int(b), device)
        fused(pol, x, cond, 0)
        print("CHILD " + json.dumps({"pre_build_bytes": pre, "baseline_bytes": base, "peak_bytes": peak_rss(),
                                     "param_bytes": pbytes}))
        return None

    def child(job: str) -> dict:
        cmd = [sys.executable, str(HERE / "bench_distill.py"), "--size", args.size, "--steps", str(args.steps),
               "--teachers", str(k), "--dtype", args.dtype or "fp32", "--threads", str(args.threads), "--child", job]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
        lines = [l for l in r.stdout.splitlines() if l.startswith("CHILD ")]
        if r.returncode or not lines:
            raise RuntimeError(f"memory child {job} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
        return json.loads(lines[-1][len("CHILD "):])

    # ---- 1. build: one backbone, K teacher LoRAs + the student LoRA ----
    pre_build = torch.cuda.memory_allocated() if cuda else None
    pol, params, pbytes = build(args.size, k, device, "adapters")
    built = torch.cuda.memory_allocated() if cuda else None
    res = {"size": args.size, "device": str(device), "dtype": args.dtype or "fp32",
           "precision": ("fp32 weights, transformer passes under torch.autocast(bf16) (distill.py --bf16)"
                         if bf16 else "fp32 throughout"),
           "transformer_config": {k_: list(v) if isinstance(v, tuple) else v for k_, v in SIZES[args.size][0].items()},
           "backbone_params": sum(p.numel() for n, p in pol.net.named_parameters() if "lora_" not in n),
           "student_lora_params": sum(p.numel() for p in params),
           "text_tokens": SIZES[args.size][1], "latent": [16, SIZES[args.size][2], SIZES[args.size][2]],
           "teachers": k, "lora": {"r": 32, "alpha": 64, "targets": S.LORA_TARGETS},
           "cfg": g, "shift": 3.0, "steps": args.steps, "trained_steps": n_train, "noise_level": 0.0,
           "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
           "floor_counts": f"{n_train} x (one student velocity with CFG + its backward, one teacher velocity "
                           "with CFG, no grad); adapter switches, kernel/KL arithmetic, noise and loop excluded",
           "memory": ("torch.cuda.max_memory_allocated after reset_peak_memory_stats" if cuda else
                      "peak RSS (VmHWM) of a child process per configuration (build + one fused round)"),
           "fit_80gb": None, "batches": [], "layouts": None}

    # ---- 2. the paper's per-GPU batch on one 80 GB GPU (full size, CUDA only; first, so that
    #         a larger batch running out of memory below cannot cost this answer) ----
    if cuda and args.size == "full":
        opt = torch.optim.AdamW(params, lr=3e-4)               # its two moments are part of the footprint
        x, cond = inputs(args.size, fit_b, device)
        torch.cuda.reset_peak_memory_stats()
        try:
            fused(pol, x, cond, 0)
            opt.step()
            oom = False
        except torch.cuda.OutOfMemoryError:                    # on THIS card: an 80 GB one holds less
            oom = True
        opt.zero_grad(set_to_none=True)
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        res["fit_80gb"] = {"batch": fit_b, "dtype": args.dtype or "fp32", "peak_allocated_bytes": alloc,
                           "peak_reserved_bytes": reserved, "limit_bytes": LIMIT_80GB, "oom": oom,
                           "fits": not oom and reserved <= LIMIT_80GB,
                           "counted": f"backbone + {k} teacher LoRAs + student LoRA, its grads and AdamW moments, "
                                      "one fused round's activations",
                           "not_counted": "the text encoders (CLIP-L, CLIP-G, T5-XXL: ~5.5B parameters, which "
                                          "distill.py holds in half precision: ~11 GB) and the VAE (fp32, ~0.3 GB)"}
        del opt, x, cond
        torch.cuda.empty_cache()

    # ---- 3. per batch: the three schedules interleaved, median of --repeats after a warm-up ----
    for b in batches:
        x, cond = inputs(args.size, b, device)
        times = {"fused": [], "three_pass": [], "floor_student": [], "floor_teacher": []}
        kl, peak, oom = {}, 0, False
        try:
            for rep in range(args.repeats + 1):                # rep 0 is the warm-up
                # -- (a) fused = distill.distill_task, and (b) the released three-pass schedule --
                for name, fn in (("fused", distill_task), ("three_pass", three_pass_task)):
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    sync(); t0 = time.perf_counter()
                    kl[name] = fn(pol, "teacher0", cond, x, torch.Generator().manual_seed(rep), chain("teacher0"))
                    sync(); dt = time.perf_counter() - t0
                    if cuda and name == "fused":
                        peak = max(peak, torch.cuda.max_memory_allocated())
                    if rep:
                        times[name].append(dt)
                    for p in params:
                        p.grad = None
                # -- (c) the floor: one step's network work, adapters switched outside the clocks --
                t = float(grid[0])
                pol.use("student")
                sync(); t0 = time.perf_counter()
                with amp():
                    v = pol.velocity(x, t, cond, g)
                v.float().mean().backward()
                sync(); t1 = time.perf_counter()
                pol.use("teacher0")
                with torch.no_grad(), amp():
                    pol.velocity(x, t, cond, g)
                sync(); t2 = time.perf_counter()
                pol.use("student")
                del v
                if rep:
                    times["floor_student"].append(t1 - t0)
                    times["floor_teacher"].append(t2 - t1)
                for p in params:
                    p.grad = None
        except torch.cuda.OutOfMemoryError:                    # too big for this GPU: say so (below), go on
            oom = True
        if oom:                                                # (outside the except: its traceback holds the graph)
            for p in params:
                p.grad = None
            pol.use("student")
            del x, cond
            torch.cuda.empty_cache()
            res["batches"].append({"batch": b, "oom": True})
            print(f"batch {b}: out of memory", file=sys.stderr)
            continue
        med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
        floor = n_train * (med["floor_student"] + med["floor_teacher"])
        row = {"batch": b, "oom": False, "fused_s": med["fused"], "three_pass_s": med["three_pass"], "floor_s": floor,
               "floor_student_fwd_bwd_step_s": med["floor_student"], "floor_teacher_fwd_step_s": med["floor_teacher"],
               "fused_over_floor": med["fused"] / floor, "three_pass_over_floor": med["three_pass"] / floor,
               "three_pass_over_fused": med["three_pass"] / med["fused"],
               "kl_fused": kl["fused"], "kl_three_pass": kl["three_pass"]}
        if cuda:
            row |= {"pre_build_bytes": pre_build, "baseline_bytes": built, "peak_bytes": peak}
        res["batches"].append(row)
        print(f"batch {b}: fused {med['fused']:.3f} s, three-pass {med['three_pass']:.3f} s, floor {floor:.3f} s",
              file=sys.stderr)
    ran = [r["batch"] for r in res["batches"] if not r["oom"]]

    # ---- 4. memory on the CPU: a child process per configuration (this one's RSS holds them all) ----
    if not cuda and ran:                                       # timing is over: 2 children at a time
        from concurrent.futures import ThreadPoolExecutor
        jobs = [f"round:{b}" for b in ran] + [f"copies:{min(ran)}"]
        with ThreadPoolExecutor(2) as workers:
            got = dict(zip(jobs, workers.map(child, jobs)))
        for row in res["batches"]:
            row |= {k_: v for k_, v in got[f"round:{row['batch']}"].items() if k_ != "param_bytes"}

    # ---- 5. K teachers as adapters on one backbone vs K full transformers + the student's ----
    if ran:
        b0 = min(ran)
        ad = next(r for r in res["batches"] if r["batch"] == b0)
        lay = {"batch": b0, "adapters": {"param_bytes": pbytes, "pre_build_bytes": ad["pre_build_bytes"],
                                         "peak_bytes": ad["peak_bytes"]}}
        if cuda:
            import gc
            del pol, params
            gc.collect()
            torch.cuda.empty_cache()
            pre = torch.cuda.memory_allocated()
            cp, cparams, cbytes = build(args.size, k, device, "copies")
            x, cond = inputs(args.size, b0, device)
            torch.cuda.reset_peak_memory_stats()
            fused(cp, x, cond, 0)
            lay["copies"] = {"param_bytes": cbytes, "pre_build_bytes": pre, "peak_bytes": torch.cuda.max_memory_allocated()}
            del cp, cparams
        else:
            c = got[f"copies:{b0}"]
            lay["copies"] = {"param_bytes": c["param_bytes"], "pre_build_bytes": c["pre_build_bytes"],
                             "peak_bytes": c["peak_bytes"]}
        above = lambda d: d["peak_bytes"] - d["pre_build_bytes"]
        lay["param_ratio"] = lay["adapters"]["param_bytes"] / lay["copies"]["param_bytes"]
        lay["peak_ratio"] = above(lay["adapters"]) / above(lay["copies"])
        res["layouts"] = lay

    # ---- 6. output: the JSON (stdout, --json atomically), then the table ----
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        runs.write_json_atomic(args.json, res)                   # temporary file, then os.replace
    print(f"\nSD3.5-M {args.size} on {device} ({res['precision']}): {k} teacher LoRAs + the student LoRA (r 32) "
          f"on one backbone of {res['backbone_params'] / 1e6:.1f}M params; CFG {g}, the scheduler's {args.steps}-step grid at shift 3, "
          f"{n_train} trained; seconds per round, median of {args.repeats}, torch threads {res['torch_threads']}")
    print(f"{'batch':>5} {'fused':>8} {'3-pass':>8} {'floor':>8} {'fused/floor':>12} {'3-pass/floor':>13} "
          f"{'3-pass/fused':>13} {'peak MiB':>9} {'built MiB':>10}")
    for r in res["batches"]:
        print(f"{r['batch']:>5}   out of memory" if r["oom"] else
              f"{r['batch']:>5} {r['fused_s']:>8.3f} {r['three_pass_s']:>8.3f} {r['floor_s']:>8.3f} "
              f"{r['fused_over_floor']:>11.2f}x {r['three_pass_over_floor']:>12.2f}x {r['three_pass_over_fused']:>12.2f}x "
              f"{r['peak_bytes'] / MiB:>9.1f} {r['baseline_bytes'] / MiB:>10.1f}")
    if res["layouts"]:
        lay, above = res["layouts"], lambda d: d["peak_bytes"] - d["pre_build_bytes"]
        print(f"layouts at batch {lay['batch']}: parameters, adapters {lay['adapters']['param_bytes'] / MiB:.1f} MiB vs "
              f"{k} + 1 copies {lay['copies']['param_bytes'] / MiB:.1f} MiB ({lay['param_ratio']:.2f}x); peak above "
              f"pre-build {above(lay['adapters']) / MiB:.1f} vs {above(lay['copies']) / MiB:.1f} MiB ({lay['peak_ratio']:.2f}x)")
    if res["fit_80gb"]:
        f = res["fit_80gb"]
        print(f"80 GB fit, {f['batch']} prompts per task ({f['dtype']}): peak allocated "
              f"{f['peak_allocated_bytes'] / 2**30:.1f} GiB, reserved {f['peak_reserved_bytes'] / 2**30:.1f} GiB "
              f"vs {LIMIT_80GB / 2**30:.0f} GiB: {'fits' if f['fits'] else 'does NOT fit'}"
              f"{' (out of memory on this GPU)' if f['oom'] else ''} (text encoders and VAE not counted)")
    return res


def eval_sampling_times(pol: S.Policy, ps: list, repeats: int, sync) -> dict:
    """Evaluation sampling (S.sample, 40 steps, one image per prompt) with the active rank-96 student,
    moved off its no-op init, folded into the weights (Policy.merged, what every evaluation does) vs
    kept as a branch; interleaved, same load: {"eval_folded": [s, ...], "eval_branch": [s, ...]}."""
    with torch.no_grad():
        for p in pol.adapter_params("student").values():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    folded, branch, times = pol.merged, contextlib.nullcontext, {"eval_folded": [], "eval_branch": []}
    for rep in range(repeats + 1):                             # first repeat is a warm-up
        for name in times:
            pol.merged = folded if name == "eval_folded" else branch
            sync(); t0 = time.perf_counter()
            S.sample(pol, ps, list(range(len(ps))), 40, pol.shift, pol.guidance)
            sync()
            if rep:
                times[name].append(time.perf_counter() - t0)
    pol.merged = folded
    return times


def toy(args) -> dict:
    """--size toy: the shipped base/ and real prompts, the main job's round (a rank-96 student, rank-32
    teachers, CFG on both): one task's share of it fused, three-pass and with --sample-steps K; the
    network floor of each (per step: a student velocity with its backward and a teacher velocity;
    a step walked but not trained: a student velocity without grad); evaluation sampling."""
    from peft import LoraConfig
    import rewards as R
    prompts = args.prompts or D.DistillConfig.prompts
    k = D.DistillConfig.sample_steps if args.sample_steps is None else args.sample_steps
    pol = S.Policy(args.base or "base")
    pol.add_adapter("teacher", config=LoraConfig(r=32, lora_alpha=64, target_modules=S.LORA_TARGETS))
    pol.add_adapter("student", config=LoraConfig(r=96, lora_alpha=192, target_modules=S.LORA_TARGETS))
    params = list(pol.adapter_params("student").values())
    for p in params:
        p.requires_grad_(True)
    grid = S.time_grid(args.steps, pol.shift, pol.sigma_min)
    n_train = S.trained_steps(grid, 0.0)                        # as distill.py: every step of the toy grid
    k = k if 0 < k < n_train else n_train
    ps = R.TASKS["ocr"].train[:prompts]
    cond = pol.encode(ps)
    x = torch.randn(prompts, *pol.latent_shape(), generator=torch.Generator().manual_seed(0)).to(pol.device)
    sync = torch.cuda.synchronize if pol.device.type == "cuda" else (lambda: None)
    g = pol.guidance
    chain = lambda sample: D.Chain(grid, 0.0, n_train, g, {"teacher": g}, sample=sample)
    t_mid = float(grid[n_train // 2])

    def student_step():                                        # the floor's passes, at one mid-grid step
        pol.velocity(x, t_mid, cond, g).pow(2).mean().backward()

    def teacher_step():
        with torch.no_grad():
            pol.use("teacher")
            pol.velocity(x, t_mid, cond, g)
        pol.use("student")

    def walk_step():
        with torch.no_grad():
            pol.velocity(x, t_mid, cond, g)

    jobs = {"fused": lambda rep: distill_task(pol, "teacher", cond, x, torch.Generator().manual_seed(rep), chain(0)),
            "three_pass": lambda rep: three_pass_task(pol, "teacher", cond, x, torch.Generator().manual_seed(rep), chain(0)),
            "sampled": lambda rep: sum(distill_task(pol, "teacher", cond, x, torch.Generator().manual_seed(100 * rep + d),
                                                    chain(k)) for d in range(4)),   # 4 draws: the cost depends on the last step drawn
            "student_step": lambda rep: student_step(), "teacher_step": lambda rep: teacher_step(),
            "walk_step": lambda rep: walk_step()}
    times = {name: [] for name in jobs}
    for rep in range(args.repeats + 1):                        # first repeat is a warm-up; all interleaved
        for name, fn in jobs.items():
            sync(); t0 = time.perf_counter()
            fn(rep)
            sync()
            if rep:
                times[name].append((time.perf_counter() - t0) / (4 if name == "sampled" else 1))
            for p in params:
                p.grad = None
    times |= eval_sampling_times(pol, ps, args.repeats, sync)
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    walked = k * (n_train + 1) / (k + 1) - k                   # E[last drawn step + 1] - K: steps walked untrained
    floor = n_train * (med["student_step"] + med["teacher_step"])
    floor_sampled = k * (med["student_step"] + med["teacher_step"]) + walked * med["walk_step"]
    res = {"size": "toy", "device": str(pol.device), "base": args.base or "base", "prompts": prompts,
           "trained_steps": n_train, "sample_steps": k, "cfg": g, "repeats": args.repeats,
           "torch_threads": torch.get_num_threads(),
           "fused_s": med["fused"], "three_pass_s": med["three_pass"], "sampled_s": med["sampled"],
           "three_pass_over_fused": med["three_pass"] / med["fused"],
           "fused_over_sampled": med["fused"] / med["sampled"],
           "student_step_s": med["student_step"], "teacher_step_s": med["teacher_step"], "walk_step_s": med["walk_step"],
           "floor_s": floor, "fused_over_floor": med["fused"] / floor,
           "floor_sampled_s": floor_sampled, "sampled_over_floor": med["sampled"] / floor_sampled,
           "eval_folded_s": med["eval_folded"], "eval_branch_s": med["eval_branch"],
           "eval_branch_over_folded": med["eval_branch"] / med["eval_folded"]}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        runs.write_json_atomic(args.json, res)
    print(f"one task's share of a round (a round: one per task), {prompts} prompts, CFG {g}, torch threads "
          f"{torch.get_num_threads()}, median of {args.repeats}:")
    print(f"  per step: student velocity + backward {med['student_step'] * 1000:.1f} ms, teacher velocity "
          f"{med['teacher_step'] * 1000:.1f} ms, a walked step (no grad) {med['walk_step'] * 1000:.1f} ms")
    print(f"  {'schedule':<28} {'measured':>9} {'floor':>9} {'ratio':>6}")
    print(f"  {f'fused, all {n_train} steps':<28} {med['fused'] * 1000:7.1f}ms {floor * 1000:7.1f}ms "
          f"{med['fused'] / floor:5.2f}x")
    print(f"  {f'fused, --sample-steps {k}':<28} {med['sampled'] * 1000:7.1f}ms {floor_sampled * 1000:7.1f}ms "
          f"{med['sampled'] / floor_sampled:5.2f}x")
    print(f"  {'three-pass, all steps':<28} {med['three_pass'] * 1000:7.1f}ms")
    print(f"  three-pass / fused = {res['three_pass_over_fused']:.2f}x; all steps / --sample-steps {k} = "
          f"{res['fused_over_sampled']:.2f}x")
    print(f"evaluation sampling of {prompts} images (40 steps) with a rank-96 student: adapter as a branch / "
          f"folded into the weights = {res['eval_branch_over_folded']:.2f}x")
    return res


if __name__ == "__main__":
    main()
