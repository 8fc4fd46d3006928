"""distill.py - Stage 2: on-policy distillation of all teachers into one student (Alg. 1, Eq. 11-12).

The student (a fresh LoRA on the teachers' common base) rolls out its OWN denoising chain;
at every visited state x_j the teacher of that prompt's task gives its transition mean; the
loss is the closed-form per-step KL between the two Gaussian kernels, which share their
covariance (sampler.step_kl): Eq. 12 for the default ODE rollouts (a = 0), Eq. 11 for a > 0.

    python distill.py --teachers ckpts/*        # the main job: ~8 min on 2 cores -> runs/distill/
    python distill.py                           # the same (every folder in ckpts/ is a teacher)
    torchrun --nproc_per_node 2 distill.py      # data parallel over processes (gloo on CPU)

Outputs in --out: config.json, log.jsonl (glossary in README), grid_<task>.png (base vs
student), curves.png, results.json + the printed table, checkpoint/ (the student), and
state.* (resume). Re-running the same command resumes an unfinished run; a finished run
only prints its table (--fresh starts over).

Deliberate deviations from the paper (Sec. 7 of paper.md)
  1. Fused schedule: the student's gradient-carrying prediction is taken DURING its rollout
     (the states do not depend on the prediction's graph, and the weights only change at the
     end of the round), instead of the released rollout -> teacher -> recompute. Same
     gradient to float64 precision (test), one student forward per step saved.
  2. Toy sizes: 16 prompts per task per round (paper: 72 over 8 GPUs), lr 2e-3 (3e-4), no
     EMA of the student, fp32. Round-robin task order, one optimizer step per round, grad
     clip 1.0, AdamW betas (0.9, 0.999), wd 1e-4 as the paper.
  3. Aggregation as the released code: per step the KL is a MEAN over dimensions; steps and
     tasks are averaged (Eq. 4 sums over steps: a constant factor); the last, near-clean
     step is skipped (timestep_fraction 0.99 -> 9 of 10 steps).
  4. Data parallel by hand: after the round's backward passes, the student's LoRA gradients
     are all-reduced (averaged) over processes. DDP's wrapper is not used because the one
     backbone switches between adapters (student / teachers) inside a step.
  5. Task balance (--balance, the default; --no-balance is the paper's plain task average):
     each task's KL is divided by its own detached value of this round, so the round's
     gradient is mean_m grad log KL_m - every teacher moves the student by the same RELATIVE
     amount, however far it sits from the base. With the shipped toy teachers the aesthetic KL
     starts ~100x the OCR KL; the plain average let the aesthetic teacher's style leak into OCR
     prompts and closed 67% of the OCR teacher's gain in 50 rounds; balanced: 125% (README).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rewards as R
import sampler as S

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass
class DistillConfig:
    teachers: list = dataclasses.field(default_factory=list)  # teacher folders (default: every folder in ckpts/)
    out: str = "runs/distill"        # run folder
    rounds: int = 50                 # optimizer steps; each round visits every task once
    prompts: int = 16                # prompts per task per round (global, split over processes)
    steps: int = 10                  # rollout grid steps (paper: 10)
    noise_level: float = 0.0         # a: 0 = ODE rollouts + Eq. 12 (paper default); > 0 = SDE + Eq. 11
    train_fraction: float = 0.99     # train steps j with j < floor(fraction * steps) (released: 9 of 10)
    cfg: float = -1.0                # student CFG in rollouts; -1 = the base's own
    lr: float = 2e-3                 # AdamW learning rate
    rank: int = 32                   # student LoRA rank (paper: 32)
    alpha: int = 64                  # student LoRA alpha (paper: 64)
    eval_every: int = 25             # small paired eval every N rounds (0: never)
    eval_small: int = 32             # images per task for that eval
    eval_n: int = 256                # images per task for the final evaluation (protocol: 256)
    seed: int = 0                    # seeds prompts and rollout noise
    balance: bool = True             # divide each task's KL by its own detached value (deviation 5)
    fresh: bool = False              # delete an existing --out and start over


def load_teachers(paths: list[str]) -> tuple[str, dict[str, str]]:
    """Validate teacher folders -> (common base, {task: folder}). Any problem: CheckpointError."""
    if not paths:
        raise S.CheckpointError("no teachers given; pass --teachers ckpts/* (one folder per task)")
    by_task, bases = {}, {}
    for p in paths:
        if not Path(p).is_dir():
            raise S.CheckpointError(f"{p}: not a folder; each --teachers entry must be a teacher checkpoint folder")
        meta = S.read_meta(p)
        if meta.get("role") != "teacher":
            raise S.CheckpointError(f"{p}: not a teacher checkpoint ({S.META} role is {meta.get('role')!r}); "
                                    "pass folders written by teachers.py")
        task = meta.get("task")
        if task not in R.TASKS:
            raise S.CheckpointError(f"{p}: teacher for unknown task {task!r}; known tasks: {sorted(R.TASKS)}")
        if task in by_task:
            raise S.CheckpointError(f"{p}: a second teacher for task {task!r} (first: {by_task[task]}); pass one per task")
        if not R.TASKS[task].train:
            raise S.CheckpointError(f"{p}: task {task!r} has an empty training prompt set")
        by_task[task] = p
        bases[p] = (S.resolve_base(p, meta), meta["base"].get("hash"))
    if len(set(bases.values())) > 1:
        raise S.CheckpointError("teachers sit on different bases: " + "; ".join(f"{p} -> {b[0]}" for p, b in bases.items())
                                + "; distil teachers of one base")
    return next(iter(bases.values()))[0], by_task


def distill_task(policy: S.Policy, teacher: str, g_teacher: float, g_student: float, cond: dict,
                 x: torch.Tensor, grid: torch.Tensor, a: float, n_train: int, scale: float,
                 gen: torch.Generator, n_global: int | None = None, local: slice = slice(None)) -> float:
    """One task's share of a round, FUSED: roll the student down the grid; at each trained
    step j take its gradient-carrying mean, the teacher's mean at the same x_j, the closed-form
    KL (Eq. 11/12), and backward at once (so memory holds one step). The next state comes from
    the student's own (detached) mean: the rollout is on-policy. Returns the summed KL.
    With several processes, x holds rows `local` of a global batch of n_global; the SDE noise
    is drawn for the whole batch and sliced the same way, so any process count gives the
    single-process rollout."""
    total = 0.0
    for j in range(n_train):
        t, t_next = float(grid[j]), float(grid[j + 1])
        std = S.step_std(t, t_next, a)                                    # Eq. 6: shared by S and T
        # ---- student mean, with grad (Eq. 7) ----
        policy.use("student")
        mean_s = S.step_mean(x, policy.velocity(x, t, cond, g_student), t, t_next, a)
        # ---- teacher mean at the state the STUDENT visited (Eq. 7), no grad ----
        with torch.no_grad():
            policy.use(teacher)
            mean_t = S.step_mean(x, policy.velocity(x, t, cond, g_teacher), t, t_next, a)
        # ---- closed-form per-step KL (Eq. 11 / 12), mean over dims, averaged over batch ----
        kl = S.step_kl(mean_s, mean_t, std).mean()
        (kl * scale).backward()
        total += float(kl.detach())
        # ---- next state from the student's own kernel: x_{j+1} = mu_S + sbar eps ----
        noise = torch.randn((n_global or len(x), *x.shape[1:]), generator=gen)[local].to(x) if std > 0 else 0.0
        x = (mean_s.detach() + std * noise)
    policy.use("student")
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(DistillConfig):
        if f.name == "teachers":
            ap.add_argument("--teachers", nargs="+", default=None, help="teacher folders (default: ckpts/*)")
        elif f.type == "bool" or isinstance(f.default, bool):
            ap.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=f.default)
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = vars(ap.parse_args(argv))
    if args["teachers"] is None:                                           # plain `python distill.py`
        ck = HERE / "ckpts"
        args["teachers"] = sorted(os.path.relpath(p) for p in ck.iterdir() if p.is_dir()) if ck.is_dir() else []
    cfg = DistillConfig(**args)
    try:
        run(cfg)
    except S.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(cfg: DistillConfig) -> dict:
    from tqdm import tqdm
    # ---- 0. processes, teachers, student ----
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if cfg.prompts % world:
        raise S.CheckpointError(f"--prompts {cfg.prompts} must be divisible by the number of processes ({world})")
    base, by_task = load_teachers(cfg.teachers)
    out = Path(cfg.out)
    if cfg.fresh and rank == 0 and out.exists():
        shutil.rmtree(out)
    if world > 1:
        torch.distributed.barrier()
    if (out / "results.json").is_file():
        res = json.loads((out / "results.json").read_text())
        if rank == 0:
            print(f"{out} is finished (--fresh starts over):\n" + R.render_table(res))
        return res
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    policy = S.Policy(base)
    tasks = [t for t in R.toy.TASK_NAMES if t in by_task]                    # round-robin order
    g_teacher = {}
    for t in tasks:
        policy.add_adapter(t, by_task[t])
        g_teacher[t] = float(policy.adapters[t].get("cfg", policy.guidance))
    from peft import LoraConfig
    policy.add_adapter("student", config=LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,
                                                    target_modules=S.LORA_TARGETS, lora_dropout=0.0))
    params = list(policy.adapter_params("student").values())
    for p in params:
        p.requires_grad_(True)
    policy.use("student")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-4)
    g_student = policy.guidance if cfg.cfg < 0 else cfg.cfg
    grid = S.time_grid(cfg.steps, policy.base_meta.get("shift", 1.0))
    n_train = max(1, math.floor(cfg.train_fraction * cfg.steps))
    shape = policy.latent_shape()
    local = slice(rank * cfg.prompts // world, (rank + 1) * cfg.prompts // world)
    start, before = 0, 0.0                                       # before: seconds spent before a resume
    if (out / "state.json").is_file():
        info = S.load_state(out / "state", {"params": params}, opt)
        start, before = info["round"], info.get("elapsed_s", 0.0)
        if rank == 0:
            print(f"resuming {out} at round {start}")
    conf = dataclasses.asdict(cfg) | {"base": base, "teachers": by_task, "teacher_cfg": g_teacher,
                                      "student_cfg": g_student, "grid": [round(float(x), 5) for x in grid],
                                      "trained_steps": n_train, "processes": world,
                                      "loss": "Eq. 12 (ODE)" if cfg.noise_level == 0 else "Eq. 11 (SDE)"}
    if rank == 0:
        S.write_json_atomic(out / "config.json", conf)
        print(json.dumps(conf))
        kept = [l for l in (out / "log.jsonl").read_text().splitlines() if json.loads(l)["round"] < start] \
            if (out / "log.jsonl").is_file() else []
        (out / "log.jsonl").write_text("".join(l + "\n" for l in kept))
    log = open(out / "log.jsonl", "a") if rank == 0 else None
    t0 = time.time()
    for rnd in tqdm(range(start, cfg.rounds), initial=start, total=cfg.rounds, desc="distill", disable=rank > 0):
        rng = np.random.default_rng([cfg.seed, rnd])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd)
        acc = [torch.zeros_like(p) for p in params]                # the round's task-averaged gradient
        rec = {"round": rnd}
        for task in tasks:
            opt.zero_grad(set_to_none=True)
            # ---- 1. prompts of THIS task only (routing by dataset, never mixed) ----
            ps = [R.TASKS[task].train[k] for k in rng.integers(len(R.TASKS[task].train), size=cfg.prompts)]
            x = torch.randn((cfg.prompts, *shape), generator=gen)[local].to(policy.device, policy.dtype)  # global draw, local slice
            cond = policy.encode(ps[local])
            # ---- 2-4. fused rollout + teacher means + closed-form KL + backward ----
            kl = distill_task(policy, task, g_teacher[task], g_student, cond, x, grid, cfg.noise_level,
                              n_train, 1.0 / n_train, torch.Generator().manual_seed(int(rng.integers(2**31))),
                              n_global=cfg.prompts, local=local)
            kl = torch.tensor(kl / n_train, dtype=torch.float64)                # this task's per-step KL
            if world > 1:                                              # the global batch's KL
                torch.distributed.all_reduce(kl)
                kl /= world
            rec[f"kl_{task}"] = float(kl)
            # ---- task average; with --balance each task's KL is divided by its own detached
            #      value, so its gradient is grad log KL_m (deviation 5) ----
            w = 1.0 / (len(tasks) * (max(float(kl), 1e-12) if cfg.balance else 1.0))
            for a_, p in zip(acc, params):
                a_.add_(p.grad, alpha=w)
        for a_, p in zip(acc, params):
            p.grad = a_
        # ---- 5. one optimizer step per round on the task-averaged loss ----
        if world > 1:
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        rec["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        if not all(math.isfinite(rec[f"kl_{t}"]) for t in tasks) or not math.isfinite(rec["grad_norm"]):
            raise S.CheckpointError(f"{out}: loss is NaN/inf at round {rnd} ({rec}); lower --lr. "
                                    "The last good state is kept; nothing was overwritten")
        opt.step()
        if rank == 0:
            S.save_state(out / "state", {"params": params}, opt, {"round": rnd + 1, "elapsed_s": before + time.time() - t0})
        rec["time_s"] = round(time.time() - t0, 1)
        # ---- 6. small paired evaluation every N rounds ----
        if rank == 0 and cfg.eval_every and ((rnd + 1) % cfg.eval_every == 0 or rnd == 0):
            for task in tasks:
                rec[f"eval_{task}"] = float(R.evaluate(policy, task, cfg.eval_small, g_student).mean())
        if rank == 0:
            log.write(json.dumps(rec) + "\n"); log.flush()
    # ---- 7. the student checkpoint, final evaluation, table, figures ----
    if rank > 0:
        torch.distributed.barrier()
        return {}
    minutes = round((before + time.time() - t0) / 60, 2)
    meta = {"role": "student", "task": None, "cfg": g_student,
            "teachers": {t: {"path": os.path.relpath(Path(p).resolve(), (out / "checkpoint").resolve()),
                             "hash": R._weights_hash(Path(p))} for t, p in by_task.items()},
            "trained": {"algorithm": "DiffusionOPD (" + conf["loss"] + ")", "minutes": minutes,
                        "config": {k: v for k, v in conf.items() if k not in ("out", "base", "teachers")}}}
    policy.save_adapter("student", out / "checkpoint", meta)
    res = report(cfg, out, base, by_task, policy)
    if world > 1:
        torch.distributed.barrier()
    return res


def report(cfg, out: Path, base: str, by_task: dict, policy: S.Policy) -> dict:
    """Final evaluation (student computed; base and teachers from their cached per-image
    scores), the results JSON, the printed table, the paired gains, grids and curves."""
    ck = str(out / "checkpoint")
    rows, per = [], {}
    for name, path in [("base", base)] + [(f"teacher {t}", p) for t, p in by_task.items()] + [("DiffusionOPD student", ck)]:
        per[name] = R.evaluate_checkpoint(path, cfg.eval_n, policy=policy if path == ck else None)
        rows.append({"name": name, "path": os.path.relpath(path), "scores": {k: float(v.mean()) for k, v in per[name].items()}})
    res = R.results(rows, {"n": cfg.eval_n, "seed": R.EVAL_SEED, "steps": R.EVAL_STEPS, "sampler": "ODE (a = 0)"})
    gains = {}
    for t in by_task:
        s_b, se_sb = R.paired(per["DiffusionOPD student"][t], per["base"][t])
        t_b, se_tb = R.paired(per[f"teacher {t}"][t], per["base"][t])
        gains[t] = {"student_minus_base": s_b, "se": se_sb, "teacher_minus_base": t_b, "se_teacher": se_tb,
                    "closed": s_b / t_b if t_b else float("nan")}
    res["gains"] = gains
    meta = S.read_meta(ck)
    meta["scores"] = rows[-1]["scores"] | {"n": cfg.eval_n}
    S.write_json_atomic(Path(ck) / S.META, meta)
    S.write_json_atomic(out / "results.json", res)
    print(R.render_table(res))
    for t, g in gains.items():
        closed = (f"closed {100 * g['closed']:.0f}% of the teacher's gain" if g["teacher_minus_base"] > 2 * g["se_teacher"]
                  else "the teacher's own gain is not significant (< 2 SE): nothing to close")
        print(f"{t:>9}: student - base = {g['student_minus_base']:+.3f} +- {g['se']:.3f} (paired SE); "
              f"teacher - base = {g['teacher_minus_base']:+.3f} +- {g['se_teacher']:.3f}; {closed}")
    figures(out, base, policy)
    return res


def figures(out: Path, base: str, policy: S.Policy, k: int = 8) -> None:
    """grid_<task>.png: base (top) and student (bottom) on the same held-out prompts and noise,
    each image titled with its reward; curves.png: per-step KL and the small evals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for task in R.toy.TASK_NAMES:
        ps = list(R.TASKS[task].test[:k])
        seeds = [R.EVAL_SEED + i for i in range(k)]
        fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 3.1))
        for row, name in enumerate((None, "student")):
            policy.use(name)
            imgs = S.sample(policy, ps, seeds, R.EVAL_STEPS)
            scores = R.TASKS[task].reward(imgs, ps, strict=True)
            for c in range(k):
                axes[row, c].imshow(imgs[c], interpolation="nearest")
                axes[row, c].set_title(f"{scores[c]:.2f}", fontsize=8)
                axes[row, c].axis("off")
            axes[row, 0].text(-4, 16, "base" if name is None else "student", rotation=90, va="center",
                              ha="right", fontsize=9)
        fig.suptitle(f"{task}: held-out prompts, same noise; title = reward", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"grid_{task}.png", dpi=100)
        plt.close(fig)
    policy.use("student")
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for t in R.toy.TASK_NAMES:
        r = [x for x in recs if f"kl_{t}" in x]
        if r:
            ax[0].plot([x["round"] for x in r], [x[f"kl_{t}"] for x in r], label=t)
        e = [x for x in recs if f"eval_{t}" in x]
        if e:
            ax[1].plot([x["round"] + 1 for x in e], [x[f"eval_{t}"] / (10 if t == "aesthetic" else 1) for x in e],
                       "o-", label=t + (" / 10" if t == "aesthetic" else ""))
    ax[0].set(yscale="log", xlabel="round", ylabel="per-step KL (mean over dims)")
    ax[1].set(xlabel="round", ylabel="held-out reward (paired small eval)")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout(); fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
