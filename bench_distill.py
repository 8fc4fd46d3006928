"""bench_distill.py - time per distillation round: fused schedule vs the released three-pass one.

The released code runs (1) a no-grad student rollout, (2) teacher means at the stored states,
(3) a gradient-carrying student recomputation at the same states. distill.py fuses (1) and
(3): the student's gradient-carrying prediction IS its rollout prediction. This file holds
the three-pass schedule as the reference (test_opd.py checks that both give the same
gradient in float64) and times both in one run, so the ratio is measured under the same load.

    python bench_distill.py                  # ~1 min on 2 cores; prints ms per round and the ratio
    python bench_distill.py --prompts 16 --repeats 5
"""
from __future__ import annotations

import argparse
import time

import torch

import sampler as S
from distill import distill_task


def three_pass_task(policy: S.Policy, teacher: str, g_teacher: float, g_student: float, cond: dict,
                    x: torch.Tensor, grid: torch.Tensor, a: float, n_train: int, scale: float,
                    gen: torch.Generator) -> float:
    """The released schedule: rollout (no grad) -> teacher means -> student recompute + loss."""
    policy.use("student")
    # ---- pass 1: student rollout, no grad, storing the visited states ----
    states = [x]
    with torch.no_grad():
        for j in range(n_train - 1):
            t, t_next = float(grid[j]), float(grid[j + 1])
            std = S.step_std(t, t_next, a)
            mean = S.step_mean(x, policy.velocity(x, t, cond, g_student), t, t_next, a)
            x = mean + std * (torch.randn(x.shape, generator=gen).to(x) if std > 0 else 0.0)
            states.append(x)
    # ---- pass 2: teacher means at those states ----
    means_t = []
    with torch.no_grad():
        policy.use(teacher)
        for j, xj in enumerate(states):
            t, t_next = float(grid[j]), float(grid[j + 1])
            means_t.append(S.step_mean(xj, policy.velocity(xj, t, cond, g_teacher), t, t_next, a))
    # ---- pass 3: student recomputation with grad, closed-form KL, backward ----
    policy.use("student")
    total = 0.0
    for j, xj in enumerate(states):
        t, t_next = float(grid[j]), float(grid[j + 1])
        mean_s = S.step_mean(xj, policy.velocity(xj, t, cond, g_student), t, t_next, a)
        kl = S.step_kl(mean_s, means_t[j], S.step_std(t, t_next, a)).mean()
        (kl * scale).backward()
        total += float(kl.detach())
    return total


def main(argv=None):
    from peft import LoraConfig
    import rewards as R
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="base", help="the base checkpoint (default: base)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per task per round (default: 16)")
    ap.add_argument("--steps", type=int, default=10, help="rollout grid steps (default: 10)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each schedule (default: 3)")
    args = ap.parse_args(argv)
    pol = S.Policy(args.base)
    cfgl = LoraConfig(r=32, lora_alpha=64, target_modules=S.LORA_TARGETS)
    pol.add_adapter("teacher", config=cfgl)
    pol.add_adapter("student", config=cfgl)
    params = list(pol.adapter_params("student").values())
    for p in params:
        p.requires_grad_(True)
    grid = S.time_grid(args.steps, pol.shift)
    n_train = args.steps                                        # distill.py trains every step
    ps = R.TASKS["ocr"].train[:args.prompts]
    cond = pol.encode(ps)
    x = torch.randn(args.prompts, *pol.latent_shape(), generator=torch.Generator().manual_seed(0))
    g = pol.guidance
    times = {"fused": [], "three-pass": []}
    for rep in range(args.repeats + 1):                        # first repeat is a warm-up
        for name, fn in (("fused", distill_task), ("three-pass", three_pass_task)):
            t0 = time.perf_counter()
            fn(pol, "teacher", g, g, cond, x, grid, 0.0, n_train, 1.0 / n_train, torch.Generator().manual_seed(rep))
            if rep:
                times[name].append(time.perf_counter() - t0)
            for p in params:
                p.grad = None
    med = {k: sorted(v)[len(v) // 2] * 1000 for k, v in times.items()}
    print(f"one task's share of a round, {args.prompts} prompts, {n_train} trained steps, CFG {g}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}:")
    for k, v in med.items():
        print(f"  {k:>10}: {v:8.1f} ms")
    print(f"  three-pass / fused = {med['three-pass'] / med['fused']:.2f}x")


if __name__ == "__main__":
    main()
