"""Run folders that cannot hurt (runs.py; docs/formats.md, "Run folders"): what --out and --fresh
refuse, resume only under the same config, a fault between a state's write and its rename, one
process per run folder, --export, torchrun's process layout, and the flags' checks."""
import argparse
import json
import os

import pytest
import torch

import ablations as A
import distill as D
import runs
import toy
from conftest import REPO, _cli, _dcfg, _refused, _student, _tree


# ---- --out, --fresh and resume --------------------------------------------------------------
@pytest.mark.parametrize("script", ["distill", "ablations", "teachers", "toy"])
@pytest.mark.parametrize("target", ["base", "ckpts/ocr", "ckpts", ".", "..", "foreign"])
@pytest.mark.parametrize("fresh", [False, True])
def test_out_refusals_touch_nothing(script, target, fresh, tiny_teachers, tmp_path, capsys):
    """--out (and --fresh) only ever create or delete a run folder: base/, ckpts/, the repository,
    a folder holding it, or a folder this project did not create are refused, byte for byte intact."""
    import teachers as T
    foreign = tmp_path / "foreign"
    foreign.mkdir(); (foreign / "notes.txt").write_text("precious")
    out = foreign if target == "foreign" else REPO / target
    watch = foreign if target == "foreign" else REPO / ("ckpts" if target in (".", "..") else target)
    before = _tree(watch)
    argv = ["--out", str(out)] + (["--fresh"] if fresh else [])
    fn = {"distill": D.main, "ablations": A.main, "teachers": T.main, "toy": toy.main}[script]
    if script in ("distill", "ablations"):
        argv += ["--teachers", *tiny_teachers, "--rounds", "1"]
    msg = _refused(capsys, fn, argv)
    assert "--out" in msg, msg
    assert _tree(watch) == before


def test_resume_refuses_another_config(tiny_teachers, tmp_path, capsys):
    """A run folder resumes only under the config it was started with - unfinished or finished:
    a changed flag is refused, naming the key, exit 2, nothing touched."""
    out = tmp_path / "d"
    args = ["--teachers", *tiny_teachers, "--out", str(out), "--rounds", "2", "--prompts", "2", "--steps", "2",
            "--eval-every", "0", "--eval-n", "2", "--eval-heldout-n", "0", "--rank", "4", "--alpha", "8"]
    real = D.distill_task
    calls = {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    with pytest.raises(KeyboardInterrupt):                         # killed in round 1 (its 4th task step)
        D.main(args, variant_of=lambda cfg: D.OPD._replace(task_step=dies))

    def changed(flag, value):
        i = args.index(flag)
        return args[:i + 1] + [value] + args[i + 2:]
    before = _tree(out)
    msg = _refused(capsys, D.main, args + ["--lr", "1e-4"])
    assert "(lr differ)" in msg and "--fresh" in msg, msg
    assert _tree(out) == before
    D.main(args)                                                    # same flags: resumes and finishes
    capsys.readouterr()
    assert (out / "results.json").is_file()
    before = _tree(out)
    msg = _refused(capsys, D.main, changed("--steps", "3"))
    assert "grid, steps, trained_steps" in msg, msg
    msg = _refused(capsys, D.main, changed("--eval-n", "4"))
    assert "(eval_n differ)" in msg, msg
    assert _tree(out) == before
    D.main(args)                                                    # same flags on a finished run: reports
    assert "is finished" in capsys.readouterr().out and _tree(out) == before


def test_fault_between_write_and_rename_keeps_state(tiny_teachers, tmp_path, monkeypatch):
    """A fault injected between a resume state's temporary write and its rename leaves the
    previous state intact, and the re-run equals an uninterrupted run bitwise."""
    D.run(_dcfg(tmp_path / "a", tiny_teachers, eval_every=0, eval_n=0, eval_heldout_n=0))
    real, seen = os.replace, {"n": 0}

    def fails_on_round_2(src, dst):
        if str(dst).endswith("state.json"):
            seen["n"] += 1
            if seen["n"] == 2:                                     # the commit of round 2's state
                raise OSError("injected fault")
        return real(src, dst)
    monkeypatch.setattr(runs.os, "replace", fails_on_round_2)
    with pytest.raises(OSError, match="injected"):
        D.run(_dcfg(tmp_path / "b", tiny_teachers, eval_every=0, eval_n=0, eval_heldout_n=0))
    monkeypatch.setattr(runs.os, "replace", real)
    info = json.loads((tmp_path / "b" / "state.json").read_text())
    assert info["round"] == 1 and (tmp_path / "b" / info["tensors"]).is_file()
    D.run(_dcfg(tmp_path / "b", tiny_teachers, eval_every=0, eval_n=0, eval_heldout_n=0))
    sa, sb = _student(tmp_path / "a"), _student(tmp_path / "b")
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "re-run after the fault differs from the uninterrupted run"


# ---- --export, processes, locks, flags --------------------------------------------------------
def test_export_only_creates_or_replaces_checkpoints(tiny_base, tmp_path):
    """--export writes a new folder or replaces a checkpoint; the repository, a folder holding it and
    a folder that is not a checkpoint are refused untouched."""
    foreign = tmp_path / "notes"
    foreign.mkdir(); (foreign / "a.txt").write_text("precious")
    for dst in (REPO, REPO.parent, foreign):
        before = _tree(foreign if dst == foreign else REPO / "ckpts")
        with pytest.raises(runs.CheckpointError, match="--export"):
            runs.export_checkpoint(tiny_base, dst)
        assert _tree(foreign if dst == foreign else REPO / "ckpts") == before
    runs.export_checkpoint(tiny_base, tmp_path / "new")
    runs.export_checkpoint(tiny_base, tmp_path / "new")                      # over a checkpoint: allowed
    assert runs.read_meta(tmp_path / "new")["role"] == "base"


def test_process_layout_from_torchrun_environment():
    """torchrun's variables pick the device and backend: GPU LOCAL_RANK with NCCL on CUDA, the CPU
    with gloo otherwise; one process without any variable."""
    lay = runs.layout({}, cuda=False)
    assert (lay["world"], lay["rank"], lay["device"].type, lay["backend"]) == (1, 0, "cpu", "gloo")
    env = {"WORLD_SIZE": "16", "RANK": "11", "LOCAL_RANK": "3"}            # node 2 of 2, 8 GPUs each
    lay = runs.layout(env, cuda=True)
    assert (lay["world"], lay["rank"], str(lay["device"]), lay["backend"]) == (16, 11, "cuda:3", "nccl")
    assert runs.layout(env, cuda=False)["device"].type == "cpu" and runs.layout(env, cuda=False)["backend"] == "gloo"


def test_a_run_folder_is_held_by_one_process(tmp_path):
    """open_run holds its run folder for its process (a flock on out/.lock): the holder reopens it
    (a resume in-process), a second process on the same --out is refused - with or without
    --fresh - in one line naming --out, the folder byte for byte intact; the lock ends with its
    process, a crash included, so the next process reopens the folder."""
    out = tmp_path / "run"
    assert runs.open_run(out, {"x": 1}, False, "distill") is False           # created; held by this process
    assert runs.open_run(out, {"x": 1}, False, "distill") is True            # the holder reopens it
    before = _tree(out)
    code = ("import sys, runs\n"
            "try:\n"
            "    print('existed', runs.open_run(sys.argv[1], {'x': 1}, sys.argv[2] == 'fresh', 'distill'))\n"
            "except runs.CheckpointError as e:\n"
            "    sys.exit(print(f'error: {e}', file=sys.stderr) or 2)\n")
    for fresh in ("resume", "fresh"):
        r = _cli("-c", code, out, fresh)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "another process" in lines[0] and "--out" in lines[0], \
            (fresh, r.returncode, r.stderr[-2000:])
    assert _tree(out) == before
    other = tmp_path / "other"
    crash = "import os, sys, runs; runs.open_run(sys.argv[1], {'x': 1}, False, 'distill'); os._exit(9)"
    assert _cli("-c", crash, other).returncode == 9                          # held, then the process dies
    r = _cli("-c", code, other, "resume")
    assert r.returncode == 0 and "existed True" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("typ,rule,good,bad", [
    (int, ">= 1", {"1": 1, "7": 7}, ["0", "-2", "x", "1.5"]),
    (float, "> 0", {"1e-9": 1e-9, "2": 2.0}, ["0", "-1", "nan", "inf", "x"]),
    (float, ">= 0", {"0": 0.0, "0.7": 0.7}, ["-0.1", "-inf"]),
    (str, "in closed|ppo|reinforce", {"ppo": "ppo", "closed": "closed"}, ["dpo", "ppo|reinforce", ""]),
    (float, "", {"-3": -3.0, "1e30": 1e30}, ["x"]),
])
def test_checked_rules(typ, rule, good, bad):
    """runs.checked(type, rule): the argparse type of every config field - ">= X", "> X" (finite
    numbers only) or "in a|b|c"; a bad value is an ArgumentTypeError naming it (argparse then
    prints one line and exits 2, through runs.Parser)."""
    parse = runs.checked(typ, rule)
    assert parse.__name__ == typ.__name__
    for v, want in good.items():
        got = parse(v)
        assert got == want and type(got) is typ, (rule, v, got)
    for v in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(v).replace("|", r"\|")):
            parse(v)
