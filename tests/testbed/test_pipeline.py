"""The testbed end to end at tiny sizes (``smar demo --smoke``), and its configuration."""

import json

import pytest
import torch

from smar import cli
from smar.testbed.config import RunConfig, TuneConfig, config_from_dict, smoke_config
from smar.testbed.jobs import _NOT_IN_RUN, _job_record, jobs_for
from smar.testbed.model import TinyModel
from smar.testbed.overrides import to_dict
from smar.testbed.stages import (
    final_stage,
    stage_dir,
    stage_metrics,
    stage_names,
    stage_scores,
)
from smar.testbed.tune import Job
from smar.testbed.validate import validate_config


def test_smoke_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--smoke", "--quiet", "--out", "out"]) == 0
    printed = capsys.readouterr().out  # the verdict, paired differences included
    assert "SMAR testbed, seeds [0]" in printed and "Δ vs none" in printed
    assert "\nsmar " in printed and "image-driven share of the forgetting" in printed
    assert "stop-control share of the forgetting" in printed
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert "## Calibration" in report and "`smar`" in report and "`hard_sample`" in report
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {j.name for j in jobs_for(smoke_config())}
    # the image-gradient-stop control beside the no-image one: its share in the report and in
    # results.json; its experts trained apart from `none`'s, its projector still learned
    assert {"control_noimage_seed0", "control_stop_seed0"} <= set(runs)
    assert "| `control_stop` |" in report and "| stop-control share |" in report
    assert set(results["shares"]) == {"image_share", "stop_share"}
    share = results["shares"]["stop_share"]
    assert share["control"] == "control_stop" and len(share["by_seed"]) <= 1
    stop, none = (TinyModel.load(out / n) for n in ("control_stop_seed0", "none_seed0"))
    base = TinyModel.load(stage_dir(smoke_config(), "instruct"))
    assert not torch.equal(stop.layers[0].ffn.down_proj, none.layers[0].ffn.down_proj)
    moved = zip(stop.projector.parameters(), base.projector.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in moved)
    for name, r in runs.items():
        assert (out / name / "model.safetensors").exists()
        run_cfg = json.loads((out / name / "run_config.json").read_text())
        assert run_cfg["job"]["name"] == name and run_cfg["run"]["tune"]["steps"] > 0
        assert {"text/prose", "text/facts", "mm/digit"} <= set(r["scores"])
    assert (out / "mrd.png").exists() and (out / "retention_vs_accuracy.png").exists()
    assert results["base"]["unigram_bpb"] > 0
    # stage 0's held-out probe per multimodal benchmark and each stage's build time, reported
    probe = results["base"]["vision"]["probe_eval"]
    assert set(probe) == {"digit", "shape", "colour", "count", "position"}
    assert f"digit {probe['digit']:.3f}" in report and "## Vision encoder (stage 0)" in report
    built = results["timings"]["stage_build_s"]
    assert set(built) == {"vision", "pretrain", "align", "instruct"}
    assert all(v > 0 for v in built.values()) and "Stage build times" in report
    # a second run reuses every cached stage and every finished run, also when it adds an arm;
    # a changed stage-3 option makes the run again
    before = (out / "smar_seed0" / "results.json").stat().st_mtime
    assert cli.main(["demo", "--smoke", "--quiet", "--out", "out", "arms=smar,lb"]) == 0
    assert (out / "smar_seed0" / "results.json").stat().st_mtime == before
    assert set(json.loads((out / "results.json").read_text())["runs"]) >= {"smar_seed0", "lb_seed0"}
    assert (
        cli.main(["demo", "--smoke", "--quiet", "--out", "out", "arms=smar", "tune.steps=3"]) == 0
    )
    assert (out / "smar_seed0" / "results.json").stat().st_mtime > before


def test_jobs_cover_arms_seeds_and_controls():
    # the demo: none and smar on three seeds, each paired with a no-image and a stop control
    assert [j.name for j in jobs_for(RunConfig())] == [
        "none_seed0", "none_seed1", "none_seed2", "smar_seed0", "smar_seed1", "smar_seed2",
        "control_noimage_seed0", "control_stop_seed0", "control_noimage_seed1",
        "control_stop_seed1", "control_noimage_seed2", "control_stop_seed2",
    ]  # fmt: skip
    cfg = RunConfig(arms=["none", "smar"], seeds=[0, 1], text_ratios=[0.025, 0.1], control_seeds=1)
    names = [j.name for j in jobs_for(cfg)]
    assert "smar_text0.1_seed1" in names and "control_text_seed0" in names
    # the no-image and stop controls on every seed, the text-ratio controls on the first
    # (control_seeds=1)
    assert len(names) == 2 * 2 * 2 + 2 * 2 + 2
    stops = [j for j in jobs_for(cfg) if j.stop_image_gradients]
    assert [(j.name, j.arm) for j in stops] == [
        ("control_stop_seed0", "none"),
        ("control_stop_seed1", "none"),
    ]
    cfg.stop_control = False
    assert not any(j.stop_image_gradients for j in jobs_for(cfg))
    assert "control_noimage_seed1" in names and "control_text_seed1" not in names
    with pytest.raises(ValueError, match="unknown arm"):
        jobs_for(RunConfig(arms=["nonsense"]))
    # a band changes only the arms whose loss has one: the others run once per seed
    bands = RunConfig(arms=["none", "smar", "align"], seeds=[0], bands=[(1, 1.5), (3, 4)])
    bands.controls = False
    assert [j.name for j in jobs_for(bands)] == [
        "none_seed0", "smar_band1-1.5_seed0", "smar_band3-4_seed0", "align_seed0"
    ]  # fmt: skip
    assert Job("x", "none").drop_images is False
    # a job field added later stays out of a run's record at its default: older runs are reused
    for added in ("shuffle_images", "stop_image_gradients"):
        assert added not in _job_record(Job("x", "none"))
        assert _job_record(Job("x", "none", **{added: True}))[added] is True
    assert "stop_control" in _NOT_IN_RUN  # which runs a config asks for: not what a run depends on
    # the shuffled-image control, on request, beside the no-image one on every seed
    shuffled = RunConfig(arms=["none"], seeds=[0, 1], shuffled_control=True)
    assert [j.name for j in jobs_for(shuffled) if j.shuffle_images] == [
        "control_shuffled_seed0", "control_shuffled_seed1"
    ]  # fmt: skip


def test_validation_gives_the_jobs(tmp_path, monkeypatch):
    """The pipeline computes its stage-3 runs once: validation returns them."""
    monkeypatch.setenv("SMAR_CACHE", str(tmp_path / "cache"))
    cfg = smoke_config()
    cfg.out = str(tmp_path / "out")
    assert validate_config(cfg) == jobs_for(cfg)


def test_the_stage_cache_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("SMAR_CACHE", str(tmp_path / "cache"))
    cfg = smoke_config()
    assert stage_names(cfg) == ("vision", "pretrain", "align", "instruct")
    assert final_stage(cfg) == "instruct"
    assert stage_metrics(cfg, "vision") == {}  # not built: nothing recorded
    folder = stage_dir(cfg, "align")
    assert folder.parent == tmp_path / "cache" / "stages" and folder.name.startswith("align-")
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text('{"seconds": 2.0}')
    assert stage_metrics(cfg, "align") == {"seconds": 2.0}
    # scores are built once, beside the stage's model, then read back
    assert stage_scores(cfg, "align", lambda: {"score": 1}) == {"score": 1}
    assert json.loads((folder / "scores.json").read_text()) == {"score": 1}
    assert stage_scores(cfg, "align", lambda: pytest.fail("built twice")) == {"score": 1}
    cfg.instruct.steps = 0  # no stage II: stage 3 starts from stage 2
    assert stage_names(cfg) == ("vision", "pretrain", "align") and final_stage(cfg) == "align"


def test_config_round_trips_through_json():
    cfg = smoke_config()
    again = config_from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert to_dict(again) == to_dict(cfg)


def test_smoke_demo_native_base(tmp_path, monkeypatch):
    """The natively-MoE base: stage 1 pretrains a MoE LM, stage 3 tunes it without upcycling."""
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--smoke", "--quiet", "--out", "out", "tune.base=native", "arms=none,smar,hard"]
    assert cli.main(args + ["control_seeds=0", "stop_control=false"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # the no-image control alone: the report says which calibration controls did not run
    runs = {"none_seed0", "smar_seed0", "hard_seed0", "control_noimage_seed0"}
    assert set(results["runs"]) == runs
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Not run here: `control_text` and `control_none50`" in report
    assert report.count("Base `native` (VITA on Mixtral") == 1  # the report names its base
    cfg = smoke_config()
    cfg.tune.base = "native"
    model = TinyModel.load(stage_dir(cfg, "pretrain"))  # stage 1 is already a MoE LM
    assert model.cfg.moe_layers == list(range(cfg.model.n_layers))
    experts = model.layers[0].ffn.gate_up_proj
    assert not torch.equal(experts[0], experts[1])  # experts differ from the start
    assert stage_dir(cfg, "align") != stage_dir(smoke_config(), "align")
    for name in ("smar_seed0", "hard_seed0"):
        tuned = TinyModel.load(tmp_path / "out" / name)
        router = tuned.layers[0].ffn.router
        assert (router.bias is not None) == (name == "smar_seed0")
        assert router.hard == (name == "hard_seed0")
    mrd = results["runs"]["hard_seed0"]["routing"]["routing/layer00/mrd"]
    assert mrd > 10  # hard routing: the modalities use disjoint experts


def test_tune_base_is_validated():
    with pytest.raises(ValueError, match="tune.base"):
        TuneConfig(base="dense")
