"""The demo's stages, each run alone on a small random base (serving is covered by test_serving)."""

import numpy as np
from stepadapt.serving.demo import Demo

from stepadapt.bundle import Bundle
from stepadapt.importance import Candidate
from stepadapt.models import save_base


def test_demo_stages_prune_finetune_and_pick_the_bundle_to_serve(tmp_path, tiny):
    save_base(tiny, tmp_path / "base")
    logs = []
    demo = Demo(tmp_path / "out", base_dir=tmp_path / "base", groups=2, n=4, finetune_iterations=3,
                kid_images=0, shipped=tmp_path / "none", candidates=(Candidate("taylor", True),),
                proxy_size=16, gaussian=False, log=logs.append)  # fmt: skip
    # (a random base is worse than the Gaussian everywhere: the shipped base's demo has one, make demo)
    demo.base_samples()
    assert (tmp_path / "out" / "base_samples.png").is_file()
    plan = demo.analyze()
    assert abs(plan.mean_ratio() - 0.5) < 0.02 and (tmp_path / "out" / "plan.png").is_file()
    manifest = demo.prune()
    assert [e.name for e in manifest.experts] == [g.name for g in plan.groups]
    assert not any(e.parent for e in manifest.experts)  # each expert pruned from the base by default
    demo.finetune()
    b = Bundle.load(tmp_path / "out" / "bundle")
    assert all(e.training["mode"] == "separate" for e in b.experts if b.is_pruned(e.name))
    assert all(e.training["distilled"] for e in b.experts if b.is_pruned(e.name))
    served = demo.serve_copy()  # nothing shipped at tmp/none: the demo serves its own bundle
    assert served.path == tmp_path / "out" / "served"
    assert [e.sha256 for e in served.experts] == [e.sha256 for e in b.experts]
    assert demo.kid({}) == {}  # kid_images=0 skips the KID stage
    assert any("serving" in line for line in logs)


def test_the_shipped_bundle_is_what_the_demo_serves():
    from stepadapt.serving.demo import SHIPPED_BUNDLE

    b = Bundle.load(SHIPPED_BUNDLE)  # checksums verify
    assert abs(b.manifest.trajectory_macs_ratio() - 0.5) < 0.02
    assert all(e.training for e in b.experts if b.is_pruned(e.name))  # fine-tuned, not only pruned
    assert (SHIPPED_BUNDLE / "MODEL_CARD.md").is_file()
    unet = next(e.name for e in b.experts if e.kind == "unet")
    assert np.isfinite(b.load_expert(unet).conv_in.weight.detach().numpy()).all()
