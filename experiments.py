"""experiments.py - the paper's studies in miniature, on the toy world (Sec. 5, 7, 8).

Calls teachers.py and distill.py; holds no math of its own. Every run is an ordinary run folder
under --out (resumable: re-running the command resumes the unfinished run and reads the
finished ones), every number a study reports comes from its results JSON (--docs), and each
study draws one figure next to it.

    python experiments.py                     # all five studies, resumable (~7 h on 2 cores)
    python experiments.py --only noise        # one study: table1 | noise | estimators | sft | objectives

  table1     Table 1's analog: base, the three teachers, joint GRPO-Guard, joint DiffusionNFT,
             cascade NFT (each with the CPU minutes of OPD's Stage 1 + Stage 2) and DiffusionOPD
             over three seeds; both tables, paired, the paper's Average over the rows shown.
  noise      Stage 2 at a = 0, 0.3, 0.7: the per-task teacher KL on the SAME probe states
             (ODE rollouts of the current student from fixed noises) and the rewards, per round;
             the rounds each needs to reach 90% of the a = 0 run's final KL reduction.
  estimators at a = 0.7: the closed-form KL gradient vs the PPO surrogate (Sec. 3.3, Eq. 16-23)
             vs the sampled-log-ratio REINFORCE of LLM OPD - gradient variance across rollouts
             by step, and training curves to the same number of rounds.
  sft        off-policy SFT on the teachers' samples vs on-policy distillation: the KL at the
             student's own states and the rewards.
  objectives SFT, DMD, TDM and DiffusionOPD for the same training time: rewards and probe KL
             against minutes, the final tables paired against DiffusionOPD.

Shared runs: the a = 0, seed 0 OPD run serves table1, noise, sft and objectives; the a = 0.7
closed-form run serves noise and estimators. --quick runs every code path with tiny budgets.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import ablations as A
import distill as D
import rewards as R
import evaluate as E
import runs
from runs import arg
import sampler as S
import multitask as M

HERE = Path(__file__).resolve().parent
STUDIES = ("table1", "noise", "estimators", "sft", "objectives")   # in this order: later studies reuse earlier runs
OBJECTIVES = ("sft", "dmd", "tdm")      # the objective study's rivals of DiffusionOPD (ablations.py --objective)


@dataclasses.dataclass
class ExperimentConfig:
    only: str = arg("all", "run one study only, or all of them", "in all|table1|noise|estimators|sft|objectives")
    teachers: list = arg([], "the teacher folders (default: every folder in ckpts/)")
    out: str = arg("runs/experiments", "where the studies' run folders go (each resumable)")
    docs: str = arg("docs/studies", "where each study's results JSON and figure are written")
    rounds: int = arg(D.DistillConfig.rounds, "Stage 2 rounds of every distillation run (the main job's; the shipped studies: 50)", ">= 1")
    sample_steps: int = arg(D.DistillConfig.sample_steps, "Stage 2's --sample-steps in every distillation run (the main job's; the shipped studies: 0, every step)", ">= 0")
    probe_every: int = arg(5, "rounds between probe KLs (ablations.py --probe-every)", ">= 1")
    seeds: int = arg(3, "DiffusionOPD seeds in table1", ">= 1")
    quick: bool = arg(False, "tiny budgets everywhere: a smoke run of every code path")


def budgets(cfg: ExperimentConfig) -> dict:
    """Run sizes. The full ones are the main job's (distill.py defaults) with a probe; --quick
    shrinks every loop to a few iterations."""
    if cfg.quick:
        # an evaluation call samples E.EVAL_STEPS (40) steps whatever its n (tiny models: calls,
        # not images, are the cost), so few calls: eval_every > rounds keeps the round-0 small
        # eval only; the runs skip their own held-out table (eval_heldout_n 0: no study reads
        # it; table1 scores every row on both tables through scores_of, the OPD seeds too);
        # n = 2 images per task, the least a paired SE takes, also the runs' eval_n, so table1
        # reads the seeds' primary scores from their cache; 2 rollouts, the least a spread
        # across rollouts takes
        return {"distill": dict(rounds=2, prompts=2, steps=3, eval_every=3, eval_small=2, eval_n=2,
                                eval_heldout_n=0, rank=4, alpha=8),
                "teacher": dict(iters=3, prompts=2, group=2, steps=3, rank=4, alpha=8, eval_n=0,
                                eval_heldout_n=0, eval_every=3, eval_small=2),
                "variance_rollouts": 2, "heldout_n": 2, "n": 2}
    return {"distill": dict(rounds=cfg.rounds, sample_steps=cfg.sample_steps, eval_every=10, eval_small=32),
            "teacher": dict(iters=100_000, eval_n=0, eval_heldout_n=0, eval_every=100, eval_small=32),  # resumable
            "variance_rollouts": 32, "heldout_n": E.HELDOUT_N, "n": 256}


# ---------------------------------------------------------------------------------------------
# runs: every study is made of these two calls
# ---------------------------------------------------------------------------------------------
def opd_run(cfg: ExperimentConfig, name: str, **over) -> Path:
    """One Stage 2 run (distill.run), resumed or read when it exists; returns its folder."""
    b = budgets(cfg)
    dc = A.AblationConfig(teachers=list(cfg.teachers), out=str(Path(cfg.out) / "distill" / name),
                          probe_every=2 if cfg.quick else cfg.probe_every,   # --quick: round 0 and the end
                          **(b["distill"] | over))
    A.run(dc)
    return Path(dc.out)


def teacher_run(cfg: ExperimentConfig, name: str, **over) -> Path:
    """One multi-task RL run (multitask.train) on the teachers' base, resumed or read; its checkpoint."""
    tc = M.MultitaskConfig(base=runs.settings(cfg.teachers[0])["base"], out=str(Path(cfg.out) / "rl" / name),
                         **(budgets(cfg)["teacher"] | over))
    return Path(M.train(tc))


def log_of(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()]


def minutes_of(ckpt: Path) -> float:
    return float(runs.read_meta(ckpt).get("trained", {}).get("minutes", 0.0))


def scores_of(cfg: ExperimentConfig, ckpt: Path) -> dict:
    """Both tables' per-image scores of a checkpoint (the protocol, cached)."""
    b = budgets(cfg)
    return E.evaluate_checkpoint(str(ckpt), b["n"], b["heldout_n"])


def write_results(cfg: ExperimentConfig, study: str, res: dict) -> Path:
    f = Path(cfg.docs) / f"{study}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    runs.write_json_atomic(f, res)
    return f


# ---------------------------------------------------------------------------------------------
# the studies
# ---------------------------------------------------------------------------------------------
def study_table1(cfg: ExperimentConfig) -> dict:
    """Table 1's analog. Budget of every multi-task RL baseline: the CPU minutes of OPD's Stage 1
    (the longest teacher, as the paper counts it) + Stage 2 (seed 0's training minutes)."""
    base = runs.settings(cfg.teachers[0])["base"]
    teachers = {runs.read_meta(t)["task"]: Path(t) for t in cfg.teachers}
    opd = [opd_run(cfg, f"a0-s{s}", seed=s) / "checkpoint" for s in range(cfg.seeds)]
    stage1 = max(minutes_of(t) for t in teachers.values())
    stage2 = minutes_of(opd[0])
    budget = 0.05 if cfg.quick else stage1 + stage2
    # every baseline trains GenEval on the shipped GenEval teacher's reward and prompt draw (the
    # per-object reward, tags drawn by their reward spread); GRPO-Guard takes the OCR teacher's
    # recipe, NFT the GenEval teacher's (CFG-free, batch-wide advantages, 8 prompts an iteration,
    # sampled at the base's CFG)
    common = dict(minutes=budget, task=",".join(R.toy.TASK_NAMES), rl_reward="objects", prompt_mix="spread")
    nft = dict(algo="nft", lr=1e-3, adv_scale="batch", prompts=8, sample_cfg=runs.settings(base)["cfg"]) | common
    rl = {"joint GRPO-Guard": teacher_run(cfg, "joint-grpo-guard", algo="grpo-guard", lr=3e-4, train_fraction=0.5,
                                          **common),
          "joint NFT": teacher_run(cfg, "joint-nft", **nft),
          "cascade NFT": teacher_run(cfg, "cascade-nft", cascade=True, **nft)}
    rows, per = [], {}
    for name, ck, mins in ([("base", Path(base), 0.0)] + [(f"teacher {t}", p, minutes_of(p)) for t, p in teachers.items()]
                           + [(n, p, minutes_of(p)) for n, p in rl.items()]
                           + [(f"DiffusionOPD seed {s}", p, stage1 + minutes_of(p)) for s, p in enumerate(opd)]):
        per[name] = scores_of(cfg, ck)
        rows.append({"name": name, "path": os.path.relpath(ck), "minutes": round(mins, 2),
                     "scores": {k: float(v.mean()) for k, v in per[name]["train"].items()},
                     "heldout": {k: float(v.mean()) for k, v in per[name].get("test", {}).items()}})
    # DiffusionOPD as one row: the mean over seeds (std beside it); the Average over the rows shown
    seeds = [r for r in rows if r["name"].startswith("DiffusionOPD")]
    mean_row = {"name": f"DiffusionOPD ({len(seeds)} seeds)" if len(seeds) > 1 else "DiffusionOPD (seed 0)",
                "minutes": seeds[0]["minutes"],
                "scores": {k: float(np.mean([r["scores"][k] for r in seeds])) for k in seeds[0]["scores"]},
                "heldout": {k: float(np.mean([r["heldout"][k] for r in seeds])) for k in seeds[0]["heldout"]}}
    if len(seeds) > 1:                                            # the spread over Stage 2 seeds
        mean_row["std"] = {k: float(np.std([r["scores"][k] for r in seeds], ddof=1)) for k in seeds[0]["scores"]}
    shown = [r for r in rows if not r["name"].startswith("DiffusionOPD")] + [mean_row]
    per[mean_row["name"]] = {s: {k: np.mean([per[r["name"]][s][k] for r in seeds], 0) for k in per[seeds[0]["name"]][s]}
                             for s in per[seeds[0]["name"]]}     # per image: the mean over seeds
    res = E.results(shown, {"n": budgets(cfg)["n"], "heldout_n": budgets(cfg)["heldout_n"], "seed": E.EVAL_SEED,
                            "steps": E.EVAL_STEPS, "sampler": "ODE (a = 0)"}, per)
    # DiffusionOPD's Average minus every other row's, with the paired bootstrap SE over images
    names = [r["name"] for r in shown]
    res["opd_minus"] = {n: {tab: list(E.average_difference(per, names, mean_row["name"], n, split))
                            for tab, split in (("scores", "train"), ("heldout", "test"))}
                        for n in names if n != mean_row["name"]}
    res["seeds"] = seeds
    res["budget_minutes"] = {"stage1_longest": stage1, "stage1_sum": sum(minutes_of(t) for t in teachers.values()),
                             "stage2": stage2, "baselines": budget}
    write_results(cfg, "table1", res)
    print(E.render_results(res))
    return res


def kl_rounds(log: list[dict], tasks: list[str]) -> tuple[list[int], np.ndarray]:
    """The probe KLs of a run: (rounds, (len(rounds), tasks)) - the same states for every run."""
    recs = [r for r in log if f"probe_kl_{tasks[0]}" in r]
    return [r["round"] for r in recs], np.array([[r[f"probe_kl_{t}"] for t in tasks] for r in recs])


def run_summary(run: Path, tasks: list[str]) -> dict:
    """A Stage 2 run in a study's JSON: its folder, probe KL curve and final results row."""
    rr, kl = kl_rounds(log_of(run), tasks)
    return {"path": os.path.relpath(run), "rounds": rr, "probe_kl": kl.tolist(),
            "final": json.loads((run / "results.json").read_text())["rows"][-1]}


def rounds_to(rounds: list[int], kl: np.ndarray, target: np.ndarray) -> list[float]:
    """Per task, the first probed round at which the KL is at or below its target (inf: never)."""
    out = []
    for m in range(kl.shape[1]):
        hit = [r for r, k in zip(rounds, kl[:, m]) if k <= target[m]]
        out.append(float(hit[0]) if hit else math.inf)
    return out


def study_noise(cfg: ExperimentConfig) -> dict:
    """Stage 2 at a = 0 (Eq. 12), 0.3 and 0.7 (Eq. 11): KLs on the same probe states, rewards,
    and the rounds to 90% of the a = 0 run's final KL reduction (the paper: ODE up to 5x more
    sample-efficient than a = 0.7)."""
    tasks = [t for t in R.toy.TASK_NAMES if any(runs.read_meta(p).get("task") == t for p in cfg.teachers)]
    by_a = {a: opd_run(cfg, "a0-s0" if a == 0 else f"a{a}-s0", noise_level=a) for a in (0.0, 0.3, 0.7)}
    res = {"tasks": tasks, "runs": {}}
    r0, kl0 = kl_rounds(log_of(by_a[0.0]), tasks)
    target = kl0[0] - 0.9 * (kl0[0] - kl0[-1])                   # 90% of a = 0's final reduction
    for a, run in by_a.items():
        log = log_of(run)
        rr, kl = kl_rounds(log, tasks)
        res["runs"][str(a)] = {"path": os.path.relpath(run), "rounds": rr, "probe_kl": kl.tolist(),
                               "evals": [{k: v for k, v in r.items() if k == "round" or k.startswith("eval_")}
                                         for r in log if any(k.startswith("eval_") for k in r)],
                               "rounds_to_90pct": rounds_to(rr, kl, target),
                               "final": json.loads((run / "results.json").read_text())["rows"][-1]}
    base_r = res["runs"]["0.0"]["rounds_to_90pct"]
    for a in res["runs"]:
        res["runs"][a]["ratio_to_ode"] = [x / b if b and math.isfinite(x) else math.inf
                                          for x, b in zip(res["runs"][a]["rounds_to_90pct"], base_r)]
    write_results(cfg, "noise", res)
    figure_curves(cfg, "noise", {f"a = {a}": run for a, run in by_a.items()}, tasks)
    return res


def gradient_spread(cfg: ExperimentConfig, student: Path, levels=(0.3, 0.7, 1.0)) -> dict:
    """Per task, noise level and estimator: the trace of the across-rollout covariance of each step's
    gradient and the mean gradient's norm (ablations.estimator_gradients), at ONE student's weights
    (`student`: the a = 0 run's), 2 fixed prompts, fresh initial and SDE noise per rollout - the
    same draws for every estimator. Kept in --out/variance.json, keyed by the weights and sizes."""
    steps = 3 if cfg.quick else 10
    key = {"student": E.weights_hash(student), "teachers": sorted(E.weights_hash(t) for t in cfg.teachers),
           "levels": list(levels), "steps": steps, "rollouts": budgets(cfg)["variance_rollouts"]}
    cache = Path(cfg.out) / "variance.json"                      # resume reads it: ~14 min on 2 cores
    if cache.is_file() and (old := json.loads(cache.read_text())).get("key") == key:
        return old["spread"]
    base, by_task, g_teacher = D.load_teachers(cfg.teachers)
    pol = S.Policy(base)
    for t, p in by_task.items():
        pol.add_adapter(t, p)
    pol.add_adapter("student", student)
    grid = S.time_grid(steps, pol.shift, pol.sigma_min)
    out = {"t": [float(x) for x in grid[:-1]], "student": os.path.relpath(student), "tasks": {}}
    for task in by_task:
        train = R.TASKS[task].train
        prompts = [train[k] for k in np.random.default_rng([7, *map(ord, task)]).integers(len(train), size=2)]
        for a in levels:
            for e in A.ESTIMATORS:
                g = A.estimator_gradients(pol, task, g_teacher[task], runs.settings(student)["cfg"], prompts, grid, a, e,
                                          budgets(cfg)["variance_rollouts"], keep=False)
                out["tasks"].setdefault(task, {}).setdefault(str(a), {})[e] = {
                    "trace_cov": g["trace_cov"].tolist(), "mean_norm": g["mean_norm"].tolist(), "kl": float(g["kl"].mean())}
    cache.parent.mkdir(parents=True, exist_ok=True)
    runs.write_json_atomic(cache, {"key": key, "spread": out})
    return out


def study_estimators(cfg: ExperimentConfig) -> dict:
    """At a = 0.7: training curves of the closed form, PPO (Eq. 16-19) and REINFORCE to the same
    rounds; and the gradient spread across rollouts by step and noise level (gradient_spread)."""
    tasks = [t for t in R.toy.TASK_NAMES if any(runs.read_meta(p).get("task") == t for p in cfg.teachers)]
    res = {"tasks": tasks, "variance": gradient_spread(cfg, opd_run(cfg, "a0-s0") / "checkpoint"), "runs": {}}
    figure_spread(cfg, res["variance"])
    by_name = {}
    for e in A.ESTIMATORS:                                        # the results JSON grows run by run
        write_results(cfg, "estimators", res)
        by_name[e] = run = opd_run(cfg, "a0.7-s0" if e == "closed" else f"a0.7-{e}-s0", noise_level=0.7, estimator=e)
        res["runs"][e] = run_summary(run, tasks)
    write_results(cfg, "estimators", res)
    figure_curves(cfg, "estimators", by_name, tasks)
    return res


def figure_spread(cfg: ExperimentConfig, var: dict) -> Path:
    """docs/studies/estimators_variance.png: per task, the across-rollout gradient spread (trace of
    the covariance) of each estimator against t, one line style per noise level."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(var["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.0), squeeze=False)
    for m, task in enumerate(tasks):
        for a, style in zip(var["tasks"][task], ("-", "--", ":")):
            for e, c in zip(A.ESTIMATORS, ("C0", "C1", "C2")):
                axes[0, m].plot(var["t"], var["tasks"][task][a][e]["trace_cov"], style, color=c, label=f"{e}, a = {a}")
        axes[0, m].set(title=f"{task}: gradient spread across rollouts", xlabel="t (1 = noise)", yscale="log")
        axes[0, m].title.set_fontsize(8)
    axes[0, 0].legend(fontsize=6)
    return save_figure(fig, Path(cfg.docs) / "estimators_variance.png")


def study_sft(cfg: ExperimentConfig) -> dict:
    """Off-policy SFT on the teachers' own samples (as many images as OPD's rollouts) vs on-policy
    distillation: the KL at the student's own states (probe) and the rewards."""
    tasks = [t for t in R.toy.TASK_NAMES if any(runs.read_meta(p).get("task") == t for p in cfg.teachers)]
    by_name = {"DiffusionOPD (on-policy)": opd_run(cfg, "a0-s0"), "SFT (off-policy)": opd_run(cfg, "sft-s0", objective="sft")}
    res = {"tasks": tasks, "runs": {}}
    for name, run in by_name.items():
        res["runs"][name] = run_summary(run, tasks)
    write_results(cfg, "sft", res)
    figure_curves(cfg, "sft", by_name, tasks)
    return res


def train_minutes(run: Path) -> float:
    """A Stage 2 run's training minutes (probes and evaluations not counted: distill.rounds), from
    its resume state; a run without that record: its checkpoint's wall-clock minutes."""
    st = run / "state.json"
    t = json.loads(st.read_text()).get("train_s") if st.is_file() else None
    return t / 60 if t else minutes_of(run / "checkpoint")


def study_objectives(cfg: ExperimentConfig) -> dict:
    """The paper's distillation-objective ablation: off-policy SFT, DMD and TDM (on the student's
    own samples, each with its own gradient: ablations.py) and DiffusionOPD, with the same teachers,
    prompts and TRAINING TIME - the main job's run (a0-s0) sets the budget, the others train for as
    long (--minutes), however many rounds that is. Per run: small-eval rewards and probe KLs against
    training minutes; the final tables, each task paired against DiffusionOPD on the same images."""
    tasks = [t for t in R.toy.TASK_NAMES if any(runs.read_meta(p).get("task") == t for p in cfg.teachers)]
    opd = opd_run(cfg, "a0-s0")
    budget = train_minutes(opd)
    by_name = {"DiffusionOPD": opd}
    res = {"tasks": tasks, "budget_minutes": budget, "runs": {}}
    for obj in OBJECTIVES:
        write_results(cfg, "objectives", res)                      # the results JSON grows run by run
        by_name[obj.upper()] = opd_run(cfg, f"{obj}-time-s0", objective=obj, minutes=budget, rounds=1_000_000)
    ref = scores_of(cfg, opd / "checkpoint")
    for name, run in by_name.items():
        log, sc = log_of(run), scores_of(cfg, run / "checkpoint")
        done = max((r["round"] for r in log if "grad_norm" in r), default=-1) + 1
        per_round = train_minutes(run) / max(done, 1)              # training minutes per round (~constant)
        res["runs"][name] = run_summary(run, tasks) | {
            "train_minutes": train_minutes(run), "rounds_done": done, "minutes_per_round": per_round,
            "evals": [{"minutes": (r["round"] + 1) * per_round, **{t: r[f"eval_{t}"] for t in tasks if f"eval_{t}" in r}}
                      for r in log if any(f"eval_{t}" in r for t in tasks)],
            "vs_opd": {split: {t: E.paired(sc[split][t], ref[split][t]) for t in tasks}
                       for split in ("train", "test") if split in sc and split in ref}}
    write_results(cfg, "objectives", res)
    figure_objectives(cfg, res)
    return res


def figure_objectives(cfg: ExperimentConfig, res: dict) -> Path:
    """docs/studies/objectives.png, the paper's objective figure in miniature: per task, the small-eval
    reward (top) and the KL to the teacher on the probe states (bottom) against training minutes,
    one line per objective."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = res["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.4 * len(tasks), 5.6), squeeze=False)
    for name, v in res["runs"].items():
        ev = v["evals"]
        kl = np.array(v["probe_kl"]).reshape(len(v["rounds"]), -1)
        for m, t in enumerate(tasks):
            pts = [(e["minutes"], e[t]) for e in ev if t in e]
            if pts:
                axes[0, m].plot(*zip(*pts), "o-", ms=3, label=name)
            if len(v["rounds"]):
                axes[1, m].plot([r * v["minutes_per_round"] for r in v["rounds"]], kl[:, m], "o-", ms=3, label=name)
    for m, t in enumerate(tasks):
        axes[0, m].set(title=f"{t}: small-eval reward", xlabel="training minutes")
        axes[1, m].set(title=f"{t}: KL to its teacher (probe states)", xlabel="training minutes", yscale="log")
        for a in axes[:, m]:
            a.title.set_fontsize(8)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, Path(cfg.docs) / "objectives.png")


def render_study(study: str, res: dict) -> str:
    """A study's table in markdown, from its results JSON (docs/experiments.md, "The paper's
    studies", shows exactly this; table1: minutes, mean +- std over seeds (paired difference to the
    base), GenEval's per-tag accuracies, then the held-out table and its tags as evaluate.py draws
    them)."""
    if study == "table1":                                        # E.render_table plus minutes (and seeds' std)
        cols = [t for t in R.toy.TASK_NAMES if all(t in r["scores"] for r in res["rows"])]
        out = "| Model | minutes | " + " | ".join(R.TASKS[c].metric for c in cols) + " | Average |\n|" + "---|" * (3 + len(cols)) + "\n"
        for row in res["rows"]:
            sd = row.get("std", {})
            out += (f"| {row['name']} | {row['minutes']:.1f} | "
                    + " | ".join(f"{row['scores'][c]:.3f}" + (f" ± {sd[c]:.3f}" if c in sd else "")
                                 + (f" ({row['vs_base'][c][0]:+.3f})" if c in row.get("vs_base", {}) else "") for c in cols)
                    + f" | {row['average']:.3f} |\n")
        tags = lambda table: ("\n\n" + E.render_tags(res, table)) if E.render_tags(res, table) else ""
        out = out.rstrip() + tags("scores")
        out += f"\n\nHeld-out test prompts, n = {res['protocol']['heldout_n']} per task:\n\n" + E.render_table(res, "heldout")
        out += tags("heldout")
        if res.get("opd_minus"):                                 # the paired bootstrap of the Average difference
            opd = next(r["name"] for r in res["rows"] if r["name"].startswith("DiffusionOPD"))
            out += (f"\n\n{opd}'s Average minus each row's, paired bootstrap SE over images:\n\n"
                    "| row | primary | held-out |\n|---|---|---|\n"
                    + "".join(f"| {n} | {v['scores'][0]:+.3f} ± {v['scores'][1]:.3f} | "
                              f"{v['heldout'][0]:+.3f} ± {v['heldout'][1]:.3f} |\n" for n, v in res["opd_minus"].items()))
        return out.rstrip()
    tasks = res["tasks"]
    f3 = lambda x: "never" if x is None or (isinstance(x, float) and math.isinf(x)) else f"{x:.3g}"
    cells = lambda row: " | ".join(f"{row['scores'][t]:.3f} ({row['vs_base'][t][0]:+.3f})" for t in tasks)
    head = lambda first, *mid: ("| " + " | ".join([first, *mid] + [f"{t} (vs base)" for t in tasks]) + " |\n|"
                                + "---|" * (1 + len(mid) + len(tasks)) + "\n")
    if study == "noise":
        out = head("a", "rounds to 90% (" + " / ".join(tasks) + ")", "vs a = 0", "final probe KL")
        for a, v in res["runs"].items():
            out += (f"| {a} | {' / '.join(f3(x) for x in v['rounds_to_90pct'])} | "
                    f"{' / '.join(f3(x) for x in v['ratio_to_ode'])} | {' / '.join(f'{x:.2e}' for x in v['probe_kl'][-1])} | "
                    f"{cells(v['final'])} |\n")
        return out.rstrip()
    if study == "objectives":                                    # paired against DiffusionOPD, both tables
        out = (f"Training budget {res['budget_minutes']:.2f} min each (DiffusionOPD's main-job run).\n\n"
               + head("objective", "rounds", "final probe KL (" + " / ".join(tasks) + ")",
                      *[f"{t} minus DiffusionOPD" for t in tasks]))
        for name, v in res["runs"].items():
            d = v["vs_opd"].get("train", {})
            out += (f"| {name} | {v['rounds_done']} | {' / '.join(f'{x:.2e}' for x in v['probe_kl'][-1])} | "
                    + " | ".join("-" if name == "DiffusionOPD" else f"{d[t][0]:+.3f} ± {d[t][1]:.3f}" for t in tasks)
                    + f" | {cells(v['final'])} |\n")
        return out.rstrip()
    if study in ("estimators", "sft"):
        out = head("run", "final probe KL (" + " / ".join(tasks) + ")")
        for name, v in res["runs"].items():
            out += f"| {name} | {' / '.join(f'{x:.2e}' for x in v['probe_kl'][-1])} | {cells(v['final'])} |\n"
        if study == "estimators":
            var = res["variance"]
            out += ("\n| task | a | PPO / closed spread, by step t = " + ", ".join(f"{t:.2g}" for t in var["t"])
                    + " | REINFORCE / closed |\n|---|---|---|---|\n")
            for task, by_a in var["tasks"].items():
                for a, e in by_a.items():
                    ratio = lambda k: ", ".join(f"{x / max(c, 1e-300):.3g}" for x, c in
                                                zip(e[k]["trace_cov"], e["closed"]["trace_cov"]))
                    out += f"| {task} | {a} | {ratio('ppo')} | {ratio('reinforce')} |\n"
        return out.rstrip()
    raise ValueError(study)


def save_figure(fig, f: Path) -> Path:
    """A study's figure into docs/studies/: written to a temporary name and renamed (never half a PNG)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    f.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(f.with_suffix(".tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(f.with_suffix(".tmp.png"), f)
    return f

def figure_curves(cfg: ExperimentConfig, study: str, by_name: dict, tasks: list[str]) -> Path:
    """docs/studies/<study>.png: per task, the probe KL of every run against rounds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.0), squeeze=False)
    for name, run in by_name.items():
        rr, kl = kl_rounds(log_of(run), tasks)
        for m, t in enumerate(tasks):
            axes[0, m].plot(rr, kl[:, m], "o-", ms=3, label=str(name))
    for m, t in enumerate(tasks):
        axes[0, m].set(title=f"{t}: KL to its teacher on the probe states", xlabel="round", yscale="log")
        axes[0, m].title.set_fontsize(8)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, Path(cfg.docs) / f"{study}.png")


def main(argv=None):
    ap = runs.config_parser(ExperimentConfig, __doc__.split("\n")[0])
    args = vars(ap.parse_args(argv))
    if not args["teachers"]:
        ck = HERE / "ckpts"
        args["teachers"] = sorted(os.path.relpath(p) for p in ck.iterdir() if p.is_dir()) if ck.is_dir() else []
    cfg = ExperimentConfig(**args)
    t0 = time.time()
    try:
        for study in (STUDIES if cfg.only == "all" else [cfg.only]):
            print(f"==== {study} ====")
            {"table1": study_table1, "noise": study_noise, "estimators": study_estimators, "sft": study_sft,
             "objectives": study_objectives}[study](cfg)
            print(f"{study}: done, {(time.time() - t0) / 60:.1f} min so far -> {Path(cfg.docs) / (study + '.json')}")
    except runs.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
