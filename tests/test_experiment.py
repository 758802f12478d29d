"""benchmarks.experiment drives the chain through the stage functions the CLI runs, from options objects:
each arm's options are valid and round-trip, the cache keys name the directories earlier sessions made,
and a job runs analyze / prune / finetune in process, skipping what is done and resuming a killed
fine-tune. The stages are spied on, never run (they are tested with their own modules)."""

from pathlib import Path

import pytest
from stepadapt.benchmarks import experiment
from stepadapt.benchmarks.experiment import ARMS, OPTIONS, Run, arm_stages, logged_options, parse_args

import stepadapt.analyze
import stepadapt.compress
import stepadapt.finetune
from stepadapt.analyze import AnalyzeOptions
from stepadapt.compress import PruneOptions
from stepadapt.finetune import FinetuneOptions

BY_NAME = {a.name: a for a in ARMS}
OUT = Path("runs/experiment2")


def test_cache_keys_name_the_directories_earlier_sessions_made():
    """runs/experiment*/plan-KEY.json and pruned/KEY-sSEED outlive a session: the keys of the arms that
    exist are the ones the experiment made when it still ran the CLI."""
    keys = {a.name: (a.plan_key, a.pruned_key) for a in ARMS}
    assert keys == {
        "uniform-0.5": ("0.5-gaussian-off", "u-0.5-gaussian-off"),
        "default-0.5": ("0.5-gaussian-auto", "e-0.5-gaussian-auto"),
        "nogauss-0.5": ("0.5-gaussian-off", "e-0.5-gaussian-off"),
        "uniform-gauss-0.5": ("0.5-groups-2-gaussian-auto", "e-0.5-groups-2-gaussian-auto"),
        "shared-0.5": ("0.5-gaussian-off", "e-nested-0.5-gaussian-off"),
        "snr-old-0.5": ("0.5-gaussian-off", "e-0.5-gaussian-off"),
        "nested-0.5": ("0.5-gaussian-auto", "e-nested-0.5-gaussian-auto"),
        "relative-0.5": ("0.5-gaussian-auto", "e-0.5-gaussian-auto"),
        "visited-0.5": ("0.5-gaussian-auto", "e-0.5-gaussian-auto"),
        "damage-0.5": ("0.5-gaussian-auto-measure-damage", "e-0.5-gaussian-auto-measure-damage"),
        "uniform-0.8": ("0.8-gaussian-off", "u-0.8-gaussian-off"),
        "default-0.8": ("0.8-gaussian-auto", "e-0.8-gaussian-auto"),
    }


@pytest.mark.parametrize("arm", ARMS, ids=lambda a: a.name)
def test_every_arm_builds_valid_options_that_round_trip(arm):
    for seed in arm.seeds:
        stages = arm_stages(arm, OUT, seed, 2400, 64, 1)
        assert [s.name for s in stages] == ["analyze", "prune", "finetune"]
        for stage, own in zip(stages, (arm.analyze, arm.prune, arm.finetune), strict=True):
            options = stage.options
            assert type(options) is OPTIONS[stage.name]
            assert type(options).from_json(options.to_json()) == options
            assert all(getattr(options, k) == v for k, v in own.items())  # the arm's own options win
        analyze, prune, finetune = (s.options for s in stages)
        assert prune.plan == analyze.out and prune.seed == seed
        assert finetune.bundle == OUT / "arms" / f"{arm.name}-s{seed}" and not finetune.resume
        assert (finetune.iterations, finetune.batch_size, finetune.threads) == (2400, 64, 1)
    assert BY_NAME["uniform-gauss-0.5"].plan_key != BY_NAME["default-0.5"].plan_key


def test_arm_overrides_reach_the_options_the_stages_get():
    groups = arm_stages(BY_NAME["uniform-gauss-0.5"], OUT, 0, 10, 2, 1)[0].options
    assert (groups.groups, groups.gaussian) == (2, "auto")  # the arm's groups beat the shared 4
    shared = [s.options for s in arm_stages(BY_NAME["shared-0.5"], OUT, 0, 10, 2, 1)]
    assert shared[0].gaussian == "off" and shared[1].nested and shared[2].mode == "shared"
    visited = arm_stages(BY_NAME["visited-0.5"], OUT, 0, 10, 2, 1)[2].options
    assert (visited.timestep_sampler, visited.visit_steps) == ("visited", 50)


def test_stage_commands_read_as_the_committed_log():
    """The logged command lines keep their form: --ship finds an arm's fine-tuning by its text, and a
    finished stage's seconds are looked up by it."""
    analyze = arm_stages(BY_NAME["uniform-gauss-0.5"], OUT, 0, 2400, 64, 1)[0]
    assert analyze.command == (
        "stepadapt analyze --out runs/experiment2/plan-0.5-groups-2-gaussian-auto.json --groups 4 "
        "--budget 0.5 --groups 2 --gaussian auto"
    )
    _, prune, finetune = arm_stages(BY_NAME["uniform-0.5"], OUT, 1, 2400, 64, 1)
    assert prune.command == (
        "stepadapt prune --plan runs/experiment2/plan-0.5-gaussian-off.json "
        "--out runs/experiment2/pruned/u-0.5-gaussian-off-s1 --seed 1 --uniform"
    )
    assert finetune.command == (
        "stepadapt finetune runs/experiment2/arms/uniform-0.5-s1 --iterations 2400 --batch-size 64 "
        "--seed 1 --threads 1"
    )


def test_the_stages_are_the_library_functions():
    assert experiment.analyze is stepadapt.analyze.analyze
    assert experiment.prune is stepadapt.compress.prune
    assert experiment.finetune is stepadapt.finetune.finetune


@pytest.fixture
def spied(monkeypatch):
    """The three stages replaced by spies that leave what each stage's done marker looks for."""
    calls: list[tuple[str, object, dict]] = []

    def analyze(options, log=None):
        calls.append(("analyze", options, {}))
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text("{}")

    def prune(options, log=None, command=None):
        calls.append(("prune", options, {"command": command}))
        options.out.mkdir(parents=True)
        (options.out / "manifest.json").write_text("{}")

    def finetune(options, log=None):
        calls.append(("finetune", options, {}))

    for name, fn in (("analyze", analyze), ("prune", prune), ("finetune", finetune)):
        monkeypatch.setattr(experiment, name, fn)
    return calls


def test_a_job_runs_each_stage_once_in_process_and_resumes_a_killed_fine_tune(tmp_path, spied):
    args = ["--out", str(tmp_path / "run"), "--results", str(tmp_path / "results" / "experiment.json"),
            "--iterations", "10", "--batch-size", "2", "--threads", "1"]  # fmt: skip
    run = Run(parse_args(args))
    arm = BY_NAME["default-0.5"]
    path, _ = run.train(arm, 0)
    assert [(name, type(o)) for name, o, _ in spied] == [
        ("analyze", AnalyzeOptions),
        ("prune", PruneOptions),
        ("finetune", FinetuneOptions),
    ]
    expected = arm_stages(arm, run.out, 0, 10, 2, 1)
    assert [o for _, o, _ in spied] == [s.options for s in expected]
    assert spied[1][2]["command"] == expected[1].command  # the bundle's provenance says how it was made
    assert path == run.out / "arms" / "default-0.5-s0" and (path / "finetune.done").is_file()
    assert (path / "manifest.json").is_file()  # fine-tuning works on a copy of the pruned bundle
    logged = experiment.read_json(run.log_path)
    assert [e["command"] for e in logged] == [s.command for s in expected]
    assert [logged_options(e) for e in logged] == [s.options for s in expected]

    spied.clear()
    run.train(arm, 0)
    assert spied == []  # every stage's output is there

    (path / "finetune.done").unlink()
    checkpoint = path / "finetune" / "g1" / experiment.CHECKPOINT_NAME
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    run.train(arm, 0)
    assert [(name, o.resume) for name, o, _ in spied] == [("finetune", True)]
    assert checkpoint.is_file()  # the killed run's arm is not copied afresh from the pruned bundle
    assert experiment.read_json(run.log_path)[-1]["command"].endswith("--threads 1 --resume")


def test_logged_options_refuses_entries_from_before_options_were_logged():
    with pytest.raises(ValueError, match="before stages recorded"):
        logged_options({"command": "stepadapt finetune x --iterations 1", "seconds": 1.0})
