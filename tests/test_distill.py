"""Stage 2 (distill.py) run end to end on the tiny toy base and its teachers: outputs, grids,
the KL falling, the round's task-balanced gradient, resume, data parallel (torchrun, gloo), the
command line and its refusals, and the real-scale options (--ema, --bf16, --grad-checkpointing).
A test that needs to watch or stop a task step passes its own distill.Variant (run(cfg, variant)
or main(argv, variant_of=...)): a run binds distill_task at import, so patching the module
attribute would not reach it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distill as D
import evaluate as E
import rewards as R
import runs
import sampler as S
from conftest import REPO, _cli, _dcfg, _make_teacher, _refused, _student


# ---- a run's outputs, its KL, its gradient --------------------------------------------------
def test_distill_run_outputs(tiny_teachers, tmp_path):
    res = D.run(_dcfg(tmp_path / "d", tiny_teachers))
    out = tmp_path / "d"
    names = [r["name"] for r in res["rows"]]
    assert names[0] == "base" and names[-1] == "DiffusionOPD student" and len(names) == 5
    for f in ("config.json", "log.jsonl", "results.json", "curves.png", "grid_ocr.png", "checkpoint/opd.json"):
        assert (out / f).is_file(), f
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in log] == [0, 1, 2] and all(r["kl_ocr"] > 0 for r in log)
    conf = json.loads((out / "config.json").read_text())
    assert conf["trained_steps"] == 3 == len(conf["grid"]) - 1             # every step of the toy grid trains,
    assert conf["sample_steps"] == 0 < 3 <= D.DistillConfig.sample_steps   # each rollout: --sample-steps K >= 3 = all
    assert all(set(r["scores"]) == set(r["heldout"]) == set(R.TASKS) for r in res["rows"])
    assert set(res["gains"]) == {"train", "test"} and "vs_base_heldout" in res["rows"][-1]
    meta = runs.read_meta(out / "checkpoint")
    assert meta["role"] == "student" and set(meta["teachers"]) == set(R.TASKS)
    assert not any(v.startswith("/") for v in json.dumps(meta).split('"') if len(v) > 1)
    pol = S.Policy(str(out / "checkpoint"))                   # the student loads as a checkpoint
    assert pol.active == "student"


def test_last_small_eval_is_read_off_the_final_evaluation(tiny_teachers, tmp_path, monkeypatch):
    """When the last round is an evaluation round, its small evaluation is not sampled again: the log
    gets the final evaluation's first eval_small images per task, and they are what sampling the
    small evaluation of the saved student gives (the protocol's lists are prefixes of longer ones)."""
    out, small = tmp_path / "d", []
    real = E.evaluate
    monkeypatch.setattr(E, "evaluate", lambda pol, task, n=256, *a, **k: small.append(n) or real(pol, task, n, *a, **k))
    D.run(_dcfg(out, tiny_teachers, rounds=2, eval_every=2, eval_small=2, eval_n=8, eval_heldout_n=0))
    assert small.count(2) == len(R.TASKS), f"small evaluations sampled: {small.count(2)} (want the round-1 one only)"
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    last = [r for r in log if r.get("from") == "final evaluation"]
    assert len(last) == 1 and last[0]["round"] == 1
    pol = S.Policy(str(out / "checkpoint"))
    for t in R.TASKS:
        fresh = float(real(pol, t, 2).mean())
        assert abs(last[0][f"eval_{t}"] - fresh) < 1e-5, (t, last[0][f"eval_{t}"], fresh)
    D.run(_dcfg(out, tiny_teachers, rounds=2, eval_every=2, eval_small=2, eval_n=8, eval_heldout_n=0))
    again = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert again == log, "re-running a finished run changed its log"


def test_grids_are_drawn_through_the_protocol(tiny_teachers, tmp_path, monkeypatch):
    """The grids show the protocol's first images (train prompts, seeds, each model's own CFG and
    shift), titled with the protocol's per-image scores: re-scoring the drawn images gives the titles;
    each column's prompt stands above its top image."""
    out = tmp_path / "d"
    D.run(_dcfg(out, tiny_teachers, rounds=1, eval_every=0, eval_heldout_n=0))
    pol = S.Policy(str(out / "checkpoint"))                   # base + the "student" adapter
    per = {"base": E.evaluate_checkpoint(pol.base_path, 8, 0)["train"],
           "DiffusionOPD student": E.evaluate_checkpoint(str(out / "checkpoint"), 8, 0)["train"]}
    from matplotlib.axes import Axes
    titles, real = [], Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda self, text, *a, **k: titles.append(text) or real(self, text, *a, **k))
    drawn = D.figures(out, pol, per)
    assert set(drawn) == set(R.TASKS)
    for k, task in enumerate(R.TASKS):                         # per task 8 columns: prompt + score on top, then 8 below
        mine = titles[16 * k:16 * k + 8]
        for c, p in enumerate(E.eval_prompts(task, "train", 8)[:8]):
            assert " ".join(mine[c].split("\n")[:-1]) == p and mine[c].endswith(f"{per['base'][task][c]:.2f}"), mine[c]
    for task, rows in drawn.items():
        for name, (titles, rescored) in rows.items():
            np.testing.assert_allclose(titles, rescored, atol=1e-5, err_msg=f"{task} {name}")


def test_distill_kl_decreases(tiny_teachers, tmp_path):
    """Measured property: the task-summed per-step KL (the loss distill.py minimises) falls by at
    least 20% in 15 rounds. (Per task it need not: these random teachers pull one student apart.)"""
    D.run(_dcfg(tmp_path / "d", tiny_teachers, rounds=15, eval_every=0, lr=2e-2, eval_n=0, eval_heldout_n=0))
    log = [json.loads(l) for l in (tmp_path / "d" / "log.jsonl").read_text().splitlines()]
    total = [sum(r[f"kl_{t}"] for t in R.TASKS) for r in log]
    first, last = total[0], float(np.mean(total[-3:]))
    per = {t: (round(log[0][f"kl_{t}"], 6), round(float(np.mean([r[f"kl_{t}"] for r in log[-3:]])), 6)) for t in R.TASKS}
    assert last < 0.8 * first, f"summed KL {first:.4g} -> {last:.4g}, expected < 0.8x; per task {per}"


def _round_gradients(teachers, out, balance, monkeypatch):
    """Run one distill round; return each task's own gradient and its mean per-step KL (what
    distill_task returns; spied on through the run's Variant) and the combined gradient that
    reaches clipping."""
    per_task, final = [], []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(policy, *a, **k):
        kl = D.distill_task(policy, *a, **k)                # leaves THIS task's gradient in .grad
        per_task.append(([p.grad.clone() for p in policy.adapter_params("student").values()], kl))
        return kl

    def clip_spy(params, *a, **k):
        params = list(params)
        final.append([p.grad.clone() for p in params])
        return real_clip(params, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    D.run(_dcfg(out, teachers, rounds=1, eval_every=0, eval_n=0, eval_heldout_n=0, balance=balance),
          D.OPD._replace(task_step=spy))
    monkeypatch.undo()
    assert len(per_task) == len(R.TASKS) and len(final) == 1
    return per_task, final[0]


def test_distill_round_gradient_balances_tasks(tiny_teachers, tmp_path, monkeypatch):
    """The round's gradient (what reaches clipping and AdamW) is the task mean of grad KL_m with
    --no-balance (the paper), and of grad KL_m / KL_m = grad log KL_m with --balance (the
    default, deviation 5), KL_m being the task's detached mean per-step KL of that round (what
    distill_task returns)."""
    combined = {}
    for balance in (False, True):
        per_task, final = _round_gradients(tiny_teachers, tmp_path / f"b-{balance}", balance, monkeypatch)
        kls = [kl for _, kl in per_task]
        w = [1 / (len(kls) * (k if balance else 1.0)) for k in kls]
        for i, got in enumerate(final):
            want = sum(wm * g[i] for wm, (g, _) in zip(w, per_task))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7 * float(want.abs().max()) + 1e-30)
        combined[balance] = torch.cat([g.flatten() for g in final])
    assert max(kls) > 1.5 * min(kls), f"task KLs {kls} too alike for the test to tell the two rules apart"
    cos = float(torch.nn.functional.cosine_similarity(combined[False], combined[True], dim=0))
    assert cos < 0.999, f"balanced and plain round gradients point the same way (cos {cos:.5f})"


def test_distill_resume_equals_uninterrupted(tiny_teachers, tmp_path):
    """Killed inside round 2 and re-run: the same student as uninterrupted, with --sample-steps 2 of
    3 (the draws come from each round's generator, so a resumed round draws the same steps)."""
    quiet = dict(eval_every=0, eval_n=0, eval_heldout_n=0, sample_steps=2)   # the final evaluation is not compared
    D.run(_dcfg(tmp_path / "a", tiny_teachers, **quiet))
    calls = {"n": 0}

    def dies_in_round_2(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3 * 2:                                 # 3 tasks per round: die inside round 2
            raise KeyboardInterrupt
        return D.distill_task(*a, **k)
    with pytest.raises(KeyboardInterrupt):
        D.run(_dcfg(tmp_path / "b", tiny_teachers, **quiet), D.OPD._replace(task_step=dies_in_round_2))
    assert json.loads((tmp_path / "b" / "state.json").read_text())["round"] == 2
    assert not (tmp_path / "b" / "checkpoint").exists()
    D.run(_dcfg(tmp_path / "b", tiny_teachers, **quiet))
    sa, sb = _student(tmp_path / "a"), _student(tmp_path / "b")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "resumed student differs"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["sample_steps"] == 2


# ---- processes, the command line, bad input --------------------------------------------------
def test_distill_two_processes_match_one(tiny_teachers, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) equals one process with the same global batch, for SDE
    rollouts (a = 0.7: the initial and the per-step noise are drawn globally and sliced per process,
    on trained and walked steps alike - --sample-steps 2 of 3; ODE rollouts draw only the first).
    The 2-process run also evaluates: every process samples and scores its share of the final
    evaluation (image i on process i mod 2) and all get every score - the per-image scores it
    cached for the base equal one process computing them afresh, and its table has every row (n = 7 / 3: sizes no other test uses, so the run computes them itself)."""
    args = ["--teachers", *tiny_teachers, "--rounds", "2", "--prompts", "4", "--steps", "3", "--eval-every", "0",
            "--rank", "4", "--alpha", "8", "--noise-level", "0.7", "--sample-steps", "2"]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "distill.py",
                          *args, "--eval-n", "7", "--eval-heldout-n", "3", "--out", str(tmp_path / "two")],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert two.returncode == 0, two.stderr[-3000:]
    D.main([*map(str, args), "--eval-n", "0", "--eval-heldout-n", "0", "--out", str(tmp_path / "one")])
    sa, sb = _student(tmp_path / "one"), _student(tmp_path / "two")
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst < 1e-5, f"2-process student differs from 1-process by {worst:.2e} (tolerance 1e-5)"
    rows = json.loads((tmp_path / "two" / "results.json").read_text())["rows"]
    assert rows[0]["name"] == "base" and len(rows) == 5 and all(len(r["scores"]) == 3 for r in rows)
    base = runs.settings(tiny_teachers[0])["base"]
    cached, pol = E.evaluate_checkpoint(base, 7, 3), S.Policy(base)     # what the 2 processes wrote
    for split, n in (("train", 7), ("test", 3)):
        for task in R.TASKS:
            fresh = E.evaluate(pol, task, n, split=split)
            assert np.allclose(cached[split][task], fresh, atol=1e-6), (split, task, cached[split][task], fresh)


def test_distill_cli_smoke_and_finished_run(tiny_teachers, tmp_path, capsys):
    args = ["distill.py", "--teachers", *tiny_teachers, "--out", tmp_path / "d", "--rounds", "1", "--prompts", "2",
            "--steps", "2", "--eval-every", "0", "--eval-n", "8", "--eval-heldout-n", "2", "--rank", "4", "--alpha", "8"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DiffusionOPD student" in r.stdout and "student - base" in r.stdout
    before = (tmp_path / "d" / "results.json").read_bytes()
    capsys.readouterr()
    D.main([str(a) for a in args[1:]])                              # again (in this process): nothing to do
    assert "is finished" in capsys.readouterr().out
    assert (tmp_path / "d" / "results.json").read_bytes() == before


@pytest.fixture()
def bad_teachers(tiny_base, tiny_teachers, tmp_path):
    """Folders for each bad input of the README's list of errors."""
    d = {}
    d["not_ckpt"] = tmp_path / "empty"; d["not_ckpt"].mkdir()
    d["unknown_task"] = tmp_path / "unk"; shutil.copytree(tiny_teachers[0], d["unknown_task"])
    m = runs.read_meta(d["unknown_task"]); m["task"] = "video"; m["base"]["path"] = os.path.relpath(tiny_base, d["unknown_task"])
    runs.write_json_atomic(d["unknown_task"] / runs.META, m)
    d["second_ocr"] = tmp_path / "ocr2"; shutil.copytree(tiny_teachers[1], d["second_ocr"])
    m = runs.read_meta(d["second_ocr"]); m["base"]["path"] = os.path.relpath(tiny_base, d["second_ocr"])
    runs.write_json_atomic(d["second_ocr"] / runs.META, m)
    other = tmp_path / "otherbase"; shutil.copytree(tiny_base, other)
    d["other_base"] = tmp_path / "aes_other"
    shutil.copytree(tiny_teachers[2], d["other_base"])
    m = runs.read_meta(d["other_base"]); m["base"]["path"] = os.path.relpath(other, d["other_base"])
    runs.write_json_atomic(d["other_base"] / runs.META, m)
    d["corrupt"] = tmp_path / "corrupt"; shutil.copytree(tiny_teachers[1], d["corrupt"])
    m = runs.read_meta(d["corrupt"]); m["base"]["path"] = os.path.relpath(tiny_base, d["corrupt"])
    runs.write_json_atomic(d["corrupt"] / runs.META, m)
    (d["corrupt"] / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    d["shape"] = tmp_path / "shape"
    _make_teacher(tiny_base, d["shape"], "ocr", 3)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(d["shape"] / "adapter_model.safetensors"))
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in sd.items()}, str(d["shape"] / "adapter_model.safetensors"))
    return d


@pytest.mark.parametrize("case,words", [
    ("not_ckpt", "not a teacher"), ("unknown_task", "unknown task"), ("second_ocr", "second teacher"),
    ("other_base", "different bases"), ("corrupt", "safetensors"), ("shape", "does not fit")])
def test_distill_bad_input_one_line_exit_2(bad_teachers, tiny_teachers, tmp_path, capsys, case, words):
    g, o, a = tiny_teachers
    sets = {"not_ckpt": [g, o, bad_teachers["not_ckpt"]], "unknown_task": [g, o, bad_teachers["unknown_task"]],
            "second_ocr": [g, o, bad_teachers["second_ocr"]], "other_base": [g, o, bad_teachers["other_base"]],
            "corrupt": [g, bad_teachers["corrupt"], a], "shape": [g, bad_teachers["shape"], a]}
    out = tmp_path / "out"                                     # a new run folder: must not be left behind
    err = _refused(capsys, D.main, ["--teachers", *map(str, sets[case]), "--out", str(out), "--rounds", "1",
                                    "--prompts", "2", "--steps", "2"], progress=True)
    assert words in err, err
    assert not out.exists() and not out.with_name("out.tmp").exists()


def test_distill_nan_loss_stops_cleanly(tiny_teachers, tmp_path, capsys):
    out = tmp_path / "nan"
    err = _refused(capsys, D.main, ["--teachers", *tiny_teachers, "--out", str(out), "--rounds", "3", "--prompts", "2",
                                    "--steps", "2", "--lr", "1e30", "--eval-every", "0", "--rank", "4", "--alpha", "8"],
                   progress=True)
    assert "NaN" in err, err
    assert not (out / "checkpoint").exists() and not (out / "results.json").exists()


# ---- Stage 2's real-scale options: --bf16, --grad-checkpointing, --ema / --ema-every ----
def _quick(tmp, teachers, **kw):
    """A short run without the final evaluation (the options only change training)."""
    return _dcfg(tmp, teachers, **{"eval_every": 0, "eval_n": 0, "eval_heldout_n": 0, **kw})


def _peft_key(name):
    """adapter_params name (...lora_A.student.weight) -> saved PEFT key (...lora_A.weight)."""
    return name.replace(".student.", ".")


def _record_raw_weights(monkeypatch):
    """Spy: the student's weights before training (first task step) and after every optimizer
    step (runs.save_state is called once per round, after the step and the EMA update). Returns
    the record and the Variant to run with."""
    rec = {"init": None, "steps": [], "ema": []}
    real_task, real_save = D.distill_task, runs.save_state

    def task_spy(policy, *a, **k):
        if rec["init"] is None:
            rec["init"] = {n: p.detach().clone() for n, p in policy.adapter_params("student").items()}
        return real_task(policy, *a, **k)

    def save_spy(prefix, tensors, *a, **k):
        rec["steps"].append([t.detach().clone() for t in tensors["params"]])
        rec["ema"].append([t.detach().clone() for t in tensors.get("ema", [])])
        return real_save(prefix, tensors, *a, **k)
    monkeypatch.setattr(runs, "save_state", save_spy)
    return rec, D.OPD._replace(task_step=task_spy)


def test_ema_checkpoint_is_the_hand_computed_ema(tiny_teachers, tmp_path, monkeypatch):
    """--ema 0.5 --ema-every 2, 4 rounds: e_0 = the initial LoRA, e = 0.5 e + 0.5 w after steps 2
    and 4; the checkpoint holds e. The EMA does not change training: --ema 0 (same seed) follows
    the same raw weights and saves the raw w_4."""
    d, every, rounds = 0.5, 2, 4
    rec, spy = _record_raw_weights(monkeypatch)
    D.run(_quick(tmp_path / "ema", tiny_teachers, rounds=rounds, ema=d, ema_every=every), spy)
    monkeypatch.undo()
    names = list(rec["init"])
    assert len(rec["steps"]) == rounds
    e = [rec["init"][n] for n in names]
    for s in range(1, rounds + 1):
        if s % every == 0:
            e = [d * ei + (1 - d) * wi for ei, wi in zip(e, rec["steps"][s - 1])]
        if s == 1:                                                 # no update yet: still the initial weights
            assert all(torch.equal(a, b) for a, b in zip(rec["ema"][0], [rec["init"][n] for n in names]))
    saved = _student(tmp_path / "ema")
    assert set(saved) == {_peft_key(n) for n in names}
    worst = max(float((saved[_peft_key(n)] - ei).abs().max()) for n, ei in zip(names, e))
    raw = rec["steps"][-1]
    gap = max(float((ei - wi).abs().max()) for ei, wi in zip(e, raw))
    print(f"EMA: saved vs hand {worst:.3e}, EMA vs raw {gap:.3e}")
    assert gap > 1e-4, f"the EMA sits only {gap:.2e} from the raw weights: the test could not tell them apart"
    assert worst <= 1e-6 * max(float(t.abs().max()) for t in e), \
        f"saved checkpoint differs from the hand EMA by {worst:.3e} (EMA vs raw: {gap:.3e})"
    meta = runs.read_meta(tmp_path / "ema" / "checkpoint")
    assert meta["trained"]["config"]["ema"] == d and meta["trained"]["config"]["ema_every"] == every, meta["trained"]
    # --ema 0: the raw weights, bitwise; and the same raw trajectory as the EMA run
    D.run(_quick(tmp_path / "raw", tiny_teachers, rounds=rounds))
    plain = _student(tmp_path / "raw")
    assert all(torch.equal(plain[_peft_key(n)], w) for n, w in zip(names, raw)), "--ema 0 did not save the raw weights"


def test_distill_resume_with_ema_equals_uninterrupted(tiny_teachers, tmp_path):
    """Killed inside round 3 of 4 (the EMA updated once, after step 2), resumed: the EMA comes back
    from the state and the saved student (the EMA, updated again after step 4) equals an
    uninterrupted run's bitwise."""
    kw = dict(rounds=4, ema=0.5, ema_every=2)
    D.run(_quick(tmp_path / "a", tiny_teachers, **kw))
    calls = {"n": 0}
    real = D.distill_task

    def dies_in_round_3(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3 * 2:                                     # 3 tasks per round
            raise KeyboardInterrupt
        return real(*a, **k)
    with pytest.raises(KeyboardInterrupt):
        D.run(_quick(tmp_path / "b", tiny_teachers, **kw), D.OPD._replace(task_step=dies_in_round_3))
    from safetensors.torch import load_file
    st = json.loads((tmp_path / "b" / "state.json").read_text())
    assert st["round"] == 2 and any(k.startswith("ema.") for k in load_file(str(tmp_path / "b" / st["tensors"])))
    D.run(_quick(tmp_path / "b", tiny_teachers, **kw))
    sa, sb = _student(tmp_path / "a"), _student(tmp_path / "b")
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert sa.keys() == sb.keys() and not differ, f"resumed EMA student differs in {len(differ)} tensors"


def test_bf16_runs_and_its_kls_match_fp32(tiny_teachers, tmp_path, monkeypatch):
    """--bf16 on CPU: 2 rounds run; round 0's per-task KLs (same start, prompts and noise) are
    within 5% of the fp32 run's, yet not identical (the autocast did act); the LoRA master weights
    in the resume state are still float32. With --grad-checkpointing added (through run(), under
    autocast) the student is the same, bitwise."""
    import torch.utils.checkpoint as C
    calls, real = {}, C.checkpoint

    def counting(*a, **k):
        calls[name] = calls.get(name, 0) + 1
        return real(*a, **k)
    monkeypatch.setattr(C, "checkpoint", counting)
    for name, bf16, ckpt in (("fp32", False, False), ("bf16", True, False), ("bf16-gc", True, True)):
        D.run(_quick(tmp_path / name, tiny_teachers, rounds=2, bf16=bf16, grad_checkpointing=ckpt))
    monkeypatch.undo()
    assert set(calls) == {"bf16-gc"}, f"checkpointed block calls per run: {calls}"
    sa, sb = _student(tmp_path / "bf16"), _student(tmp_path / "bf16-gc")
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"--grad-checkpointing changed {len(differ)} student tensors under --bf16"
    logs = {n: [json.loads(l) for l in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("fp32", "bf16")}
    assert [r["round"] for r in logs["bf16"]] == [0, 1]
    rel = {t: abs(logs["bf16"][0][f"kl_{t}"] / logs["fp32"][0][f"kl_{t}"] - 1) for t in R.TASKS}
    msg = f"round-0 KL relative difference bf16 vs fp32: {rel}"
    print(msg, {t: (logs["fp32"][0][f"kl_{t}"], logs["bf16"][0][f"kl_{t}"]) for t in R.TASKS})
    assert max(rel.values()) < 0.05, msg
    assert max(rel.values()) > 0, "bf16 KLs equal the fp32 ones bitwise: autocast had no effect; " + msg
    from safetensors.torch import load_file
    st = json.loads((tmp_path / "bf16" / "state.json").read_text())
    dtypes = {v.dtype for k, v in load_file(str(tmp_path / "bf16" / st["tensors"])).items() if k.startswith("params.")}
    assert dtypes == {torch.float32}, dtypes


def test_student_lora_defaults_by_scale(tiny_teachers, tmp_path):
    """--rank 0 / --alpha 0 (the defaults): 96 / 192 on the toy, 32 / 64 (the paper's) at real scale;
    a given rank keeps alpha at twice it unless given; a run records what it used."""
    assert D.student_lora(D.DistillConfig(), "toy") == (96, 192)
    assert D.student_lora(D.DistillConfig(), "sd3") == (32, 64)
    assert D.student_lora(D.DistillConfig(rank=8), "toy") == (8, 16)
    assert D.student_lora(D.DistillConfig(rank=8, alpha=4), "sd3") == (8, 4)
    D.run(_dcfg(tmp_path / "d", tiny_teachers, rounds=1, eval_every=0, eval_n=0, eval_heldout_n=0))
    conf = json.loads((tmp_path / "d" / "config.json").read_text())
    lora = json.loads((tmp_path / "d" / "checkpoint" / "adapter_config.json").read_text())
    assert (conf["rank"], conf["alpha"]) == (lora["r"], lora["lora_alpha"]) == (4, 8), (conf, lora)


def test_option_help_lines():
    h = " ".join(runs.config_parser(D.DistillConfig, "x").format_help().split())
    for flag in ("--bf16", "--grad-checkpointing", "--ema EMA", "--ema-every EMA_EVERY"):
        assert flag in h, flag
    assert "student EMA decay" in h and "(default: 0.0)" in h and "(default: 8)" in h


@pytest.mark.parametrize("flag,value,words", [("--ema", "1.5", "[0, 1)"), ("--ema", "-0.1", ">= 0"),
                                              ("--ema-every", "0", ">= 1")])
def test_bad_ema_values_one_line_exit_2(tiny_teachers, tmp_path, capsys, flag, value, words):
    out = tmp_path / "out"
    err = _refused(capsys, D.main, ["--teachers", *tiny_teachers, "--out", str(out), "--rounds", "1", "--prompts", "2",
                                    "--steps", "2", flag, value])
    assert words in err, err
    assert not out.exists()
