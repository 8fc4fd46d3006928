"""multitask.py - the multi-task RL baselines of Table 1: joint and cascade RL with teachers.py's loop.

  * Joint RL ("multi-task GRPO-Guard", "multi-task NFT"): `--task geneval,ocr,aesthetic` (or
    `all`, the default) trains ONE adapter on all three. Iterations alternate the tasks in Stage 2's
    round-robin order (toy.TASK_NAMES); a batch holds one task's prompts only, so its reward and
    its group-normalised advantages (per prompt group) are that task's. One rollout CFG serves every
    task: the base's for GRPO-Guard (the OCR / aesthetic teachers' CFG, not the CFG-free GenEval
    teacher's), 1.0 for NFT (CFG-free, as the GenEval teacher).
  * Cascade RL: `--cascade` trains the tasks one after another in the order given, one stage each,
    a sub-run <out>/stage<k>-<task>/ that starts from the last stage's adapter (teachers.py's
    `--init CKPT`). `--iters` and `--minutes` are totals, split equally over the stages; a re-run
    skips finished stages and resumes the unfinished one; the last stage's adapter is the run's
    checkpoint/.

    python multitask.py --algo grpo-guard --lr 3e-4 --train-fraction 0.5 --iters 5000 \
        --minutes 60 --eval-every 100                          # runs/teacher-joint-grpo-guard/
    python multitask.py --algo nft --iters 5000 --minutes 60 --eval-every 100    # runs/teacher-joint-nft/
    python multitask.py --cascade --algo nft --iters 5000 --minutes 60 \
        --eval-every 100                                       # runs/teacher-cascade-nft/: 20 min a stage
    python evaluate.py base ckpts/* runs/teacher-joint-*/checkpoint runs/teacher-cascade-nft/checkpoint

Every flag of teachers.py applies. Their opd.json says role "teacher", task "joint" or "cascade",
and "tasks" (a cascade's "trained" lists its stages with their minutes and iterations):
evaluate.py scores them on every task; distill.py refuses them as a teacher for one task (so
--export refuses base/ and ckpts/ for them). experiments.py runs them at OPD's compute (Table 1).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import rewards as R
import runs
import teachers as T
from runs import arg


@dataclasses.dataclass
class MultitaskConfig(T.TeacherConfig):
    task: str = arg("all", "the tasks: a comma list of geneval|ocr|aesthetic, or all")
    cascade: bool = arg(False, "the tasks one after another, each stage from the last one's adapter (cascade RL); else joint RL")
    iters: int = arg(150, "RL iterations (one rollout batch each; --cascade: in all, split equally over the stages)", ">= 1")
    minutes: float = arg(0.0, "also stop after this many minutes of training (0: no limit; --cascade: in all, split equally)", ">= 0")


def task_list(spec: str, cascade: bool = False) -> list[str]:
    """--task -> task names: one, a comma list or "all". Jointly trained tasks take Stage 2's
    round-robin order (toy.TASK_NAMES); a cascade keeps the order given. ValueError otherwise."""
    names = list(R.toy.TASK_NAMES) if spec.strip() == "all" else [t.strip() for t in spec.split(",")]
    bad = [t for t in names if t not in R.TASKS]
    if bad:
        raise ValueError(f"{spec!r}: unknown task {bad[0]!r}; pass {'|'.join(R.TASKS)}, a comma list of them, or all")
    if len(set(names)) < len(names):
        raise ValueError(f"{spec!r}: a task named twice")
    return names if cascade else [t for t in R.toy.TASK_NAMES if t in names]



def cascade(cfg: MultitaskConfig, tasks: list[str]) -> Path:
    """Cascade RL (paper Sec. 8, Table 1): one `train` stage per task in the order given, stage k
    starting from stage k-1's adapter (stage 1 from --init, or fresh); --iters and --minutes are
    totals, split equally. Stages are sub-run folders <out>/stage<k>-<task>/: a re-run skips the
    finished ones and resumes the unfinished one. The final checkpoint is the last stage's."""
    n = len(tasks)
    if n < 2:
        raise runs.CheckpointError(f"--cascade needs two or more tasks (--task geneval,ocr,aesthetic or all), got {tasks}")
    if cfg.iters < n:
        raise runs.CheckpointError(f"--cascade: --iters {cfg.iters} is the total over {n} stages; pass at least {n}")
    if cfg.init:
        T.check_init(cfg)
    out = Path(cfg.out or f"runs/teacher-cascade-{cfg.algo}")
    ckpt = out / "checkpoint"
    conf = T.run_config(cfg, tasks)
    if runs.open_run(out, conf, cfg.fresh, "teachers") and (ckpt / runs.META).is_file():
        print(f"{out} is finished, with this config: {ckpt} (--fresh starts over)")
        return ckpt
    init, stages = cfg.init, []
    for k, task in enumerate(tasks):
        sub = T.TeacherConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(T.TeacherConfig)})
        sub = dataclasses.replace(sub, task=task, init=init, out=str(out / f"stage{k + 1}-{task}"),
                                  iters=cfg.iters // n + (k < cfg.iters % n), minutes=cfg.minutes / n,
                                  eval_n=0, fresh=False, export="")
        print(f"cascade stage {k + 1}/{n}: {task}, from {init or 'a fresh LoRA'}, at most {sub.iters} iterations"
              + (f", {sub.minutes:.2f} min" if cfg.minutes else ""))
        last = T.train(sub)
        tr = runs.read_meta(last)["trained"]
        stages.append({"task": task, "run": Path(sub.out).name, "minutes": tr["minutes"], "iterations": tr["iterations"]})
        init = str(last)
    # ---- the last stage's adapter, as this run's checkpoint (base path re-pointed, one rename) ----
    meta = runs.read_meta(last)
    meta["trained"] = {"algorithm": cfg.algo, "minutes": round(sum(s["minutes"] for s in stages), 2),
                       "iterations": sum(s["iterations"] for s in stages), "stages": stages,
                       "config": {k: v for k, v in conf.items() if k not in ("out", "export", "base", "fresh", "run")}}
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(last, tmp, ignore=shutil.ignore_patterns("*.tmp", "scores.json"))
    if Path(last, meta["base"]["path"]).is_dir():
        meta["base"]["path"] = os.path.relpath(Path(last, meta["base"]["path"]).resolve(), ckpt.resolve())
    runs.write_json_atomic(tmp / runs.META, meta)
    runs.replace_dir(tmp, ckpt)
    T.final_eval(cfg, ckpt, meta, f"cascade {' -> '.join(tasks)} ({cfg.algo})")
    return ckpt


def train(cfg: MultitaskConfig) -> Path:
    """Joint RL (teachers.train over several tasks) or, with --cascade, cascade RL; the checkpoint."""
    if cfg.export and runs.shipped(cfg.export):                 # checked before training, not after
        raise runs.CheckpointError(f"--export {cfg.export}: a multi-task checkpoint is no teacher for base/ or ckpts/ "
                                   "(distill.py's default teachers are ckpts/*); export it elsewhere")
    try:
        tasks = task_list(cfg.task, cfg.cascade)
    except ValueError as e:
        raise runs.CheckpointError(f"--task {e}") from None
    return cascade(cfg, tasks) if cfg.cascade else T.train(cfg, tasks)


def main(argv=None):
    ap = runs.config_parser(MultitaskConfig, __doc__.split("\n")[0])
    cfg = MultitaskConfig(**vars(ap.parse_args(argv)))
    try:
        task_list(cfg.task)
    except ValueError as e:
        ap.error(f"argument --task: {e}")                      # one line, exit 2
    T.train_and_export(train, cfg)


if __name__ == "__main__":
    main()
