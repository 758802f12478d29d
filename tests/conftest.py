import pytest
import torch

from stepadapt.models import build_unet


@pytest.fixture(autouse=True)
def _threads():
    # CI has 2 cores; keep tests from oversubscribing them.
    torch.set_num_threads(2)


def _squares(n: int = 32, seed: int = 0) -> torch.Tensor:
    """Simple structured images in [-1, 1]: a bright 12x12 square at a random place."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 32, 32)
    for i in range(n):
        r, c = torch.randint(0, 20, (2,), generator=g).tolist()
        x[i, :, r : r + 12, c : c + 12] = 1.0
    return x


@pytest.fixture
def squares():
    return _squares


@pytest.fixture
def tiny():
    return build_unet("tiny", seed=0).eval()


# A user's own scheduler config: every key differs from DDPMScheduler's default and changes the images.
OWN_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                     variance_type="fixed_large", timestep_spacing="trailing", clip_sample=False)  # fmt: skip


@pytest.fixture
def own_model(tmp_path):
    """A random UNet2DModel dir as diffusers writes it: the model, and its scheduler's own config."""
    from diffusers import DDPMScheduler

    d = tmp_path / "own"
    build_unet("tiny", seed=1).save_pretrained(d, safe_serialization=True)
    DDPMScheduler(**OWN_SCHEDULER).save_config(d)
    return d


def make_bundle(base, out, nested: bool = True, gaussian: bool = False):
    """3 experts (the first unpruned) at a 0.6 budget, pruned from ``base`` with Taylor/global;
    ``gaussian``: a 4th, closed-form expert (fitted to squares) on [700, 1000), budget 0.45."""
    from stepadapt.compress import compress
    from stepadapt.difficulty import normalise, snr_profile
    from stepadapt.gaussian import fit_gaussian
    from stepadapt.importance import Candidate, Memory
    from stepadapt.plan import make_plan
    from stepadapt.prune import count_macs
    from stepadapt.schedule import DEFAULT_SCHEDULER

    s = snr_profile(DEFAULT_SCHEDULER)
    fitted = fit_gaussian(_squares(1024, seed=5), DEFAULT_SCHEDULER) if gaussian else None
    plan = make_plan(
        normalise(s), s, count_macs(base)[0], groups=4 if gaussian else 3, budget=0.45 if gaussian else 0.6,
        scheduler_cfg=DEFAULT_SCHEDULER, gaussian_from=700 if gaussian else None,
        gaussian_macs=fitted.macs if gaussian else 0,
    )  # fmt: skip
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mem = Memory(out.with_name("memory.json"))
    compress(base, DEFAULT_SCHEDULER, plan, x, x, out, candidates=(Candidate("taylor", True),), memory=mem,
             nested=nested, gaussian=fitted)  # fmt: skip
    return out


@pytest.fixture
def bundle_maker():
    return make_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """3 U-Net experts pruned from a random tiny base and a Gaussian one (built once per test run)."""
    torch.set_num_threads(2)
    return make_bundle(build_unet("tiny", seed=0), tmp_path_factory.mktemp("b") / "bundle", gaussian=True)


def exported_copy(tiny_bundle, tmp_path_factory, name: str):
    """A copy of the tiny bundle named ``name`` (a served bundle's default budget), exported to ONNX."""
    import shutil

    from stepadapt.export.onnx import export_bundle

    from stepadapt.bundle import Bundle

    d = tmp_path_factory.mktemp("exported") / name
    shutil.copytree(tiny_bundle, d)
    b = Bundle.load(d)
    export_bundle(b, batches=(2,))
    return b


def pytest_collection_modifyitems(items):
    """Every test on a served endpoint starts (or shares) a real tritonserver: slow, whichever of
    them runs first pays for the start."""
    for item in items:
        if any(f.startswith("served") for f in getattr(item, "fixturenames", ())):  # served, served_cond
            item.add_marker(pytest.mark.slow)
