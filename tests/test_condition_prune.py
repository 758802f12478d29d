"""Pruning conditional U-Nets: a text-conditional UNet2DConditionModel (cross-attention in every
block) and a class-conditional UNet2DModel. Heads stay whole with equal head dims across q, k, v
and out, the condition's widths (text embedding, number of classes) are never pruned, and the
pruned model runs under PyTorch 2's attention processor, exports to ONNX and replays."""

import json

import pytest
import torch
import torch_pruning as tp
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from stepadapt import StepadaptError
from stepadapt.difficulty import normalise, snr_profile
from stepadapt.models import build_unet, clean_config
from stepadapt.plan import make_plan
from stepadapt.prune import count_macs, example_inputs, prune_once, prune_to_macs, replay, unet_class
from stepadapt.schedule import DEFAULT_SCHEDULER
from stepadapt.shared import slice_map

TEXT_DIM = 24
CONFIG = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=4,  # UNet2DConditionModel reads it as the number of heads
    norm_num_groups=8,
)


@pytest.fixture(scope="module")
def text_unet(tmp_path_factory) -> UNet2DConditionModel:
    """A random cross-attention U-Net, built from the config.json it writes as diffusers does."""
    d = tmp_path_factory.mktemp("text-unet")
    (d / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **CONFIG}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d)).eval()


def _text(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 7, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def check_attention(base: torch.nn.Module, model: torch.nn.Module) -> tuple[int, int]:
    """Every Attention of ``model`` keeps its heads, one head dim across q, k, v and out, the text
    width on its key/value inputs and diffusers' attributes in step; (cross-attentions, narrowed)."""
    cross = narrowed = 0
    for name, a in model.named_modules():
        if not isinstance(a, Attention):
            continue
        b = base.get_submodule(name)
        head_dim, rest = divmod(a.to_q.out_features, a.heads)
        assert rest == 0 and head_dim > 0 and a.heads == b.heads, name
        width = a.heads * head_dim
        assert a.to_q.out_features == a.to_k.out_features == a.to_v.out_features == width, name
        assert a.to_out[0].in_features == width, name
        assert (a.inner_dim, a.inner_kv_dim, a.query_dim) == (width, width, a.to_q.in_features), name
        assert a.out_dim == a.to_out[0].out_features and a.scale == pytest.approx(head_dim**-0.5), name
        if a.is_cross_attention:
            cross += 1
            assert a.to_k.in_features == a.to_v.in_features == a.cross_attention_dim == TEXT_DIM, name
        else:
            assert a.to_k.in_features == a.to_v.in_features == a.cross_attention_dim == a.query_dim, name
        narrowed += width < b.to_q.out_features
    return cross, narrowed


def _rows(kept: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.arange(n) if kept is None else kept


def check_pairs(base: torch.nn.Module, history: list) -> None:
    """The kept indices pair up: q and k keep the same dims (their dot product sums over them), v
    the dims out reads, every head the same offsets; a GEGLU keeps unit i in both halves."""
    kept = slice_map(base, history)
    for name, a in base.named_modules():
        if isinstance(a, Attention):
            q, k, v = (_rows(kept[f"{name}.{p}.weight"][0], a.inner_dim) for p in ("to_q", "to_k", "to_v"))
            assert torch.equal(q, k), name
            assert torch.equal(v, _rows(kept[f"{name}.to_out.0.weight"][1], a.inner_dim)), name
            per_head = q.view(a.heads, -1)
            hd = a.inner_dim // a.heads
            assert torch.equal(per_head // hd, torch.arange(a.heads)[:, None].expand_as(per_head)), name
            assert (per_head % hd == per_head[0] % hd).all(), name
            if a.is_cross_attention:  # the text embedding's width: no column of k or v goes
                assert kept[f"{name}.to_k.weight"][1] is None and kept[f"{name}.to_v.weight"][1] is None
        elif isinstance(a, GEGLU):
            inner = a.proj.out_features // 2
            rows = _rows(kept[f"{name}.proj.weight"][0], 2 * inner)
            hidden, gate = rows[: len(rows) // 2], rows[len(rows) // 2 :]
            assert torch.equal(gate, hidden + inner), name
            out = name.rsplit(".", 2)[0] + ".net.2.weight"  # FeedForward: net = [GEGLU, Dropout, Linear]
            assert torch.equal(hidden, _rows(kept[out][1], inner)), name


def test_a_clean_config_rebuilds_its_own_class():
    text = UNet2DConditionModel(**CONFIG)
    assert unet_class(clean_config(text)) is UNet2DConditionModel
    assert unet_class(dict(text.config)) is UNet2DConditionModel
    assert unet_class(clean_config(build_unet("tiny", classes=3))) is UNet2DModel
    with pytest.raises(StepadaptError, match="^base config is a UNet3DConditionModel, not one of"):
        unet_class({"_class_name": "UNet3DConditionModel"})


def test_example_inputs_trace_and_count_the_text(text_unet):
    inputs = example_inputs(text_unet)
    assert inputs["encoder_hidden_states"].shape == (1, 7, TEXT_DIM)
    macs, _ = count_macs(text_unet)
    longer = {**inputs, "encoder_hidden_states": torch.randn(1, 14, TEXT_DIM)}
    assert count_macs(text_unet, longer)[0] > macs  # the key/value projections of the text count


def test_pruning_keeps_heads_paired_and_the_text_width(text_unet):
    model, history = prune_once(text_unet, 0.4, tp.importance.MagnitudeImportance(), global_pruning=True)
    cross, narrowed = check_attention(text_unet, model)
    assert cross >= 2 and narrowed >= 2
    check_pairs(text_unet, history)
    assert any(isinstance(m, GEGLU) for m in model.modules())
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), _text(2)
    with torch.no_grad():
        model.set_attn_processor(AttnProcessor())  # scales by attn.scale, which pruning must follow
        classic = model(x, t, encoder_hidden_states=text).sample
        model.set_attn_processor(AttnProcessor2_0())  # takes the head dim from the key's width
        sdpa = model(x, t, encoder_hidden_states=text).sample
    assert sdpa.shape == (2, 3, 16, 16) and torch.isfinite(sdpa).all()
    torch.testing.assert_close(sdpa, classic, atol=1e-5, rtol=1e-5)


def test_a_geglu_feed_forward_loses_the_ratio_of_its_hidden_units(text_unet):
    """Its projection is [hidden | gate]: ranked as 2 x inner outputs, the chunk coupling would take
    the ratio from each half and then pair them, losing nearly twice the ratio."""
    model, _ = prune_once(text_unet, 0.3, tp.importance.MagnitudeImportance())
    ffs = [(n, m) for n, m in model.named_modules() if isinstance(m, GEGLU)]
    assert len(ffs) >= 2
    for name, m in ffs:
        inner = text_unet.get_submodule(name).proj.out_features // 2
        assert m.proj.out_features % 2 == 0 and abs(m.proj.out_features // 2 - 0.7 * inner) <= 1, name


@pytest.fixture(scope="module")
def planned(text_unet) -> dict[int, list]:
    """The text U-Net pruned for every group of a 0.5-budget plan of 2 and of 4 groups (magnitude,
    global): groups -> (group, PruneResult)."""
    s = snr_profile(DEFAULT_SCHEDULER)
    base_macs = count_macs(text_unet)[0]
    out = {}
    for groups in (2, 4):
        plan = make_plan(
            normalise(s), s, base_macs, groups=groups, budget=0.5, scheduler_cfg=DEFAULT_SCHEDULER
        )
        out[groups] = [
            (g, prune_to_macs(text_unet, g.macs_ratio * base_macs, tp.importance.MagnitudeImportance,
                              global_pruning=True, tol=0.05))
            for g in plan.groups
        ]  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize("groups", [2, 4])
def test_text_unet_prunes_to_the_plan_budget(text_unet, planned, groups):
    base_macs = count_macs(text_unet)[0]
    mean = 0.0
    for g, res in planned[groups]:
        assert abs(res.macs - g.macs_ratio * base_macs) <= 0.05 * g.macs_ratio * base_macs, g.name
        assert count_macs(res.model)[0] == res.macs
        mean += g.visit_share * res.macs
    assert abs(mean - 0.5 * base_macs) <= 0.05 * 0.5 * base_macs
    assert min(res.macs for _, res in planned[groups]) < 0.5 * base_macs  # some group is pruned hard


@pytest.mark.slow
@pytest.mark.parametrize("groups", [2, 4])
def test_planned_experts_keep_heads_run_export_and_replay(text_unet, planned, groups, tmp_path):
    from stepadapt.export.onnx import OnnxDenoiser, export_model, parity

    for g, res in planned[groups]:
        model = res.model
        cross, _ = check_attention(text_unet, model)
        assert cross >= 2
        model.set_attn_processor(AttnProcessor2_0())
        with torch.no_grad():
            y = model(
                torch.randn(3, 3, 16, 16), torch.tensor([g.lo] * 3), encoder_hidden_states=_text(3)
            ).sample
        assert y.shape == (3, 3, 16, 16) and torch.isfinite(y).all()
        rebuilt = replay(clean_config(text_unet), res.history)
        assert type(rebuilt) is UNet2DConditionModel
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }
        if not res.history:  # a group the plan gives (nearly) the whole base: nothing new to export
            continue
        path = export_model(model, tmp_path / f"{g.name}.onnx")
        onnx = OnnxDenoiser(path, threads=1, device="cpu")
        assert onnx.condition == ["encoder_hidden_states"]
        assert parity(model, onnx, g.lo, g.hi) <= 1e-4


@pytest.mark.slow
def test_class_conditional_unet_prunes_and_keeps_its_classes():
    base = build_unet("tiny", classes=10)
    base_macs = count_macs(base)[0]
    res = prune_to_macs(
        base, 0.5 * base_macs, tp.importance.MagnitudeImportance, global_pruning=True, tol=0.05
    )
    assert abs(res.macs - 0.5 * base_macs) <= 0.05 * 0.5 * base_macs
    emb = res.model.class_embedding
    assert emb.num_embeddings == base.class_embedding.num_embeddings == 11
    assert emb.embedding_dim == res.model.time_embedding.linear_2.out_features
    assert emb.embedding_dim < base.class_embedding.embedding_dim
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([100, 100])
    with torch.no_grad():
        a = res.model(x, t, class_labels=torch.tensor([0, 10])).sample
        b = res.model(x, t, class_labels=torch.tensor([3, 3])).sample
    assert a.shape == (2, 1, 32, 32) and not torch.allclose(a, b)  # the labels still steer it
    rebuilt = replay(clean_config(base), res.history)
    assert type(rebuilt) is UNet2DModel
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in res.model.state_dict().items()
    }
