"""UniNet (models/uninet.py): UniNet-G size per AGVM Table 4, strides / channels, windows on any input size,
the 18-subset window/global split, timm and mmdet registration, activation checkpointing."""
import pytest
import torch

from models.uninet import ARCHS, Attention, UniNet, count_params, window_partition, window_unpartition

TABLE4_WIDTHS = (104, 216, 384, 576, 576, 1152)
TABLE4_DEPTHS = (6, 9, 18, 18, 18, 36)
TABLE4_EXPANSIONS = (1, 4, 6, 3, 2, 5)
TABLE4_STRIDES = (2, 4, 8, 16, 16, 32)


def _analytic_params(widths, depths, exps, stem=32, kinds=("c", "c", "c", "c", "t", "t")) -> int:
    """Parameter count of the architecture written out by hand (independent of the module code)."""
    n = 3 * stem * 9 + 2 * stem  # stem conv (no bias) + BN
    cin = stem
    for i, (c, d, e, k) in enumerate(zip(widths, depths, exps, kinds)):
        if k == "c":
            if i > 0:  # local down-sampling: dw3x3(+b) BN 1x1(+b) | shortcut 1x1(+b)
                n += 9 * cin + cin + 2 * cin + cin * c + c + cin * c + c
                cin = c
            for j in range(d):
                a = cin if j == 0 else c
                mid = a * e  # Fused-MBConv: 3x3 a->mid, BN, 1x1 mid->c, BN
                n += 9 * a * mid + 2 * mid + mid * c + 2 * c
        else:  # local-global down-sampling: q path, q-LN, kv-LN, kv, proj, shortcut
            n += (9 * cin + cin + 2 * cin + cin * c + c) + 2 * c + 2 * cin + (cin * 2 * c + 2 * c) \
                + (c * c + c) + (cin * c + c)
            for _ in range(d):  # pos conv, LN, qkv, proj, LS, LN, MLP, LS
                h = int(c * e)
                n += (9 * c + c) + 2 * c + (3 * c * c + 3 * c) + (c * c + c) + c + 2 * c + (c * h + h + h * c + c) + c
        cin = c
    return n


def test_uninet_g_parameter_count_meta():
    """Table 4 as written (Fused-MBConv in stages 0-3): about 1.08B backbone parameters, no memory used."""
    with torch.device("meta"):
        m = UniNet("g", num_classes=0, with_head=False)
    n = count_params(m)
    print(f"UniNet-G backbone parameters: {n:,}")
    assert n == _analytic_params(TABLE4_WIDTHS, TABLE4_DEPTHS, TABLE4_EXPANSIONS)
    assert 0.95e9 < n < 1.15e9
    assert all(p.is_meta for p in m.parameters())
    # the last stage holds most of it (uninet-facts: about 674M)
    assert 0.6e9 < count_params(m.stages[5]) < 0.7e9


def test_uninet_g_table4_structure():
    with torch.device("meta"):
        m = UniNet("g", num_classes=21841)
    assert tuple(f["num_chs"] for f in m.feature_info) == TABLE4_WIDTHS
    assert tuple(f["reduction"] for f in m.feature_info) == TABLE4_STRIDES
    assert tuple(len(s.blocks) for s in m.stages) == TABLE4_DEPTHS
    assert [s.kind for s in m.stages] == ["conv"] * 4 + ["attn"] * 2
    from timm.models._efficientnet_blocks import EdgeResidual
    for s, e in zip(m.stages[:4], TABLE4_EXPANSIONS[:4]):
        blk = s.blocks[-1]
        assert isinstance(blk, EdgeResidual) and blk.conv_exp.kernel_size == (3, 3)
        assert blk.conv_exp.out_channels == blk.conv_exp.in_channels * e
    for s, e in zip(m.stages[4:], TABLE4_EXPANSIONS[4:]):
        blk = s.blocks[0]
        c = blk.norm1.normalized_shape[0]
        assert blk.attn.num_heads == c // 32 and blk.mlp.fc1.out_features == c * e
    assert type(m.stages[1].downsample).__name__ == "LocalDownsample"
    assert type(m.stages[4].downsample).__name__ == "LocalGlobalDownsample"
    assert type(m.stages[5].downsample).__name__ == "LocalGlobalDownsample"


def test_detection_split_18_subsets():
    with torch.device("meta"):
        m = UniNet("g", with_head=False, window_sizes=(28, 14), num_subsets=18)
    kinds = m.attention_kinds()
    assert kinds[0] == ["window", "window", "global"] * 6
    assert kinds[1] == ["window", "window", "global"] * 12
    assert sum(k.count("global") for k in kinds) == 18
    ws = [[b.window_size for b in s.blocks] for s in m.stages[4:]]
    assert set(ws[0]) == {28, None} and set(ws[1]) == {14, None}
    m.set_window_sizes((16, 8))  # e.g. another fine-tuning resolution; the split is kept
    assert m.attention_kinds() == kinds
    assert {b.window_size for b in m.stages[4].blocks} == {16, None}
    with torch.device("meta"):
        plain = UniNet("g", with_head=False)
    assert all(k == "global" for s in plain.attention_kinds() for k in s)
    with pytest.raises(ValueError, match="num_subsets"):
        UniNet("tiny", window_sizes=(4, 2), num_subsets=4)  # 6 blocks do not split into 4


def test_window_partition_roundtrip_and_padding_mask():
    x = torch.randn(2, 5, 7, 8)
    t, mask, padded = window_partition(x, 4)
    assert padded == (8, 8) and t.shape == (2 * 4, 16, 8) and mask.shape == (8, 1, 1, 16)
    assert int(mask.sum()) == 2 * 5 * 7
    assert torch.equal(window_unpartition(t, 4, padded, (5, 7)), x)
    # one window covering a padded 5x7 grid == global attention over the 35 real tokens
    torch.manual_seed(0)
    glob = Attention(32, 2, window_size=None).eval()
    win = Attention(32, 2, window_size=8).eval()
    win.load_state_dict(glob.state_dict())
    y = torch.randn(2, 5, 7, 32)
    torch.testing.assert_close(win(y), glob(y), rtol=1e-5, atol=1e-5)
    # windows are independent: changing one window's tokens leaves the others unchanged
    win4 = Attention(32, 2, window_size=4).eval()
    y2 = y.clone()
    y2[:, :4, :4] += 1.0
    a, b = win4(y), win4(y2)
    torch.testing.assert_close(a[:, 4:], b[:, 4:])
    torch.testing.assert_close(a[:, :, 4:], b[:, :, 4:])
    assert not torch.allclose(a[:, :4, :4], b[:, :4, :4])


def test_tiny_any_input_size_with_windows():
    m = UniNet("tiny", num_classes=0, with_head=False, window_sizes=(4, 2), num_subsets=2)
    x = torch.randn(1, 3, 75, 131, requires_grad=True)  # non-square, not a multiple of 32 or of the windows
    feats = m.forward_features_list(x)
    sizes = [(f.shape[2], f.shape[3]) for f in feats]
    h, w = 75, 131
    expect = []
    for s in (2, 2, 2, 2, 1, 2):  # conv/pool with k3 s2 p1: ceil
        h, w = -(-h // s), -(-w // s)
        expect.append((h, w))
    assert sizes == expect
    assert [f.shape[1] for f in feats] == list(ARCHS["tiny"].widths)
    assert float(m.stages[5].blocks[0].ls1.gamma.detach().max()) == pytest.approx(1e-6)  # LayerScale init
    sum(f.float().mean() for f in feats).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    a = UniNet("tiny", num_classes=5, window_sizes=(4, 2), num_subsets=2)
    b = UniNet("tiny", num_classes=5, window_sizes=(4, 2), num_subsets=2, grad_checkpointing=True)
    with torch.no_grad():  # move off the init (LayerScale 1e-6, zero BN gammas) so every grad is non-trivial
        for p in a.parameters():
            p.add_(0.2 * torch.randn_like(p))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 40)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    assert any(s.grad_checkpointing for s in b.stages) and not any(s.grad_checkpointing for s in a.stages)


def test_stochastic_depth_rule():
    m = UniNet("tiny", drop_path_rate=0.3)
    rates = [getattr(blk.drop_path, "drop_prob", 0.0) for s in m.stages for blk in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert all(x <= y for x, y in zip(rates, rates[1:]))
    m.eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(m(x), m(x))


def test_timm_create_model_features_only_and_local_pretrained(tmp_path):
    import timm

    m = timm.create_model("uninet_tiny", features_only=True, out_indices=(2, 4, 5), window_sizes=(4, 2),
                          num_subsets=2)
    assert m.feature_info.channels() == [32, 64, 96]
    assert m.feature_info.reduction() == [8, 16, 32]
    outs = m(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 8, 12), (1, 64, 4, 6), (1, 96, 2, 3)]
    src = timm.create_model("uninet_tiny", num_classes=7)
    f = tmp_path / "w.pth"
    torch.save(src.state_dict(), f)
    loaded = timm.create_model("uninet_tiny", features_only=True, out_indices=(2, 4, 5), pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(f)))
    torch.testing.assert_close(loaded.model.stages[4].blocks[1].attn.qkv.weight,
                               src.stages[4].blocks[1].attn.qkv.weight)
    with pytest.raises(ValueError, match="local file"):
        timm.create_model("uninet_g", pretrained=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        timm.create_model("uninet_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "x")))
    with torch.device("meta"):
        g = timm.create_model("uninet_g", features_only=True, out_indices=(2, 4, 5))
    assert g.feature_info.channels() == [384, 576, 1152] and g.feature_info.reduction() == [8, 16, 32]


@pytest.mark.mm
@pytest.mark.slow
def test_mmdet_registry_build_and_pretrained_init(tmp_path):
    pytest.importorskip("mmdet")
    import timm

    import models.mmdet_uninet  # noqa: F401
    from mmdet.registry import MODELS

    src = timm.create_model("uninet_tiny", num_classes=11)
    f = tmp_path / "uninet_tiny_pretrain.pth"
    torch.save(src.state_dict(), f)
    bb = MODELS.build(dict(type="UniNet", arch="tiny", out_indices=(2, 4, 5), window_sizes=(4, 2), num_subsets=2,
                           with_cp=True, drop_path_rate=0.1,
                           init_cfg=dict(type="Pretrained", checkpoint=str(f))))
    before = bb.stages[5].blocks[2].mlp.fc1.weight.clone()
    bb.init_weights()
    after = bb.stages[5].blocks[2].mlp.fc1.weight
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, src.stages[5].blocks[2].mlp.fc1.weight)
    assert not hasattr(bb, "classifier")
    outs = bb(torch.randn(1, 3, 70, 90))
    assert isinstance(outs, tuple) and [o.shape[1] for o in outs] == [32, 64, 96]
    assert [tuple(o.shape[2:]) for o in outs] == [(9, 12), (5, 6), (3, 3)]
    assert bb.attention_kinds() == [["window", "window", "global"]] * 2
    bb2 = MODELS.build(dict(type="UniNet", arch="tiny", window_sizes=None, num_subsets=None, frozen_stages=1,
                            norm_eval=True))
    bb2.train()
    assert not any(p.requires_grad for p in bb2.stages[1].parameters())
    assert all(p.requires_grad for p in bb2.stages[2].parameters())
    assert not any(m.training for m in bb2.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.slow
def test_benchmark_cpu_smoke_checkpointing_saves_activations():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_uninet.py"
    spec = importlib.util.spec_from_file_location("bench_uninet", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--device", "cpu", "--size", "64x96", "--batch", "2", "--iters", "1", "--warmup", "0",
                       "--no-htcx"])
    plain, ckpt = rows
    assert plain["model"] == "uninet_tiny" and not plain["checkpointing"] and ckpt["checkpointing"]
    assert plain["images_per_s"] > 0 and ckpt["images_per_s"] > 0
    assert ckpt["saved_activations_mib"] < 0.6 * plain["saved_activations_mib"]
    # model FLOPs (3 x forward) do not count checkpointing's recomputation
    assert plain["model_flops_per_iter"] == ckpt["model_flops_per_iter"] > 0
