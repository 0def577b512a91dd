"""The fused model's parts: the paper identities, masking, padding invariance, checkpoints."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avemo.batching import collate, trim_batch
from avemo.checkpoint import CheckpointError, save_checkpoint
from avemo.features import ClipFeatures
from avemo.model import (FUSIONS, MODEL_KIND, MODEL_VERSION, VIDEO_STREAMS, CompactSoftmaxCE, Ensemble,
                         FactorizedBilinearPooling, FCNAudioStream, ModelConfig, ScaledSoftmaxAttention,
                         build_model, build_video_stream, load_model, masked_softmax, save_model)

torch.set_num_threads(1)


def lengths_mask(lengths, t):
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


def test_fbp_equals_explicit_low_rank_bilinear_form():
    torch.manual_seed(0)
    m, n, k, o = 7, 5, 3, 4
    fbp = FactorizedBilinearPooling(m, n, k=k, o=o, dropout=0.0)
    a, v = torch.randn(6, m, dtype=torch.float64), torch.randn(6, n, dtype=torch.float64)
    fbp = fbp.double()
    z = fbp.bilinear(a, v)
    U, V = fbp.U.weight.T, fbp.V.weight.T                    # U~ [m, k*o], V~ [n, k*o]
    for i in range(o):
        W_i = U[:, i * k:(i + 1) * k] @ V[:, i * k:(i + 1) * k].T   # [m, n], rank <= k
        expected = torch.einsum("bm,mn,bn->b", a, W_i, v)          # z_i = a^T W_i v
        torch.testing.assert_close(z[:, i], expected)
    out = fbp.eval()(a, v)
    signed_sqrt = torch.sign(z) * torch.sqrt(z.abs() + 1e-8)
    torch.testing.assert_close(out, F.normalize(signed_sqrt, dim=-1))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(6, dtype=torch.float64))


def test_lambda_zero_gives_the_mean_of_valid_steps():
    torch.manual_seed(0)
    att = ScaledSoftmaxAttention(6, 5, lam=0.0)
    x = torch.randn(3, 9, 6)
    mask = lengths_mask([9, 4, 1], 9)
    pooled, alpha = att(x, mask)
    for b, n in enumerate([9, 4, 1]):
        torch.testing.assert_close(pooled[b], x[b, :n].mean(0))
        torch.testing.assert_close(alpha[b, :n], torch.full((n,), 1.0 / n))
    # lambda = 1 is genuinely attention (not the mean) once the scorer has weights
    peaked, _ = ScaledSoftmaxAttention(6, 5, lam=1.0)(x, mask)
    assert not torch.allclose(peaked[0], x[0].mean(0))
    with pytest.raises(ValueError, match="lambda"):
        ScaledSoftmaxAttention(6, 5, lam=1.5)


def test_masked_softmax_zero_weight_and_finite_gradient_on_empty_rows():
    scores = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[True, False, True, False, False], [False] * 5])
    w = masked_softmax(scores, mask)
    assert torch.equal(w[0, [1, 3, 4]], torch.zeros(3)) and torch.equal(w[1], torch.zeros(5))
    assert w[0].sum().item() == pytest.approx(1.0)
    (w * torch.randn(2, 5)).sum().backward()
    assert torch.isfinite(scores.grad).all()


# every video stream, and stt both over feature-map cells (its default) and over pooled frames (legacy)
STREAMS = [*VIDEO_STREAMS, "stt-frames"]
CELLS = 4                                   # _clip's feature maps are 2 x 2


def _video_cfg(stream, **kw):
    name, _, tokens = stream.partition("-")
    return ModelConfig(**{**dict(n_classes=3, modalities="video", video_dim=6, video_stream=name, video_hidden=8,
                                 stt_heads=2, dropout=0.0, stt_tokens=tokens or "cells", video_cells=CELLS), **kw})


@pytest.mark.parametrize("stream", STREAMS)
def test_video_stream_padding_invariance_and_zero_weight_on_masked_frames(stream):
    torch.manual_seed(0)
    cfg = _video_cfg(stream)
    net = build_video_stream(cfg).eval()
    cells = [CELLS] if cfg.uses_maps else []            # stt over cells reads [B, T, N, D]
    v = torch.randn(1, 5, *cells, 6)
    mask = torch.tensor([[True, False, True, True, False]])
    out, w = net(v, mask)
    assert w.shape == (1, 5, *cells)
    assert torch.equal(w[mask == False], torch.zeros(2, *cells))  # noqa: E712
    assert w[mask].sum().item() == pytest.approx(1.0, abs=1e-5)
    # pad with garbage frames: same vector, same weights on the real frames
    v_pad = torch.cat([v, 100 * torch.randn(1, 4, *cells, 6)], dim=1)
    m_pad = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], dim=1)
    out_pad, w_pad = net(v_pad, m_pad)
    torch.testing.assert_close(out_pad, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_pad[:, :5], w, atol=1e-6, rtol=1e-5)
    assert torch.equal(w_pad[:, 5:], torch.zeros(1, 4, *cells))
    # changing a masked frame changes nothing
    v2 = v.clone()
    v2[0, 1] = 50.0
    torch.testing.assert_close(net(v2, mask)[0], out)


def _where_in_the_face(n: int, seed: int, t: int = 4, side: int = 3, d: int = 6):
    """Clips whose class is WHERE a pattern sits in every frame's feature map: the top-left cell
    (class 0) or the bottom-right one (class 1). The pooled vector of a frame (the mean of its
    cells) has the same distribution in both classes, so frame tokens carry no label."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=g)
    maps = torch.randn(n, t, side * side, d, generator=g)
    cell = torch.where(label == 0, 0, side * side - 1)
    maps[torch.arange(n)[:, None], torch.arange(t)[None, :], cell[:, None]] += 3.0 * torch.eye(d)[0]
    batch = {"video": maps.mean(2), "video_maps": maps, "video_mask": torch.ones(n, t, dtype=torch.bool)}
    return batch, label


@pytest.mark.parametrize("tokens", ["cells", "frames"])
def test_stt_over_cells_learns_where_in_the_face_and_pooled_frame_tokens_cannot(tokens):
    torch.manual_seed(0)
    model = build_model(_video_cfg("stt", n_classes=2, stt_tokens=tokens, video_cells=9, video_hidden=16,
                                   stt_layers=1))
    train, y = _where_in_the_face(512, 0)
    test, y_test = _where_in_the_face(400, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        idx = torch.randint(0, len(y), (64,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model({k: v[idx] for k, v in train.items()})["logits"], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model.eval()(test)["logits"].argmax(1) == y_test).float().mean().item()
    if tokens == "cells":
        assert accuracy >= 0.9, accuracy
    else:
        assert accuracy <= 0.62, accuracy       # chance is 0.5 (400 clips: 3 sigma is 0.075)


def test_stt_cells_masked_and_padded_frames_change_no_output():
    torch.manual_seed(0)
    model = build_model(_video_cfg("stt", n_mels=16, modalities="av", audio_channels=(4, 8), fbp_o=8)).eval()
    clips = [_clip(0, 20, 5), _clip(1, 9, 3), _clip(2, 12, 4, video=False)]
    batch = collate(clips, 16, 6, CELLS)
    assert batch["video_maps"].shape == (3, 5, CELLS, 6)
    ref = model(batch)
    assert ref["video_cell_attention"].shape == (3, 5, CELLS)
    torch.testing.assert_close(ref["video_cell_attention"].sum(-1), ref["video_attention"])
    changed = {k: v.clone() for k, v in batch.items()}
    hidden = ~changed["video_mask"]                       # frames without a face, and padding
    changed["video_maps"][hidden] = 1e4 * torch.randn_like(changed["video_maps"][hidden])
    changed["video"][hidden] = -1e4
    out = model(changed)
    for key in ("logits", "video_attention", "video_cell_attention"):
        assert torch.equal(out[key], ref[key]), key
    for i, c in enumerate(clips):              # and each clip alone, unpadded, gives its batch row
        torch.testing.assert_close(model(collate([c], 16, 6, CELLS))["logits"], ref["logits"][i:i + 1],
                                   atol=1e-5, rtol=1e-4)


def test_checkpoint_without_stt_tokens_loads_as_frame_tokens(tmp_path):
    torch.manual_seed(0)
    cfg = _video_cfg("stt-frames", video_cells=0)
    model = build_model(cfg).eval()
    save_model(tmp_path / "new.pt", model, ["a", "b", "c"], {"n_mels": 64})
    ckpt = torch.load(tmp_path / "new.pt", weights_only=True)
    for field in ("stt_tokens", "video_cells"):          # a checkpoint from before spatial tokens
        del ckpt["config"][field]
    save_checkpoint(tmp_path / "old.pt", ckpt, MODEL_KIND, MODEL_VERSION)
    loaded, _ = load_model(tmp_path / "old.pt")
    assert loaded.cfg.stt_tokens == "frames" and loaded.cfg == cfg and not loaded.cfg.uses_maps
    batch = collate([_clip(0, 20, 5, audio=False)], 64, 6)
    torch.testing.assert_close(loaded(batch)["logits"], model(batch)["logits"])
    assert ModelConfig(n_classes=3, video_dim=6).stt_tokens == "cells"      # new runs: cells
    with pytest.raises(ValueError, match="avemo-extract --feature-maps"):
        ModelConfig(n_classes=3, modalities="video", video_dim=6, video_stream="stt")


def test_fan_relation_attention_is_optional():
    with_rel = build_video_stream(ModelConfig(n_classes=3, modalities="video", video_dim=6, video_stream="fan",
                                              video_hidden=8))
    without = build_video_stream(ModelConfig(n_classes=3, modalities="video", video_dim=6, video_stream="fan",
                                             video_hidden=8, fan_relation=False))
    assert with_rel.out_dim == 16 and without.out_dim == 8


@pytest.mark.parametrize("convs", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_audio_fcn_padding_invariance_in_eval_and_training(training, convs):
    torch.manual_seed(0)
    fcn = FCNAudioStream(n_mels=16, channels=(4, 8, 8), attention_hidden=8, convs_per_block=convs).train(training)
    mel = torch.randn(1, 16, 37)
    ref, ref_w = fcn(mel, torch.ones(1, 37, dtype=torch.bool))
    padded = torch.cat([mel, torch.zeros(1, 16, 20)], dim=2)
    out, w = fcn(padded, lengths_mask([37], 57))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w[..., : ref_w.shape[-1]], ref_w, atol=1e-6, rtol=1e-4)
    assert torch.equal(w[..., ref_w.shape[-1]:], torch.zeros_like(w[..., ref_w.shape[-1]:]))
    assert w.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("convs", [1, 2])
def test_audio_fcn_in_chunks_computes_what_one_pass_computes(convs):
    # evaluation of a long recording goes through the FCN in chunks of time (bounded memory); every
    # cell, attention weight and pooled vector must be the one-pass value, padding included
    torch.manual_seed(0)
    fcn = FCNAudioStream(n_mels=16, channels=(4, 8, 8), attention_hidden=8, convs_per_block=convs)
    for bn in (m for m in fcn.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_(1.0, 0.2)
        bn.bias.data.normal_(0.0, 0.2)
    fcn.eval()
    lengths = [1001, 999, 517, 33]
    mask = lengths_mask(lengths, 1001)
    mel = torch.randn(4, 16, 1001) * mask[:, None, :]
    with torch.no_grad():
        ref, ref_w = fcn(mel, mask)
        fcn.eval_frames = 4 * 40            # chunks of a few receptive fields: most edges cut through real audio
        out, w = fcn(mel, mask)
    assert fcn._grid_in_chunks(mel.unsqueeze(1), mask)[0].shape[-1] == ref_w.shape[-1]
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _clip(i, t_a, t_v, video=True, audio=True):
    g = torch.Generator().manual_seed(i)
    arrays = {}
    if audio:
        arrays["mel"] = torch.randn(16, t_a, generator=g).numpy()
    if video:
        arrays["video_features"] = torch.randn(t_v, 6, generator=g).numpy()
        mask = torch.ones(t_v, dtype=torch.bool)
        mask[0] = False
        arrays["face_mask"] = mask.numpy()
        maps = torch.randn(t_v, 2, 2, 6, generator=g)
        maps[0] = 0.0                                           # no face: zeros, as extraction writes them
        arrays["feature_maps"] = maps.numpy().astype("float16")
    return ClipFeatures(clip=f"c{i}", settings={}, arrays=arrays)


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_whole_model_batch_equals_clips_one_by_one(stream, fusion):
    torch.manual_seed(0)
    cfg = _video_cfg(stream, n_classes=4, n_mels=16, modalities="av", audio_channels=(4, 8), fusion=fusion,
                     fbp_o=16, modality_dropout=0.5)
    model = build_model(cfg).eval()
    clips = [_clip(0, 30, 5), _clip(1, 13, 9), _clip(2, 22, 3, video=False), _clip(3, 1, 4, audio=False)]
    batch = collate(clips, 16, 6, cfg.map_cells)
    assert batch["mel"].shape == (4, 16, 30) and batch["video"].shape == (4, 9, 6)
    out = model(batch)
    for i, c in enumerate(clips):
        single = model(collate([c], 16, 6, cfg.map_cells))
        torch.testing.assert_close(out["logits"][i:i + 1], single["logits"], atol=1e-5, rtol=1e-4)
    # missing modality -> the learned stand-in, still a finite prediction
    assert torch.isfinite(out["logits"]).all()
    assert torch.equal(out["video_attention"][2], torch.zeros(9))
    assert out["audio_attention"].shape[0] == 4


def test_missing_modality_uses_standin_and_modality_dropout_only_in_training():
    torch.manual_seed(0)
    cfg = ModelConfig(n_classes=3, n_mels=16, video_dim=6, audio_channels=(4,), fbp_o=8, modality_dropout=0.9,
                      dropout=0.0)
    model = build_model(cfg)
    with torch.no_grad():
        model.video_standin.fill_(3.0)
    batch = collate([_clip(0, 20, 5)] * 8, 16, 6)
    model.eval()
    a = model(batch)["logits"]
    assert torch.allclose(a, a[0].expand_as(a))       # eval: deterministic, nothing dropped
    model.train()
    b = model(batch)["logits"]
    assert not torch.allclose(b, b[0].expand_as(b))   # training: some clips lost a modality
    b.sum().backward()
    assert model.video_standin.grad is not None and model.video_standin.grad.abs().sum() > 0


def test_compact_softmax_ce_adds_nothing_for_uniform_non_targets_and_penalises_peaks():
    target = torch.tensor([0, 1])
    uniform = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    loss = CompactSoftmaxCE(beta=1.0)
    torch.testing.assert_close(loss(uniform, target), F.cross_entropy(uniform, target))
    peaked = torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 2.0, 0.0, -3.0]])
    assert loss(peaked, target) > F.cross_entropy(peaked, target) + 0.05


def _compact_softmax_by_hand(z, y, beta):
    """(A1)-(A4) of CompactSoftmaxCE written out element by element, in float64."""
    total = 0.0
    for zi, yi in zip(z.tolist(), y.tolist()):
        e = [math.exp(v) for v in zi]
        p = [v / sum(e) for v in e]                                   # (A1)
        ce = -math.log(p[yi])
        q = [p[j] / (1 - p[yi]) for j in range(len(p)) if j != yi]    # (A2)
        u = 1 / len(q)
        kl = sum(qj * math.log(qj / u) for qj in q) + sum(u * math.log(u / qj) for qj in q)   # (A3)
        total += ce + beta * kl                                       # (A4), then the batch mean
    return total / len(y)


def test_compact_softmax_matches_its_formula_in_value_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(4, 5, dtype=torch.float64) * 2
    y = torch.tensor([0, 3, 3, 1])
    loss_fn = CompactSoftmaxCE(beta=0.7)
    z1 = z.clone().requires_grad_(True)
    loss = loss_fn(z1, y)
    loss.backward()
    assert loss.item() == pytest.approx(_compact_softmax_by_hand(z, y, 0.7), rel=1e-6)
    h = 1e-6                                                           # central differences of the by-hand loss
    grad = torch.zeros_like(z)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            up, down = z.clone(), z.clone()
            up[i, j] += h
            down[i, j] -= h
            grad[i, j] = (_compact_softmax_by_hand(up, y, 0.7) - _compact_softmax_by_hand(down, y, 0.7)) / (2 * h)
    torch.testing.assert_close(z1.grad, grad, rtol=1e-5, atol=1e-7)
    # the target logit gets the cross-entropy's gradient only, (p_y - 1) / B: (A2) does not depend on it
    rows = torch.arange(4)
    torch.testing.assert_close(z1.grad[rows, y], (z.softmax(-1)[rows, y] - 1) / 4)


def test_model_checkpoint_rebuilds_from_the_file_alone(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(n_classes=3, n_mels=16, video_dim=6, audio_channels=(4, 8), video_stream="stt",
                      video_hidden=8, stt_heads=2, fbp_o=8, video_cells=CELLS)
    model = build_model(cfg)
    model.set_normalisation({"mel_mean": torch.arange(16.0), "mel_std": torch.full((16,), 2.0),
                             "map_mean": torch.full((6,), 0.5)})
    batch = collate([_clip(0, 20, 5), _clip(1, 9, 3)], 16, 6, CELLS)
    model.eval()
    ref = model(batch)["logits"]
    path = tmp_path / "m.pt"
    save_model(path, model, ["a", "b", "c"], {"n_mels": 16}, {"val_uar": 0.5})
    loaded, ckpt = load_model(path)
    torch.testing.assert_close(loaded(batch)["logits"], ref)
    assert loaded.cfg == cfg and ckpt["classes"] == ["a", "b", "c"] and ckpt["metrics"]["val_uar"] == 0.5
    assert ckpt["normalisation"]["mel_mean"][3] == 3.0 and ckpt["normalisation"]["map_mean"][0] == 0.5
    assert not loaded.training
    with pytest.raises(ValueError, match="class names"):
        save_model(tmp_path / "x.pt", model, ["a", "b"], {})
    bad = dict(ckpt)
    bad["config"] = dict(ckpt["config"], video_stream="lstm")
    save_checkpoint(tmp_path / "bad.pt", bad, MODEL_KIND, MODEL_VERSION)
    with pytest.raises(CheckpointError, match="unknown video stream 'lstm'"):
        load_model(tmp_path / "bad.pt")


def test_ensemble_averages_member_probabilities_and_rebuilds_from_the_file_alone(tmp_path):
    cfg = ModelConfig(n_classes=3, n_mels=16, video_dim=6, audio_channels=(4, 8), video_hidden=8, fbp_o=8)
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model(cfg).eval())
    batch = collate([_clip(0, 20, 5), _clip(1, 9, 3, video=False)], 16, 6)
    ens = Ensemble(members).eval()
    out = ens(batch)
    probs = torch.stack([torch.softmax(m(batch)["logits"], -1) for m in members]).mean(0)
    torch.testing.assert_close(torch.softmax(out["logits"], -1), probs)
    torch.testing.assert_close(out["video_attention"],
                               torch.stack([m(batch)["video_attention"] for m in members]).mean(0))
    one = Ensemble(members[:1]).eval()
    torch.testing.assert_close(torch.softmax(one(batch)["logits"], -1), torch.softmax(members[0](batch)["logits"], -1))
    save_model(tmp_path / "e.pt", ens, ["a", "b", "c"], {"n_mels": 16})
    loaded, ckpt = load_model(tmp_path / "e.pt")
    assert isinstance(loaded, Ensemble) and ckpt["members"] == 3 and loaded.cfg == cfg
    torch.testing.assert_close(loaded(batch)["logits"], out["logits"])
    with pytest.raises(ValueError, match="one model config"):
        Ensemble([members[0], build_model(ModelConfig(n_classes=4, n_mels=16, modalities="audio"))])


def test_config_and_batching_errors_are_specific():
    with pytest.raises(ValueError, match="unknown fusion"):
        ModelConfig(n_classes=3, fusion="sum", video_dim=4)
    with pytest.raises(ValueError, match="video_dim"):
        ModelConfig(n_classes=3, modalities="av")
    with pytest.raises(ValueError, match="at least 2 classes"):
        ModelConfig(n_classes=1, modalities="audio")
    # a checkpoint of a removed option says so, and what to do, instead of listing today's choices alone
    with pytest.raises(ValueError, match="audio_norm 'utterance' .*removed.*no longer supported; retrain"):
        ModelConfig(n_classes=3, modalities="audio", audio_norm="utterance")
    with pytest.raises(ValueError, match="audio_norm must be one of global, level"):
        ModelConfig(n_classes=3, modalities="audio", audio_norm="speaker")
    with pytest.raises(ValueError, match=r"mel has shape \(16, 20\), expected \[64, T\]"):
        collate([_clip(0, 20, 5)], 64, 6)
    with pytest.raises(ValueError, match="zero clips"):
        collate([], 16, 6)
    with pytest.raises(ValueError, match="at most 4 frames"):
        build_video_stream(_video_cfg("stt-frames", stt_max_frames=4))(
            torch.randn(1, 5, 6), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at most 4 frames"):
        build_video_stream(_video_cfg("stt", stt_max_frames=4))(
            torch.randn(1, 5, CELLS, 6), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"feature_maps has shape \(5, 2, 2, 6\), expected \[5, h, w, 6\] "
                                         r"with h\*w = 9"):
        collate([_clip(0, 20, 5)], 16, 6, 9)
    no_maps = _clip(0, 20, 5)
    del no_maps.arrays["feature_maps"]
    with pytest.raises(ValueError, match="avemo-extract --feature-maps"):
        collate([no_maps], 16, 6, CELLS)


def test_trim_batch_cuts_shared_padding_only():
    batch = collate([_clip(0, 30, 5), _clip(1, 13, 9)], 16, 6, CELLS)
    sub = trim_batch({k: v[1:] for k, v in batch.items()})
    assert sub["mel"].shape[-1] == 13 and sub["video"].shape[1] == 9 and sub["video_maps"].shape[1] == 9
    sub = trim_batch({k: v[:1] for k, v in batch.items()})
    assert sub["video"].shape[1] == 5 and sub["video_maps"].shape[1:] == (5, CELLS, 6)


def test_masked_batchnorm_statistics_hold_in_bf16_for_large_means():
    # under CUDA bf16 autocast the conv output reaches BatchNorm in bf16; a channel whose mean
    # is large against its spread must still come out with unit spread over its valid cells
    from avemo.model.audio import MaskedBatchNorm2d
    torch.manual_seed(0)
    bn = MaskedBatchNorm2d(3).train()
    x = torch.randn(4, 3, 8, 50) * torch.tensor([1.0, 1.0, 4.0])[None, :, None, None]
    x = x + torch.tensor([0.0, 30.0, 200.0])[None, :, None, None]
    x = x.to(torch.bfloat16)
    mask = torch.ones(4, 50, dtype=torch.bool)
    mask[1, 30:] = False
    y = bn(x, mask[:, None, None, :].to(x.dtype)).detach().float()
    valid = mask[:, None, None, :].expand_as(y)
    for c in range(3):
        yc = y[:, c][valid[:, c]]
        assert abs(float(yc.mean())) < 0.05
        assert float(yc.std()) == pytest.approx(1.0, abs=0.03), (c, float(yc.std()))


def test_masked_batchnorm_equals_batchnorm_over_the_valid_cells_alone():
    # the closed-form moments (from the zero-padded tensor's own) must give exactly what a
    # BatchNorm over only the valid time steps gives: outputs, gradients and running statistics
    from avemo.model.audio import MaskedBatchNorm2d
    torch.manual_seed(0)
    bn = MaskedBatchNorm2d(3).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 2.0]))
    lengths = [11, 4, 7]
    x = (torch.randn(3, 3, 5, 11) * 2 + 3).requires_grad_()   # padded steps hold junk: it must be ignored
    keep = lengths_mask(lengths, 11)[:, None, None, :].float()
    y = bn(x, keep)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    ref_bn = torch.nn.BatchNorm2d(3).train()
    ref_bn.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "running_mean" and k != "running_var"},
                           strict=False)
    xr = x.detach().clone().requires_grad_()
    valid = torch.cat([xr[i, :, :, :n] for i, n in enumerate(lengths)], dim=2)   # [C, F, all valid steps]
    yr = ref_bn(valid.reshape(3, 5, -1)[None])[0]                                 # [C, F, sum(n)]
    gr = torch.cat([g[i, :, :, :n] for i, n in enumerate(lengths)], dim=2)
    (yr * gr).sum().backward()

    got = torch.cat([y[i, :, :, :n] for i, n in enumerate(lengths)], dim=2)
    torch.testing.assert_close(got, yr, atol=1e-5, rtol=1e-5)
    for i, n in enumerate(lengths):
        assert torch.equal(y[i, :, :, n:], torch.zeros_like(y[i, :, :, n:]))       # padding comes out zero
        assert torch.equal(x.grad[i, :, :, n:], torch.zeros_like(x.grad[i, :, :, n:]))
    torch.testing.assert_close(torch.cat([x.grad[i, :, :, :n] for i, n in enumerate(lengths)], dim=2),
                               torch.cat([xr.grad[i, :, :, :n] for i, n in enumerate(lengths)], dim=2),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, atol=1e-6, rtol=1e-5)


def test_checkpoints_from_before_convs_per_block_still_load(tmp_path):
    # a one-conv-per-block model saved the way earlier versions wrote it: no audio_convs_per_block
    # in the config, and the layers named blocks.i.conv / blocks.i.bn
    torch.manual_seed(0)
    cfg = ModelConfig(n_classes=3, n_mels=16, modalities="audio", audio_channels=(4, 8), audio_convs_per_block=1)
    model = build_model(cfg).eval()
    batch = collate([_clip(0, 20, 5, video=False), _clip(1, 9, 3, video=False)], 16, 0)
    save_model(tmp_path / "new.pt", model, ["a", "b", "c"], {"n_mels": 16})
    old = torch.load(tmp_path / "new.pt", weights_only=True)
    del old["config"]["audio_convs_per_block"]
    old["model"] = {k.replace(".convs.0.", ".conv.").replace(".bns.0.", ".bn."): v for k, v in old["model"].items()}
    assert "audio.blocks.1.conv.weight" in old["model"]
    save_checkpoint(tmp_path / "old.pt", old, MODEL_KIND, MODEL_VERSION)
    loaded, _ = load_model(tmp_path / "old.pt")
    assert loaded.cfg.audio_convs_per_block == 1
    torch.testing.assert_close(loaded(batch)["logits"], model(batch)["logits"])
    # a fresh config takes today's default, two convolutions per block
    assert ModelConfig.from_dict({"n_classes": 3, "modalities": "audio"}).audio_convs_per_block == 2


def test_product_fusion_is_the_normalised_product_and_a_missing_modality_drops_out():
    torch.manual_seed(0)
    cfg = ModelConfig(n_classes=4, n_mels=16, video_dim=6, audio_channels=(4, 8), video_stream="mean",
                      fusion="product", dropout=0.0)
    model = build_model(cfg).eval()
    assert not hasattr(model, "classifier") and not hasattr(model, "audio_standin")
    clips = [_clip(0, 30, 5), _clip(1, 22, 3, video=False), _clip(2, 1, 4, audio=False)]
    out = model(collate(clips, 16, 6))
    pa, pv, p = (torch.softmax(out[k], -1) for k in ("audio_logits", "video_logits", "logits"))
    both = pa[0] * pv[0]
    torch.testing.assert_close(p[0], both / both.sum())                  # Bayes with a uniform prior
    torch.testing.assert_close(p[1], pa[1])                              # no face: the voice alone
    torch.testing.assert_close(p[2], pv[2])                              # no sound: the face alone
    # the mean stream followed by a linear head is the mean of the frames' logits (face-masked frames left out)
    v = torch.as_tensor(clips[0].arrays["video_features"])[torch.as_tensor(clips[0].arrays["face_mask"])]
    frame_logits = model.fusion.video_head(v)
    torch.testing.assert_close(out["video_logits"][0], torch.log_softmax(frame_logits.mean(0), -1))


def test_adapt_gives_the_audio_stream_a_groups_statistics_and_leaves_the_model_as_it_was(monkeypatch):
    import avemo.model.adapt as adapting
    from avemo.model.adapt import AdaptError, adapt, mel_statistics
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_classes=3, n_mels=16, modalities="audio", audio_channels=(4, 8),
                                    audio_norm="global")).eval()      # the group's mel statistics as they are
    with torch.no_grad():                                                # statistics of its own, as if trained
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "mel_mean")):
                buf.normal_()
            elif name.endswith(("running_var", "mel_std")):
                buf.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mels = [_clip(i, t, 1, video=False).arrays["mel"] * (1 + i) + i for i, t in enumerate((30, 17, 24))]
    adapted = adapt(model, mels, prior_clips=0)                          # the group's statistics alone
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])                         # the model itself is untouched
    cat = np.concatenate(mels, 1).astype(np.float64)
    np.testing.assert_allclose(adapted.mel_mean.numpy(), cat.mean(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mel_statistics(mels)["mel_std"], cat.std(1), rtol=1e-9)
    assert not adapted.training
    # the first BatchNorm's statistics are the first convolution's output over the group's frames, padding
    # left out (the three clips are one padded batch)
    batch = collate([ClipFeatures(clip=str(i), settings={}, arrays={"mel": m}) for i, m in enumerate(mels)], 16, 0)
    mask = batch["mel_mask"]
    x = adapted.audio.blocks[0].convs[0](adapted._normalise_mel(batch["mel"], mask).unsqueeze(1))
    valid = x.permute(1, 0, 2, 3)[:, mask[:, None, :].expand(-1, 16, -1)]       # [C, valid cells]
    bn = adapted.audio.blocks[0].bns[0]
    torch.testing.assert_close(bn.running_mean, valid.mean(1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, valid.var(1), atol=1e-5, rtol=1e-4)
    assert bn.momentum == model.audio.blocks[0].bns[0].momentum
    assert not torch.allclose(adapted(batch)["logits"], model(batch)["logits"])
    # with a prior of 6 clips, 3 clips weigh a third: every statistic is a third of the way from the model's
    # own to the group's, each layer's measured on what the blended layers before it pass on
    blended = adapt(model, mels, prior_clips=6)
    torch.testing.assert_close(blended.mel_mean, (adapted.mel_mean + 2 * model.mel_mean) / 3)
    torch.testing.assert_close(blended.mel_std ** 2, (adapted.mel_std ** 2 + 2 * model.mel_std ** 2) / 3)
    x = blended.audio.blocks[0].convs[0](blended._normalise_mel(batch["mel"], mask).unsqueeze(1))
    valid = x.permute(1, 0, 2, 3)[:, mask[:, None, :].expand(-1, 16, -1)]
    first, own = blended.audio.blocks[0].bns[0], model.audio.blocks[0].bns[0]
    torch.testing.assert_close(first.running_mean, (valid.mean(1) + 2 * own.running_mean) / 3, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first.running_var, (valid.var(1) + 2 * own.running_var) / 3, atol=1e-5, rtol=1e-4)
    x = blended.audio.blocks[0](blended._normalise_mel(batch["mel"], mask).unsqueeze(1), mask, True)[0]
    x = blended.audio.blocks[1].convs[0](x)
    valid = x.permute(1, 0, 2, 3)[:, mask[:, None, ::2].expand(-1, x.shape[2], -1)]
    second, own = blended.audio.blocks[1].bns[0], model.audio.blocks[1].bns[0]
    torch.testing.assert_close(second.running_mean, (valid.mean(1) + 2 * own.running_mean) / 3, atol=1e-5, rtol=1e-4)
    with pytest.raises(AdaptError, match="at least 0"):
        adapt(model, mels, prior_clips=-1)
    # relative to a population, a group that is that population is where the model already puts it: nothing
    # moves; a group unlike it moves
    from avemo.model.adapt import population_statistics
    pop = population_statistics(model, mels)
    same = adapt(model, mels, prior_clips=0, population=pop)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k].double(), v.double(), atol=1e-4, rtol=1e-4)
    moved = adapt(model, mels[:1], prior_clips=0, population=pop)
    assert not torch.allclose(moved.mel_mean, model.mel_mean)
    with pytest.raises(AdaptError, match="scope all"):
        adapt(model, mels, scope="batchnorm", population=pop)
    # a stream fine-tuned from a front-end keeps the front-end's mel normalisation; its BatchNorm still adapts
    kept = adapt(model, mels, prior_clips=0, scope="batchnorm")
    torch.testing.assert_close(kept.mel_mean, model.mel_mean)
    torch.testing.assert_close(kept.mel_std, model.mel_std)
    assert not torch.allclose(kept.audio.blocks[0].bns[0].running_mean, model.audio.blocks[0].bns[0].running_mean)
    # an ensemble adapts each member as that member alone would be
    ensemble = Ensemble([model, model])
    pair = adapt(ensemble, mels, prior_clips=0)
    assert ensemble.members[0] is model                                  # the ensemble itself is untouched
    assert isinstance(pair, Ensemble) and all(m.training is False for m in pair.members)
    torch.testing.assert_close(pair.members[1].audio.blocks[0].bns[0].running_var, bn.running_var)
    # clips of one length in batches of one clip each: the mean over batches is the group's mean
    same = [m[:, :17] for m in mels]
    whole = adapt(model, same, prior_clips=0)
    monkeypatch.setattr(adapting, "EVAL_FRAMES", 17)
    one_by_one = adapt(model, same, prior_clips=0)
    torch.testing.assert_close(one_by_one.audio.blocks[0].bns[0].running_mean,
                               whole.audio.blocks[0].bns[0].running_mean, atol=1e-5, rtol=1e-4)
    # a long clip adapts in windows, never in one pass of its whole length
    monkeypatch.setattr(adapting, "ADAPT_FRAMES", 8)
    seen = []
    monkeypatch.setattr(type(model.audio), "_grid", lambda self, x, mask: (seen.append(x.shape[-1]), (
        torch.ones(x.shape[0], 8, 1, 1), mask[:, :1]))[1])
    adapt(model, [np.zeros((16, 30), np.float32)])
    assert max(seen) <= 8
    with pytest.raises(AdaptError, match="no clip"):
        adapt(model, [])
    face_only = build_model(ModelConfig(n_classes=3, video_dim=6, modalities="video"))
    with pytest.raises(AdaptError, match="reads no audio"):
        adapt(face_only, mels)


def test_adaptation_scope_reads_whose_statistics_a_model_holds():
    from avemo.model.adapt import AdaptError, adaptation_scope
    front = {"name": "frontend", "data": [{"name": "ravdess", "clips": 960, "speakers": 16}]}
    assert adaptation_scope({"audio_init": None, "train_config": {"audio_lr": None}}) == "all"      # from scratch
    assert adaptation_scope({"data": [{"name": "ravdess"}]}) == "all"                 # a front-end of one corpus
    assert adaptation_scope({"audio_init": front, "train_config": {"audio_lr": None}}) == "batchnorm"
    assert adaptation_scope({"audio_init": front, "train_config": {"audio_lr": 3e-4}}) == "batchnorm"
    with pytest.raises(AdaptError, match=r"front-end 'frontend', which learned from several corpora at once \(emodb, "):
        adaptation_scope({"audio_init": {**front, "data": [{"name": "ravdess"}, {"name": "emodb"}]},
                          "train_config": {"audio_lr": None}})
    for frozen in ({"audio_init": front, "train_config": {"audio_lr": 0.0}},
                   {"audio_init": {**front, "familiarity": {"frozen": True}}, "train_config": {"audio_lr": None}}):
        with pytest.raises(AdaptError, match="stayed frozen from the front-end 'frontend'.*ravdess"):
            adaptation_scope(frozen)
    two = [{"name": "ravdess"}, {"name": "emodb"}]
    for record in ({"about": {"data": {"voice": two, "face": {"name": "fer2013"}}}}, {"data": two}):
        with pytest.raises(AdaptError, match=r"several corpora at once \(emodb, ravdess\)"):
            adaptation_scope(record)


def test_level_normalisation_makes_the_model_and_its_adaptation_blind_to_recording_gain():
    from avemo.model.adapt import adapt, mel_statistics
    from avemo.model.audio import clip_level
    torch.manual_seed(0)
    mels = [_clip(i, t, 1, video=False).arrays["mel"] * (1 + 0.3 * i) - 4 + i for i, t in enumerate((30, 17, 24))]
    # the level is the log of the mean power over the valid frames: padding does not count
    padded = torch.full((1, 16, 40), -13.8)
    padded[0, :, :30] = torch.from_numpy(mels[0])
    level = clip_level(padded, lengths_mask([30], 40))
    torch.testing.assert_close(level, torch.tensor([math.log(np.exp(mels[0].astype(np.float64)).mean())]))
    model = build_model(ModelConfig(n_classes=3, n_mels=16, modalities="audio", audio_channels=(4, 8),
                                    audio_norm="level")).eval()
    stats = mel_statistics(mels, "level")
    cat = np.concatenate([m - math.log(np.exp(m.astype(np.float64)).mean()) for m in mels], 1)
    np.testing.assert_allclose(stats["mel_mean"], cat.mean(1), rtol=1e-6)
    assert not np.allclose(stats["mel_mean"], mel_statistics(mels)["mel_mean"])
    model.set_normalisation(stats)

    def logits(net, ms):
        batch = collate([ClipFeatures(clip=str(i), settings={}, arrays={"mel": m}) for i, m in enumerate(ms)], 16, 0)
        with torch.no_grad():
            return net(batch)["logits"]

    # each clip replayed at its own gain (+20, -10, +6 dB: 2 ln g added to every log power)
    louder = [m + np.float32(2 * math.log(10 ** (db / 20))) for m, db in zip(mels, (20, -10, 6))]
    torch.testing.assert_close(logits(model, louder), logits(model, mels), atol=1e-4, rtol=1e-4)
    global_model = build_model(ModelConfig(n_classes=3, n_mels=16, modalities="audio", audio_channels=(4, 8),
                                           audio_norm="global")).eval()
    global_model.set_normalisation(mel_statistics(mels))
    assert (logits(global_model, louder) - logits(global_model, mels)).abs().max() > 1e-3     # it hears the gain
    # adapted to a speaker, the same: the speaker's statistics are taken as the model sees the clips
    torch.testing.assert_close(logits(adapt(model, louder, prior_clips=0), louder),
                               logits(adapt(model, mels, prior_clips=0), mels), atol=1e-4, rtol=1e-4)
