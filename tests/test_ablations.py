"""The paper's ablations of Stage 2 (ablations.py: Variants of distill.py's Algorithm 1) run end to
end: the off-policy SFT baseline (--objective sft), the estimators' command line (--estimator),
and the probe KL (--probe-every). Their math - sft_task's gradient, sft_times, each estimator's
formula, unbiasedness and spread - is in ../test_opd.py."""
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ablations as A
import distill as D
import rewards as R
import runs
import sampler as S
from conftest import REPO, _dcfg, _refused


# ---- the off-policy SFT baseline (ablations.py --objective sft) ----
def _quiet(tmp, teachers, **kw):
    """A tiny sft run (ablations.AblationConfig): no evaluation at all."""
    return _dcfg(tmp, teachers, config=A.AblationConfig,
                 **{"objective": "sft", "eval_every": 0, "eval_n": 0, "eval_heldout_n": 0, **kw})


def _sft_log(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


def _student_weights(out):
    from safetensors.torch import load_file
    return load_file(str(out / "checkpoint" / "adapter_model.safetensors"))


def test_sft_run_outputs(tiny_teachers, tmp_path):
    """(a) 2 rounds of --objective sft end to end: a student checkpoint that records its objective,
    a log with sft_loss_<task> (finite, > 0) for every task and no KL, the config naming the loss."""
    out = tmp_path / "d"
    A.run(_quiet(out, tiny_teachers, rounds=2))
    log = _sft_log(out)
    assert [r["round"] for r in log] == [0, 1]
    for r in log:
        assert all(0 < r[f"sft_loss_{t}"] < math.inf for t in R.TASKS), r
        assert not any(k.startswith("kl_") for k in r) and math.isfinite(r["grad_norm"]), r
    conf = json.loads((out / "config.json").read_text())
    assert conf["objective"] == "sft" and conf["loss"].startswith("flow matching on the teachers' ODE samples")
    meta = runs.read_meta(out / "checkpoint")
    assert meta["role"] == "student" and meta["trained"]["config"]["objective"] == "sft"
    assert meta["trained"]["algorithm"].startswith("SFT baseline") and meta["trained"]["config"]["objective"] == "sft"
    w = _student_weights(out)
    assert any(float(v.abs().max()) > 0 for k, v in w.items() if "lora_B" in k), "the student LoRA never moved"
    assert S.Policy(str(out / "checkpoint")).active == "student"


def test_sft_trains_on_the_teachers_own_ode_samples(tiny_base, tiny_teachers, tmp_path, monkeypatch):
    """(c) In a run, each task's x_data is its teacher's own ODE sample (sampler.rollout of the
    teacher checkpoint loaded alone, with its own CFG, on the round's grid, same prompts and noise),
    the very tensor sft_task trains on; prompts and initial noise are OPD's (distill.py's run,
    its task steps spied on through its Variant), task by task."""
    calls, real_ts, real_sft, real_opd = [], A.teacher_samples, A.sft_task, D.distill_task

    def ts_spy(policy, teacher, g_t, cond, x, grid, bf16=False):
        out = real_ts(policy, teacher, g_t, cond, x, grid, bf16)
        calls.append({"teacher": teacher, "g": g_t, "cond": cond, "x": x.clone(), "grid": grid, "out": out})
        return out

    def sft_spy(policy, x_data, *a, **k):
        calls[-1]["trained_on"] = x_data
        return real_sft(policy, x_data, *a, **k)
    opd = []

    def opd_spy(policy, task, cond, x, *a, **k):
        opd.append({"teacher": task, "cond": cond, "x": x.clone()})
        return real_opd(policy, task, cond, x, *a, **k)
    monkeypatch.setattr(A, "teacher_samples", ts_spy)
    monkeypatch.setattr(A, "sft_task", sft_spy)
    A.run(_quiet(tmp_path / "sft", tiny_teachers, rounds=1))
    monkeypatch.undo()
    D.run(_dcfg(tmp_path / "opd", tiny_teachers, rounds=1, eval_every=0, eval_n=0, eval_heldout_n=0),
          D.OPD._replace(task_step=opd_spy))
    assert [c["teacher"] for c in calls] == [o["teacher"] for o in opd] == [t for t in R.toy.TASK_NAMES if t in R.TASKS]
    by_task = {runs.read_meta(p)["task"]: p for p in tiny_teachers}
    for c, o in zip(calls, opd):
        assert c["trained_on"] is c["out"]
        assert torch.equal(c["x"], o["x"]) and torch.equal(c["cond"]["emb"], o["cond"]["emb"]), c["teacher"]
        alone = S.Policy(by_task[c["teacher"]])                         # the teacher checkpoint on its own
        assert alone.active == c["teacher"] and c["g"] == alone.guidance == runs.read_meta(by_task[c["teacher"]])["cfg"]
        ref = S.rollout(alone, c["cond"], c["x"], S.time_grid(3, alone.shift), 0.0)["states"][-1]   # its own CFG
        assert torch.equal(c["grid"], S.time_grid(3, alone.shift))
        err = float((c["out"] - ref).abs().max())
        assert err < 1e-5, f"{c['teacher']}: trained-on samples differ from the teacher's ODE samples by {err:.2e}"
        assert float((c["out"] - c["x"]).abs().max()) > 0.1               # a sample, not the noise


def test_sft_lowers_flow_matching_loss_on_held_teacher_samples(tiny_base, tiny_teachers, tmp_path):
    """(d) Measured property: 8 rounds of sft lower the student's flow-matching loss (its CFG) on a
    fixed held set of teacher samples (16 prompts per task, other noise than training, 4 (t, eps)
    each), paired per element against the fresh student (= the base): the task-mean drop exceeds
    4 paired SEs. Most of this loss is irreducible (~2.05); the teachers' own gap to the base on
    their samples is ~0.02, so the drop is a small number measured precisely."""
    out = tmp_path / "d"
    A.run(_quiet(out, tiny_teachers, rounds=8, lr=2e-2))
    assert all(math.isfinite(r[f"sft_loss_{t}"]) for r in _sft_log(out) for t in R.TASKS)
    pol = S.Policy(str(tiny_base))
    by_task = {runs.read_meta(p)["task"]: p for p in tiny_teachers}
    for t, p in by_task.items():
        pol.add_adapter(t, p)
    pol.add_adapter("student", out / "checkpoint")
    grid, gen, diffs, info = S.time_grid(3, pol.shift), torch.Generator().manual_seed(123), [], {}
    for k, (task, p) in enumerate(sorted(by_task.items())):
        cond = pol.encode(R.TASKS[task].train[-16:])
        x0 = S.initial_noise(pol.latent_shape(), range(900 + 16 * k, 916 + 16 * k))
        x_data = A.teacher_samples(pol, task, runs.read_meta(p)["cfg"], cond, x0, grid)
        ls = {None: [], "student": [], task: []}
        for _ in range(4):
            t, eps = torch.rand(16, generator=gen), torch.randn(x_data.shape, generator=gen)
            for name in ls:
                pol.use(name)
                with torch.no_grad():
                    v = pol.velocity(S.noised(x_data, eps, t), t, cond, runs.read_meta(p)["cfg"] if name == task else None)
                ls[name].append((v - (eps - x_data)).pow(2).flatten(1).mean(1))
        base, student, teacher = (torch.cat(ls[n]) for n in (None, "student", task))
        diffs.append(student - base)
        info[task] = f"base {float(base.mean()):.4f} student {float(student.mean()):.4f} teacher {float(teacher.mean()):.4f}"
    d = torch.stack(diffs).mean(0)                                    # task mean, per held element
    drop, se = -float(d.mean()), float(d.std()) / len(d) ** 0.5
    assert drop > 4 * se, f"held flow-matching loss drop {drop:.5f} (paired SE {se:.5f}), expected > 4 SE; {info}"


def test_sft_resume_equals_uninterrupted(tiny_teachers, tmp_path, monkeypatch):
    """(e) An sft run killed inside round 2 and re-run resumes to the same student, bitwise."""
    A.run(_quiet(tmp_path / "a", tiny_teachers))
    calls, real = {"n": 0}, A.sft_task

    def dies_in_round_2(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3 * 2:                                 # 3 tasks per round: die inside round 2
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(A, "sft_task", dies_in_round_2)                # sft_step reads it at call time
    with pytest.raises(KeyboardInterrupt):
        A.run(_quiet(tmp_path / "b", tiny_teachers))
    assert json.loads((tmp_path / "b" / "state.json").read_text())["round"] == 2
    assert not (tmp_path / "b" / "checkpoint").exists()
    monkeypatch.setattr(A, "sft_task", real)
    A.run(_quiet(tmp_path / "b", tiny_teachers))
    sa, sb = _student_weights(tmp_path / "a"), _student_weights(tmp_path / "b")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "resumed sft student differs"
    untimed = lambda out: [{k: v for k, v in r.items() if k != "time_s"} for r in _sft_log(out)]
    assert untimed(tmp_path / "a") == untimed(tmp_path / "b")          # the same sft_loss_<task>, bitwise


def test_sft_bad_objective_and_noise_level(tiny_teachers, tmp_path, capsys):
    """(f) --objective bogus, and --objective sft with --noise-level > 0: one line on stderr, exit 2,
    no run folder; run() refuses them too."""
    for extra in (["--objective", "bogus"], ["--objective", "sft", "--noise-level", "0.7"]):
        err = _refused(capsys, A.main, ["--teachers", *tiny_teachers, "--out", str(tmp_path / "d"), *extra])
        assert extra[-1] in err, err
        assert not (tmp_path / "d").exists()
    for kw in ({"objective": "bogus"}, {"noise_level": 0.7}):
        with pytest.raises(runs.CheckpointError, match="objective|noise-level"):
            A.run(_quiet(tmp_path / "d", tiny_teachers, **kw))
    assert not (tmp_path / "d").exists()


def test_sft_two_processes_match_one(tiny_teachers, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) sft equals one process with the same global batch: the
    flow-matching t and eps are drawn for the global batch and sliced per process."""
    args = ["--teachers", *tiny_teachers, "--rounds", "2", "--prompts", "4", "--steps", "3", "--eval-every", "0",
            "--eval-n", "0", "--eval-heldout-n", "0", "--rank", "4", "--alpha", "8", "--objective", "sft"]
    A.main([*args, "--out", str(tmp_path / "one")])                          # in this process; two below
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29543", "ablations.py", *args,
                          "--out", str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert two.returncode == 0, two.stderr[-3000:]
    sa, sb = _student_weights(tmp_path / "one"), _student_weights(tmp_path / "two")
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst < 1e-5, f"2-process sft student differs from 1-process by {worst:.2e} (tolerance 1e-5)"
    la, lb = _sft_log(tmp_path / "one"), _sft_log(tmp_path / "two")
    gap = max(abs(a[f"sft_loss_{t}"] - b[f"sft_loss_{t}"]) for a, b in zip(la, lb) for t in R.TASKS)
    assert gap < 1e-6, f"logged sft_loss differs by {gap:.2e} between 1 and 2 processes"


# ---- --estimator ppo | reinforce: the command line (their math: ../test_opd.py) ----------------
EST_A = 0.7             # the noise level of the paper's PPO ablation (Flow-GRPO's SD3 value)


@pytest.mark.parametrize("est", ["ppo", "reinforce"])
def test_estimator_needs_noise_one_line_exit_2(tiny_teachers, tmp_path, capsys, est):
    out = tmp_path / "out"
    err = _refused(capsys, A.main, ["--teachers", *tiny_teachers, "--out", str(out), "--rounds", "1", "--prompts", "2",
                                    "--steps", "2", "--estimator", est])
    assert err.startswith("error: --estimator " + est) and "--noise-level" in err, err
    assert not out.exists()


def test_estimator_flag_value_checked(capsys):
    assert "closed|ppo|reinforce" in _refused(capsys, A.main, ["--estimator", "dpo", "--out", "/nonexistent/x"])


# ---- --probe-every -------------------------------------------------------------------------
def _probe_log(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


def test_probe_every(tiny_base, tiny_teachers, tmp_path, monkeypatch):
    """--probe-every 2 over 3 rounds logs probe_kl_<task> at rounds 0 and 2 (the student after 0 and
    2 steps) and on a final line {round: 3}; training is unchanged by probing (kl_<task> bitwise
    equal to a run without probes); the round-0 probe is the same for another --seed, --noise-level
    0.7 and --estimator ppo (the student LoRA starts as a no-op), and equals the base-vs-teacher
    probe KL (the plain base rolling out, adapters disabled); later probes move. (4 probe images
    per task instead of PROBE_N = 16, for time.) Run c is distill.py's own run, without probes."""
    monkeypatch.setattr(A, "probe_kl", functools.partial(A.probe_kl, n=4))    # the Variant's probe reads it per call
    kw = dict(rounds=3, prompts=2, eval_every=0, eval_n=0, eval_heldout_n=0, lr=2e-2)
    A.run(_dcfg(tmp_path / "a", tiny_teachers, A.AblationConfig, probe_every=2, **kw))
    A.run(_dcfg(tmp_path / "b", tiny_teachers, A.AblationConfig, probe_every=2, seed=1, noise_level=EST_A,
                estimator="ppo", **kw))
    D.run(_dcfg(tmp_path / "c", tiny_teachers, **kw))
    la, lb, lc = _probe_log(tmp_path / "a"), _probe_log(tmp_path / "b"), _probe_log(tmp_path / "c")
    keys = [f"probe_kl_{t}" for t in R.TASKS]
    for lg in (la, lb):
        assert [r["round"] for r in lg] == [0, 1, 2, 3]
        assert [all(k in r for k in keys) for r in lg] == [True, False, True, True]
        assert all(math.isfinite(r[k]) and r[k] > 0 for r in lg if keys[0] in r for k in keys)
    assert not any(k.startswith("probe") for r in lc for k in r)
    assert [{k: v for k, v in r.items() if k.startswith("kl_")} for r in la[:3]] == \
        [{k: v for k, v in r.items() if k.startswith("kl_")} for r in lc], "probing changed training"
    assert {k: la[0][k] for k in keys} == {k: lb[0][k] for k in keys}, (la[0], lb[0])
    assert json.loads((tmp_path / "b" / "config.json").read_text())["loss"].endswith("PPO-clip surrogate (Eq. 16-19)")
    # the oracle: the plain base (adapters disabled) as the "student" of the probe
    est_pol = S.Policy(str(tiny_base))
    for t, path in zip(R.TASKS, tiny_teachers):
        est_pol.add_adapter(t, path)
    use = est_pol.use
    est_pol.use = lambda name: use(None if name == "student" else name)
    tasks = [t for t in R.toy.TASK_NAMES if t in R.TASKS]
    g_t = {t: runs.settings(p)["cfg"] for t, p in zip(R.TASKS, tiny_teachers)}
    base = A.probe_kl(est_pol, tasks, g_t, runs.settings(str(tiny_base))["cfg"], S.time_grid(3, runs.settings(str(tiny_base))["shift"]))
    for k in keys:
        assert la[0][k] == base[k], (k, la[0][k], base[k])                               # a no-op LoRA adds exact zeros
    moved = {k: (la[0][k], la[-1][k]) for k in keys}
    assert any(abs(b / a - 1) > 1e-3 for a, b in moved.values()), f"probe KLs did not move in training: {moved}"


# ---- the distribution-matching baselines (ablations.py --objective dmd | tdm; math: ../test_opd.py) ----
def _dm(tmp, teachers, objective, **kw):
    return _quiet(tmp, teachers, objective=objective, **kw)


def _state_tensors(out):
    from safetensors.torch import load_file
    return load_file(str(out / json.loads((out / "state.json").read_text())["tensors"]))


@pytest.mark.parametrize("objective", ["dmd", "tdm"])
def test_dm_run_outputs(tiny_teachers, tmp_path, objective):
    """2 rounds of --objective dmd | tdm end to end: <objective>_loss_<task> (finite, > 0) for every task
    and no KL, the config and checkpoint naming the objective, a student that moved, and the resume
    state holding one fake score per task (its LoRA tensors, moved off its teacher's) and the fakes'
    AdamW moments next to the student's."""
    from safetensors.torch import load_file
    out = tmp_path / objective
    A.run(_dm(out, tiny_teachers, objective, rounds=2))
    log = _sft_log(out)
    assert [r["round"] for r in log] == [0, 1]
    for r in log:                      # round 0: a CFG-free teacher's fake IS its real score, so g = 0 there
        assert all(0 <= r[f"{objective}_loss_{t}"] < math.inf for t in R.TASKS), r
        assert not any(k.startswith("kl_") for k in r) and math.isfinite(r["grad_norm"]), r
    assert all(log[1][f"{objective}_loss_{t}"] > 0 for t in R.TASKS), log[1]       # the fakes moved in round 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["objective"] == objective and "no balance" in conf["loss"]
    meta = runs.read_meta(out / "checkpoint")
    assert meta["trained"]["algorithm"].startswith(f"{objective.upper()} baseline")
    assert any(float(v.abs().max()) > 0 for k, v in _student_weights(out).items() if "lora_B" in k)
    st = _state_tensors(out)
    teachers = [load_file(str(Path(p) / "adapter_model.safetensors")) for p in tiny_teachers]
    n_lora = sum(len(t) for t in teachers)
    fake = [st[f"fake.{i}"] for i in range(n_lora)]
    assert f"fake.{n_lora}" not in st and any(k.startswith("opt1.") for k in st), sorted(st)[:5]
    mine, theirs = sorted(float(v.abs().sum()) for v in fake), sorted(float(v.abs().sum()) for t in teachers for v in t.values())
    assert len(mine) == len(theirs) and mine != theirs, "the fake scores never moved off their teachers"
    lr = json.loads((out / "state.json").read_text())["param_groups1"][0]["lr"]     # the fakes' AdamW
    assert lr == pytest.approx(A.FAKE_LR[objective] * conf["lr"]), (lr, conf["lr"])


def test_fake_lr_flag_overrides_the_methods_ratio():
    """--fake-lr R sets the fakes' lr to R x --lr; 0 (the default) keeps DMD's 1x and TDM's 5x."""
    assert [A.fake_lr(A.AblationConfig(), o) for o in ("dmd", "tdm")] == [A.FAKE_LR["dmd"], A.FAKE_LR["tdm"]] == [1.0, 5.0]
    assert A.fake_lr(A.AblationConfig(fake_lr=1.0), "tdm") == 1.0


@pytest.mark.parametrize("objective", ["dmd", "tdm"])
def test_dm_resume_equals_uninterrupted(tiny_teachers, tmp_path, monkeypatch, objective):
    """A dmd / tdm run killed inside round 2 and re-run resumes to the same student and the same fake
    scores, bitwise: the fakes and their AdamW moments are saved and restored with the student."""
    A.run(_dm(tmp_path / "a", tiny_teachers, objective))
    name = f"{objective}_step"
    calls, real = {"n": 0}, getattr(A, name)

    def dies_in_round_2(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3 * 2:                                 # 3 tasks per round: die inside round 2
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(A, name, dies_in_round_2)              # dm_setup binds it when the run starts
    with pytest.raises(KeyboardInterrupt):
        A.run(_dm(tmp_path / "b", tiny_teachers, objective))
    assert json.loads((tmp_path / "b" / "state.json").read_text())["round"] == 2
    monkeypatch.setattr(A, name, real)
    A.run(_dm(tmp_path / "b", tiny_teachers, objective))
    sa, sb = _student_weights(tmp_path / "a"), _student_weights(tmp_path / "b")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f"resumed {objective} student differs"
    fa, fb = _state_tensors(tmp_path / "a"), _state_tensors(tmp_path / "b")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), "resumed fake scores differ"
    untimed = lambda out: [{k: v for k, v in r.items() if k != "time_s"} for r in _sft_log(out)]
    assert untimed(tmp_path / "a") == untimed(tmp_path / "b")


@pytest.mark.parametrize("objective,extra,words", [
    ("dmd", ["--noise-level", "0.7", "--estimator", "ppo"], "--estimator ppo: --objective dmd"),
    ("tdm", ["--estimator", "reinforce"], "--estimator reinforce: --objective tdm"),
    ("dmd", ["--noise-level", "0.7"], "--noise-level 0.7: --objective dmd"),
    ("tdm", ["--noise-level", "0.3"], "--noise-level 0.3: --objective tdm"),
    ("opd", ["--fake-lr", "2"], "--fake-lr 2: only --objective dmd and tdm")])
def test_dm_bad_combinations_one_line_exit_2(tiny_teachers, tmp_path, capsys, objective, extra, words):
    """--objective dmd | tdm with a policy-gradient estimator or SDE rollouts: one line, exit 2, no run folder."""
    out = tmp_path / "d"
    err = _refused(capsys, A.main, ["--teachers", *tiny_teachers, "--out", str(out), "--objective", objective, *extra])
    assert err.startswith("error: " + words), err
    assert not out.exists()
