"""The multi-task RL baselines of Table 1 (multitask.py): joint GRPO-Guard / NFT, cascade RL on
teachers.py's loop, and distill.py refusing their checkpoints."""
import dataclasses
import json
import math

import pytest
import torch

import distill as D
import evaluate as E
import multitask as M
import rewards as R
import runs
import sampler as S
import teachers as T
from conftest import TINY_RL, _argv, _log, _refused, _tree


def _cfg(base, out, **kw):
    """A tiny multi-task config (multitask.MultitaskConfig): conftest's tiny Stage 1 sizes."""
    return M.MultitaskConfig(base=str(base), out=str(out), **(TINY_RL | kw))


@pytest.fixture(scope="module")
def joint_nft(tiny_base, tmp_path_factory):
    """A joint NFT run over all three tasks, with a tiny final evaluation."""
    out = tmp_path_factory.mktemp("joint") / "nft"
    return out, M.train(_cfg(tiny_base, out, task="all", algo="nft", iters=3, eval_n=2))


def test_joint_grpo_guard_round_robin(tiny_base, tmp_path, monkeypatch):
    """--task ocr,aesthetic,geneval (any order): ONE adapter; iterations visit the tasks in Stage 2's
    round-robin order (toy.TASK_NAMES), each batch only its own task's prompts and reward; rollouts
    at the base's CFG; opd.json: role teacher, task joint, its tasks; loads as a Policy."""
    seen = []
    for name, task in R.TASKS.items():
        def spy(imgs, prompts, strict=True, _t=task):
            seen.append((_t.name, list(prompts)))
            return _t.reward(imgs, prompts, strict=strict)
        monkeypatch.setitem(R.TASKS, name, dataclasses.replace(task, reward=spy))
    out = tmp_path / "run"
    ck = M.train(_cfg(tiny_base, out, task="ocr,aesthetic,geneval", algo="grpo-guard", iters=4))
    log = _log(out)
    assert [r["task"] for r in log] == ["geneval", "ocr", "aesthetic", "geneval"], log
    assert all(math.isfinite(r["reward"]) for r in log)
    assert [t for t, _ in seen] == [r["task"] for r in log]
    for t, prompts in seen:                                    # one task's prompts per batch, in groups of 2
        assert set(prompts) <= set(R.TASKS[t].train) and prompts[0::2] == prompts[1::2], (t, prompts)
    meta = runs.read_meta(ck)
    assert meta["role"] == "teacher" and meta["task"] == "joint" and meta["tasks"] == list(R.toy.TASK_NAMES)
    assert meta["cfg"] == runs.read_meta(tiny_base)["cfg"] and meta["trained"]["iterations"] == 4
    assert json.loads((out / "config.json").read_text())["tasks"] == list(R.toy.TASK_NAMES)
    pol = S.Policy(str(ck))
    assert pol.active == "joint" and pol.guidance == meta["cfg"]
    assert E.row_name(str(ck)) == "teacher joint (grpo-guard)"


def test_joint_nft_runs_and_scores_every_task(joint_nft):
    """--task all --algo nft: CFG-free (1.0) for every task, its final evaluation scores all three."""
    out, ck = joint_nft
    assert [r["task"] for r in _log(out)] == list(R.toy.TASK_NAMES)
    meta = runs.read_meta(ck)
    assert meta["task"] == "joint" and meta["cfg"] == 1.0 and meta["trained"]["algorithm"] == "nft"
    assert set(meta["scores"]) == set(R.TASKS) | {"n"}
    per = E.evaluate_checkpoint(str(ck), 2, 0)                 # the same protocol, from its cache
    assert set(per["train"]) == set(R.TASKS)


def test_cascade_stages_chain_resume_and_finish(tiny_base, tmp_path, monkeypatch, capsys):
    """--cascade over 3 tasks: stage k starts from stage k-1's final LoRA (the weights the
    optimizer receives equal the last stage's trained ones, not a fresh LoRA); --iters is split
    equally; a run killed in stage 2 resumes there (stage 1 is not retrained); the final
    checkpoint is stage 3's adapter with a cascade opd.json; a finished cascade re-run does nothing."""
    real, opts = torch.optim.AdamW, []

    def spy(params, *a, **k):
        params = list(params)
        opts.append((params, [p.detach().clone() for p in params]))
        if len(opts) == 2 and not spy.resumed:
            raise KeyboardInterrupt                            # killed as stage 2 starts
        return real(params, *a, **k)
    spy.resumed = False
    monkeypatch.setattr(torch.optim, "AdamW", spy)
    out = tmp_path / "cascade"
    argv = _argv(tiny_base, out, "--task", "geneval,ocr,aesthetic", "--cascade", "--algo", "nft", "--iters", "3")
    with pytest.raises(KeyboardInterrupt):
        M.main(argv)
    assert (out / "stage1-geneval" / "checkpoint" / runs.META).is_file()
    spy.resumed = True
    stage1 = _tree(out / "stage1-geneval")
    M.main(argv)                                               # resumes: stages 2 and 3 only
    assert len(opts) == 4 and _tree(out / "stage1-geneval") == stage1
    (s1_final, s1_init), s2_init = (opts[0][0], opts[0][1]), opts[2][1]
    assert any(not torch.equal(a.detach(), b) for a, b in zip(s1_final, s1_init)), "stage 1 did not train"
    assert all(torch.equal(a.detach(), b) for a, b in zip(s1_final, s2_init)), "stage 2 did not start from stage 1"
    assert all(torch.equal(a.detach(), b) for a, b in zip(s1_final, opts[1][1]))      # the killed attempt too
    assert all(float(b.abs().sum()) == 0 for b in s1_init[1::2])     # stage 1: a fresh LoRA (every lora_B is 0)
    ck = out / "checkpoint"
    assert (ck / "adapter_model.safetensors").read_bytes() == \
        (out / "stage3-aesthetic" / "checkpoint" / "adapter_model.safetensors").read_bytes()
    meta = runs.read_meta(ck)
    assert meta["role"] == "teacher" and meta["task"] == "cascade" and meta["tasks"] == ["geneval", "ocr", "aesthetic"]
    st = meta["trained"]["stages"]
    assert [s["task"] for s in st] == meta["tasks"] and [s["iterations"] for s in st] == [1, 1, 1]
    assert all("minutes" in s for s in st) and meta["trained"]["iterations"] == 3
    assert [runs.read_meta(out / s["run"] / "checkpoint")["task"] for s in st] == ["geneval", "cascade", "cascade"]
    assert runs.settings(ck)["base"] == str(tiny_base.resolve()) and S.Policy(str(ck)).active == "cascade"
    before = _tree(out)
    capsys.readouterr()
    M.main(argv)                                               # finished: nothing new
    assert "is finished" in capsys.readouterr().out and _tree(out) == before and len(opts) == 4


def test_cascade_splits_minutes_into_equal_parts(tiny_base, tmp_path, monkeypatch):
    """--minutes is the cascade's total: each stage runs under a third of it."""
    calls = []
    real = T.train
    monkeypatch.setattr(T, "train", lambda cfg, tasks=None: calls.append(cfg) or real(cfg, tasks))
    M.train(_cfg(tiny_base, tmp_path / "c", task="all", cascade=True, algo="nft", iters=4, minutes=3.0))
    assert [(type(c), c.task, c.minutes, c.iters) for c in calls] == \
        [(T.TeacherConfig, "geneval", 1.0, 2), (T.TeacherConfig, "ocr", 1.0, 1), (T.TeacherConfig, "aesthetic", 1.0, 1)]


def test_distill_refuses_a_joint_checkpoint(joint_nft, tmp_path, capsys):
    """A multi-task checkpoint is no teacher for one task: distill.py says so in one line, exit 2,
    both as a folder and as TASK=PATH."""
    _, ck = joint_nft
    for entry in (str(ck), f"geneval={ck}"):
        out = tmp_path / "d"
        msg = _refused(capsys, D.main, ["--teachers", entry, "--out", str(out), "--rounds", "1"])
        assert "joint" in msg, msg
        assert not out.exists()


def test_cascade_needs_several_tasks(tiny_base, tmp_path, capsys):
    msg = _refused(capsys, M.main, _argv(tiny_base, tmp_path / "run", "--task", "ocr", "--cascade"))
    assert "--cascade" in msg and not (tmp_path / "run").exists(), msg


@pytest.mark.parametrize("extra", [["--task", "all"], ["--task", "geneval,ocr", "--cascade"]])
def test_multitask_export_into_ckpts_refused_up_front(extra, tiny_base, tmp_path, capsys):
    """distill.py's default teachers are ckpts/*: a multi-task run may not export there (checked
    before any training; nothing written)."""
    before = _tree(runs.REPO / "ckpts")
    msg = _refused(capsys, M.main, _argv(tiny_base, tmp_path / "run", *extra, "--export", str(runs.REPO / "ckpts" / "joint")))
    assert "--export" in msg and not (tmp_path / "run").exists(), msg
    assert _tree(runs.REPO / "ckpts") == before


@pytest.mark.parametrize("task", ["all", "geneval,ocr"])
def test_teachers_py_trains_one_task(task, tiny_base, tmp_path, capsys):
    """teachers.py trains a single-task teacher; several tasks are refused in one line naming
    multitask.py, before anything is written."""
    msg = _refused(capsys, T.main, _argv(tiny_base, tmp_path / "run", "--task", task))
    assert "multitask.py" in msg and not (tmp_path / "run").exists(), msg
