"""Stage 1 (teachers.py): single-task RL teachers - a smoke run of every algorithm, --init from
another adapter (and its refusals), --task refusals, and the run config a resume compares. The
algorithms' pieces (GRPO-Guard ratio, group advantages, PPO clip, NFT loss) are in ../test_opd.py."""
import json
import math
import shutil

import pytest
import torch

import rewards as R
import runs
import sampler as S
import teachers as T
from conftest import _argv, _cfg, _log, _make_teacher, _refused


@pytest.mark.parametrize("algo,fraction", [("grpo-guard", 1.0), ("grpo-guard", 0.5), ("flow-grpo", 1.0), ("nft", 1.0)])
def test_teacher_smoke(tiny_base, tmp_path, algo, fraction):
    cfg = T.TeacherConfig(task="ocr", algo=algo, base=str(tiny_base), out=str(tmp_path / "run"), iters=2,
                          prompts=2, group=2, steps=3, eval_every=1, eval_small=2, eval_n=2, eval_heldout_n=2,
                          rank=4, alpha=8, train_fraction=fraction)
    ck = T.train(cfg)
    meta = runs.read_meta(ck)
    assert meta["role"] == "teacher" and meta["task"] == "ocr" and meta["trained"]["algorithm"] == algo
    assert meta["cfg"] == (1.0 if algo == "nft" else runs.read_meta(tiny_base)["cfg"])
    assert set(meta["scores"]) >= set(R.TASKS)
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(r["reward"]) for r in log)
    pol = S.Policy(str(ck))                                    # loads as a teacher of the contract
    assert pol.active == "ocr" and pol.guidance == meta["cfg"]


def test_geneval_run_reports_tags_colours_and_spread(tiny_base, tmp_path, capsys):
    """A GenEval run (NFT, --rl-reward objects, batch-wide advantages, grid times) logs at every
    evaluation the strict mean, per-tag accuracies, per-colour found-rates and the share of images in
    zero-spread groups; the checkpoint's opd.json carries the final ones with the base's, and a colour
    whose found-rate fell under half the base's is a printed warning."""
    ck = T.train(_cfg(tiny_base, tmp_path / "run", task="geneval", algo="nft", iters=2, eval_every=1, eval_small=8,
                      rl_reward="objects", adv_scale="batch", nft_t="grid"))
    log = _log(tmp_path / "run")
    evals = [r for r in log if "eval_geneval" in r]
    assert len(evals) == 2 and all(0 <= r["zero_spread"] <= 1 and set(r["geneval_tags"]) <= set(R.GENEVAL_TAGS)
                                   for r in evals), evals
    diag = runs.read_meta(ck)["geneval_diagnostics"]
    assert diag["n"] == 10 and set(diag["base"]) == {"strict", "tags", "colours"} and "eval_geneval" in diag
    assert {n for _, n in diag["geneval_tags"].values()} == {2}           # 8 asked, 2 per tag: GenEval's Overall
    assert abs(diag["eval_geneval"] - sum(a for a, _ in diag["geneval_tags"].values()) / 5) < 1e-12
    want = R.colour_warnings({"colours": diag["geneval_colours"]}, diag["base"])
    assert diag.get("warnings", []) == want and all(w in capsys.readouterr().err for w in want)
    assert T.run_config(T.TeacherConfig(base=str(tiny_base), rl_reward="objects"), ["geneval"])["rl_reward"] == "objects"


def test_prompt_mix_tags_draws_each_tag_equally():
    """--prompt-mix tags: a tag uniformly, then one of its prompts (GenEval's train prompts are 72%
    position prompts); uniform (the default) is the draw the shipped teachers trained with."""
    from collections import Counter
    import numpy as np
    task = R.TASKS["geneval"]
    got = Counter(map(R.geneval_tag, T.draw_prompts(task, 5000, "tags", np.random.default_rng(0))))
    assert set(got) == set(R.GENEVAL_TAGS) and all(abs(c - 1000) < 100 for c in got.values()), got   # sd ~28
    assert T.draw_prompts(task, 16, "uniform", np.random.default_rng(3)) == \
        [task.train[i] for i in np.random.default_rng(3).integers(len(task.train), size=16)]
    ocr = R.TASKS["ocr"]                                      # no tags: the uniform draw
    assert T.draw_prompts(ocr, 9, "tags", np.random.default_rng(4)) == T.draw_prompts(ocr, 9, "uniform", np.random.default_rng(4))


def test_prompt_mix_spread_moves_draws_to_tags_with_a_signal(tiny_base, tmp_path, monkeypatch):
    """--prompt-mix spread: a tag's weight is its share of groups with reward spread over the last
    SPREAD_WINDOW iterations (at least SPREAD_FLOOR, 1 before it is drawn); draws follow the weights;
    a run logs per tag its groups with spread and the weights it drew with; a run killed between two
    saves drops the log lines past its saved state (runs.resume_log), so each iteration is logged once,
    and weighs with the iterations before it."""
    from collections import Counter
    import numpy as np
    tags = list(R.GENEVAL_TAGS)
    old = [{"position": [0, 4]}] * 5                              # outside the window: forgotten
    recent = [{"single": [0, 2], "colors": [1, 2], "position": [2, 2]}] * T.SPREAD_WINDOW
    w = T.tag_weights(old + recent, tags)
    assert w == {"single": T.SPREAD_FLOOR, "colors": 0.5, "counting": 1.0, "two_object": 1.0, "position": 1.0}, w
    task = R.TASKS["geneval"]
    got = Counter(map(R.geneval_tag, T.draw_prompts(task, 6000, "spread", np.random.default_rng(0), w)))
    total = sum(w.values())
    for t in tags:                                                # binomial sd <= ~37 draws
        assert abs(got[t] - 6000 * w[t] / total) < 150, (t, got[t], 6000 * w[t] / total)
    run, step, calls = tmp_path / "run", T.nft_step, []

    def dies_in_iteration_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(*a, **k)
    cfg = _cfg(tiny_base, run, task="geneval", algo="nft", iters=4, eval_every=2, eval_small=8, prompt_mix="spread")
    monkeypatch.setattr(T, "nft_step", dies_in_iteration_4)
    with pytest.raises(KeyboardInterrupt):                        # state saved after 2 iterations, a 3rd logged
        T.train(cfg)
    assert [r["iter"] for r in _log(run)] == [0, 1, 2]
    monkeypatch.setattr(T, "nft_step", step)
    T.train(cfg)                                                  # resumes at iteration 2: runs 2 and 3 again
    log = _log(run)
    assert [r["iter"] for r in log] == [0, 1, 2, 3], "a resumed run's log holds each iteration once"
    for r in log:
        assert sum(m for _, m in r["spread_tags"].values()) == 2 and all(0 <= s <= m for s, m in r["spread_tags"].values())
        assert r["kept"] == sum(s for s, _ in r["spread_tags"].values()) / 2
    assert log[0]["tag_weights"] == dict.fromkeys(tags, 1.0)
    assert min(log[2]["tag_weights"].values()) < 1, log          # the history before the kill counts
    assert log[2]["tag_weights"] == {t: round(v, 3) for t, v in T.tag_weights([r["spread_tags"] for r in log[:2]], tags).items()}


def test_rl_reward_objects_is_the_toys(sd3_dir, tmp_path, capsys):
    msg = _refused(capsys, T.main, ["--task", "geneval", "--base", str(sd3_dir), "--rl-reward", "objects",
                                    "--out", str(tmp_path / "run")])
    assert "--rl-reward objects" in msg and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["other_base", "other_rank"])
def test_init_refusals_one_line_exit_2(case, tiny_base, tmp_path, capsys):
    """--init from an adapter of another base (resolved path + hash) or another LoRA shape: one
    line, exit 2, nothing written."""
    if case == "other_base":
        other = tmp_path / "other_base"
        shutil.copytree(tiny_base, other)
        ck = _make_teacher(other, tmp_path / "t", "ocr", 0, rank=4)
    else:
        ck = _make_teacher(tiny_base, tmp_path / "t", "ocr", 0, rank=2)
    out = tmp_path / "run"
    msg = _refused(capsys, T.main, _argv(tiny_base, out, "--task", "ocr", "--iters", "2", "--init", str(ck)))
    assert "--init" in msg and ("base" in msg if case == "other_base" else "rank" in msg), msg
    assert not out.exists()


def test_init_same_base_continues_a_teacher(tiny_base, tmp_path):
    """--init from a same-task teacher of the same base: still a teacher of that task, from its weights."""
    ck = _make_teacher(tiny_base, tmp_path / "t", "ocr", 0, rank=4)
    got = T.train(_cfg(tiny_base, tmp_path / "run", task="ocr", iters=1, init=str(ck)))
    meta = runs.read_meta(got)
    assert meta["task"] == "ocr" and "tasks" not in meta and meta["trained"]["config"]["init"]["path"] == str(ck)
    got2 = T.train(_cfg(tiny_base, tmp_path / "run2", task="geneval", iters=1, init=str(ck)))
    assert runs.read_meta(got2)["task"] == "cascade" and runs.read_meta(got2)["tasks"] == ["ocr", "geneval"]


def test_sample_cfg_changes_how_a_teacher_is_sampled_not_how_it_trains(tiny_base, tmp_path):
    """--sample-cfg 3 on a CFG-free NFT run: the same LoRA weights as without it (evaluations draw
    from their own generators), evaluated and recorded (opd.json cfg, hence Stage 2's queries) at
    CFG 3; the rollouts and their rewards are the same."""
    from safetensors.torch import load_file
    cks = []
    for name, over in (("free", {}), ("cfg3", {"sample_cfg": 3.0})):
        cks.append(T.train(_cfg(tiny_base, tmp_path / name, task="geneval", algo="nft", iters=2, eval_every=1,
                                eval_small=5, **over)))
    w0, w1 = (load_file(str(c / "adapter_model.safetensors")) for c in cks)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0), "training depended on --sample-cfg"
    m0, m1 = runs.read_meta(cks[0]), runs.read_meta(cks[1])
    assert (m0["cfg"], m1["cfg"]) == (1.0, 3.0) and m1["trained"]["config"]["rollout_cfg"] == 1.0, (m0, m1)
    assert m1["trained"]["config"]["sample_cfg"] == 3.0 and "sample_cfg" not in m0["trained"]["config"]
    assert S.Policy(str(cks[1])).guidance == 3.0
    assert [l["reward"] for l in _log(tmp_path / "free")] == [l["reward"] for l in _log(tmp_path / "cfg3")]


@pytest.mark.parametrize("task", ["nonsense", "geneval,bogus", "ocr,ocr", ""])
def test_bad_task_one_line_exit_2(task, tmp_path, capsys):
    msg = _refused(capsys, T.main, ["--task", task, "--out", str(tmp_path / "run")])
    assert "--task" in msg, msg
    assert not (tmp_path / "run").exists()


def test_single_task_run_config_unchanged(tiny_base):
    """A single-task run's config (what a resume compares) has no new keys at the new flags' defaults."""
    conf = T.run_config(T.TeacherConfig(base=str(tiny_base)), ["ocr"])
    assert not set(T.LATER_FLAGS) & set(conf) and conf["tasks"] == ["ocr"]
