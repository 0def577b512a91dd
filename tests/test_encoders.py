"""Face encoders: the networks' shapes and parts, the encoder file, the input contract."""
import numpy as np
import pytest
import torch

from avemo.checkpoint import CheckpointError, save_checkpoint
from avemo.encoders import (ARCH_PRESETS, ENCODER_FORMAT, WEIGHTS_DIR, FaceEncoder, build_encoder, export_encoder,
                            load_encoder, normalize, resolve_arch_cfg, resolve_encoder_path, to_model_pixels)
from avemo.encoders.efficientface import ChannelSpatialModulator, LocalFeatureExtractor
from avemo.encoders.transfer import MSADAttention, MultiAttentionDropping

torch.set_num_threads(1)
SMALL_EF = dict(stages_repeats=[1, 1, 1], stages_out_channels=[8, 16, 32, 64, 48], stem_stride=1)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_efficientface_paper_configuration_has_the_papers_size_and_shapes():
    m = build_encoder("efficientface", 7).eval()
    # the paper reports about 1.28M parameters for its 7-class network
    assert 1.25e6 < n_params(m) < 1.31e6
    assert m.feature_dim == 1024 and m.num_classes == 7
    x = torch.randn(2, 3, 224, 224)
    assert m.forward_features(x).shape == (2, 1024)
    assert m(x).shape == (2, 7)


def test_efficientface_small_grey_input():
    m = build_encoder("efficientface", 5, in_chans=1, stem_stride=1,
                      stages_out_channels=[24, 96, 192, 384, 512]).eval()
    assert m.feature_dim == 512
    assert m(torch.randn(3, 1, 48, 48)).shape == (3, 5)
    assert 0.7e6 < n_params(m) < 0.8e6


def test_local_feature_extractor_treats_each_quadrant_on_its_own():
    lfe = LocalFeatureExtractor(4, 8).eval()
    x = torch.randn(1, 4, 16, 16)
    out = lfe(x)
    assert out.shape == (1, 8, 8, 8)
    y = x.clone()
    y[..., 8:, 8:] += 5                                  # change only the bottom-right region
    out2 = lfe(y)
    torch.testing.assert_close(out2[..., :4, :], out[..., :4, :])       # top half untouched
    torch.testing.assert_close(out2[..., 4:, :4], out[..., 4:, :4])     # bottom-left untouched
    assert not torch.allclose(out2[..., 4:, 4:], out[..., 4:, 4:])
    with pytest.raises(ValueError, match="even"):
        lfe(torch.randn(1, 4, 15, 16))


def test_modulator_is_sigmoid_of_channel_times_spatial_gate():
    mod = ChannelSpatialModulator(32).eval()
    x = torch.randn(2, 32, 6, 6)
    expected = torch.sigmoid(mod.channel(x) * mod.spatial(x)) * x
    torch.testing.assert_close(mod(x), expected)
    assert mod.channel(x).shape == (2, 32, 1, 1) and mod.spatial(x).shape == (2, 1, 6, 6)


def test_transfer_shapes_and_stem_depth():
    shallow = build_encoder("transfer", 7, in_chans=1, stem_depth=1)
    deep = build_encoder("transfer", 7, in_chans=1, stem_depth=2)
    assert n_params(deep) > n_params(shallow)
    assert 0.4e6 < n_params(shallow) < 1.0e6
    shallow.eval()
    assert shallow.forward_features(torch.randn(2, 1, 48, 48)).shape == (2, shallow.feature_dim)
    assert shallow(torch.randn(2, 1, 48, 48)).shape == (2, 7)
    with pytest.raises(ValueError, match="max_tokens"):
        build_encoder("transfer", 7, in_chans=1, max_tokens=8).eval()(torch.randn(1, 1, 48, 48))


def test_mad_drops_exactly_one_attention_map_in_training_and_none_in_eval():
    mad = MultiAttentionDropping(p=1.0)
    maps = torch.rand(64, 4, 5, 5) + 0.1                 # strictly positive: a zero map was dropped
    out = mad.train()(maps)
    dropped = (out.flatten(2) == 0).all(-1)              # [B, N]
    assert (dropped.sum(1) == 1).all()
    kept = ~dropped
    torch.testing.assert_close(out[kept], maps[kept])
    assert len(set(dropped.float().argmax(1).tolist())) > 1      # the dropped branch varies
    torch.testing.assert_close(mad.eval()(maps), maps)
    torch.testing.assert_close(MultiAttentionDropping(0.0).train()(maps), maps)


def test_transfer_mad_acts_on_its_lanet_maps():
    m = build_encoder("transfer", 3, in_chans=1, num_lanets=3, mad_p=1.0)
    feats = m.stem.eval()(torch.randn(4, 1, 48, 48))
    m.train()
    maps = m.attention_maps(feats)
    assert maps.shape[1] == 3
    assert ((maps.flatten(2) == 0).all(-1).sum(1) == 1).all()
    m.eval()
    assert not (m.attention_maps(feats).flatten(2) == 0).all(-1).any()


def test_msad_drops_one_head_in_training_only():
    attn = MSADAttention(dim=16, heads=4, p_drop_head=1.0)
    heads = torch.rand(8, 4, 5, 4) + 0.1
    out = attn.train().drop_one_head(heads)
    assert ((out.flatten(2) == 0).all(-1).sum(1) == 1).all()
    torch.testing.assert_close(attn.eval().drop_one_head(heads), heads)
    assert attn(torch.randn(2, 5, 16)).shape == (2, 5, 16)


def test_build_encoder_errors():
    with pytest.raises(ValueError, match="unknown encoder architecture 'resnet'"):
        build_encoder("resnet", 7)
    with pytest.raises(ValueError, match="bad settings for 'efficientface'"):
        build_encoder("efficientface", 7, no_such_option=1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_encoder("efficientface", 1)


def _ir_unit_params(c_in, c_out, stride):
    """One improved residual unit counted by hand: BN-conv3x3-BN-PReLU-conv3x3-BN, plus a
    1x1-conv + BN shortcut where the shape changes (ArcFace's IR unit)."""
    body = 2 * c_in + 9 * c_in * c_out + 2 * c_out + c_out + 9 * c_out * c_out + 2 * c_out
    shortcut = c_in * c_out + 2 * c_out if stride != 1 or c_in != c_out else 0
    return body + shortcut


def _ir_stages_params(in_chans, widths, units):
    """The IR input layer (conv3x3 + BN + PReLU) and stages whose first unit halves the map."""
    n, c = 9 * in_chans * widths[0] + 3 * widths[0], widths[0]
    for w, k in zip(widths, units):
        n += _ir_unit_params(c, w, 2) + (k - 1) * _ir_unit_params(w, w, 1)
        c = w
    return n


def test_transfer_paper_preset_is_ir50s_first_three_stages_and_the_papers_encoder():
    cfg = resolve_arch_cfg("transfer", "paper")
    with torch.device("meta"):                                   # shapes only: nothing allocated
        m = build_encoder("transfer", 7, **cfg)
    # IR-50 is 3/4/14/3 units at 64/128/256/512; TransFER taps the output of stage 3
    stem = _ir_stages_params(3, [64, 128, 256], [3, 4, 14])
    assert n_params(m.stem) == stem
    d, mlp, tokens = 768, 3 * 768, 14 * 14                        # 112-px face -> 14x14 cells
    lanets = 2 * (256 * 16 + 16 + 16 * 1 + 1)                     # two LANets, 1x1 convs with reduction 16
    embed = 256 * d + d + d + (tokens + 1) * d                    # 1x1 projection, class token, positions
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    head = 2 * d + d * 7 + 7                                      # final LayerNorm, classifier
    assert n_params(m) == stem + lanets + embed + 8 * block + head
    # later comparisons quote TransFER at 65.2M parameters; the authors' release differs from this
    # count by ~31k (no qkv bias, no BN between a unit's convs, a strided identity shortcut in
    # the first unit, BN inside LANet), well inside that rounding
    assert 65.15e6 < n_params(m) < 65.3e6
    assert m.feature_dim == 768 and m.max_tokens == 196 and len(m.blocks) == 8 and m.blocks[0].attn.heads == 8
    assert m.mad.p == 0.6 and m.blocks[0].attn.p == 0.3 and len(m.lanets) == 2


def test_transfer_paper_preset_runs_at_the_papers_input_size():
    cfg = {**resolve_arch_cfg("transfer", "paper"), "depth": 1}  # one encoder block keeps this cheap
    m = build_encoder("transfer", 7, **cfg).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 112, 112)).shape == (1, 7)     # 196 tokens: exactly max_tokens


def test_presets_by_name_and_settings_over_the_default_preset():
    assert resolve_arch_cfg("transfer") == resolve_arch_cfg("transfer", {}) == ARCH_PRESETS["transfer"]["small"]
    assert n_params(build_encoder("transfer", 7, **resolve_arch_cfg("transfer"))) == n_params(build_encoder("transfer", 7))
    assert resolve_arch_cfg("transfer", {"depth": 1})["embed_dim"] == 128
    assert resolve_arch_cfg("efficientface") == {"stem_stride": 1}
    # EfficientFace's paper preset is the official network (zengqunzhao/EfficientFace), the class default
    assert n_params(build_encoder("efficientface", 7, **resolve_arch_cfg("efficientface", "paper"))) == \
        n_params(build_encoder("efficientface", 7))
    resolve_arch_cfg("transfer", "paper")["depth"] = 1               # a copy: the table stays as it is
    assert ARCH_PRESETS["transfer"]["paper"]["depth"] == 8
    with pytest.raises(ValueError, match="unknown preset 'huge' for 'transfer'.*small, paper"):
        resolve_arch_cfg("transfer", "huge")


def test_an_exported_preset_model_reloads_from_its_recorded_settings(tmp_path, monkeypatch):
    cfg = {**resolve_arch_cfg("transfer", "small"), "stem_channels": [8, 16, 32], "embed_dim": 16, "heads": 2}
    m = build_encoder("transfer", 2, in_chans=1, **cfg)
    export_encoder(tmp_path / "t.pt", m, "transfer", {**cfg, "in_chans": 1}, ["a", "b"], 32, True, [0.5], [0.2])
    monkeypatch.setitem(ARCH_PRESETS, "transfer", {})              # no preset table at load time
    enc = load_encoder(tmp_path / "t.pt")
    assert enc.arch_cfg["embed_dim"] == 16 and enc.arch_cfg["depth"] == 2 and enc.feature_dim == 16


@pytest.fixture
def small_encoder_file(tmp_path):
    torch.manual_seed(0)
    model = build_encoder("efficientface", 3, in_chans=1, **SMALL_EF)
    model.eval()
    path = tmp_path / "small.pt"
    export_encoder(path, model, "efficientface", dict(in_chans=1, **SMALL_EF), ["a", "b", "c"], 32, True,
                   [0.5], [0.25], metrics={"test": {"accuracy": np.float64(0.5)}}, training={"epochs": 1})
    return path, model


def test_export_load_roundtrip_is_self_describing(small_encoder_file):
    path, model = small_encoder_file
    enc = load_encoder(path)
    assert isinstance(enc, FaceEncoder)
    assert enc.classes == ["a", "b", "c"] and enc.input_size == 32 and enc.grayscale
    assert enc.feature_dim == 48 and enc.mean == [0.5] and enc.std == [0.25]
    assert enc.metrics["test"]["accuracy"] == 0.5 and enc.training == {"epochs": 1}
    assert enc.name == "small" and len(enc.sha256) == 64
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(enc.model(x), model(x))


def test_embed_and_classify_take_any_size_rgb_crops(small_encoder_file):
    enc = load_encoder(small_encoder_file[0])
    crops = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    emb = enc.embed(crops)
    assert emb.shape == (5, 48) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    torch.testing.assert_close(enc.embed(crops, batch_size=2), emb, rtol=1e-4, atol=1e-5)
    probs = enc.classify(torch.from_numpy(crops))
    assert probs.shape == (5, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    mixed = [crops[0], crops[1, :60, :80]]
    assert enc.embed(mixed).shape == (2, 48)


def test_input_contract_conversion():
    # a flat colour crop becomes its BT.601 luma, resized, then normalised
    crop = np.zeros((1, 112, 112, 3), np.uint8)
    crop[..., 0], crop[..., 1], crop[..., 2] = 200, 100, 50
    grey = to_model_pixels(crop, 48, grayscale=True)
    assert grey.shape == (1, 1, 48, 48) and grey.dtype == torch.uint8
    assert (grey == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)).all()
    colour = to_model_pixels(np.full((2, 30, 40), 7, np.uint8), 24, grayscale=False)
    assert colour.shape == (2, 3, 24, 24) and (colour == 7).all()
    x = normalize(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8), [0.5], [0.25])
    torch.testing.assert_close(x, torch.full((1, 1, 2, 2), 2.0))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 10, 10, 4), np.uint8), r"\[N, H, W, 3\]"),
    (np.zeros((2, 10, 10, 3), np.float32), "uint8"),
    (np.zeros((0, 10, 10, 3), np.uint8), "no face crops"),
    ([], "no face crops"),
])
def test_bad_crops_get_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        to_model_pixels(bad, 32, True)


def test_resolve_encoder_path():
    assert resolve_encoder_path("default") == WEIGHTS_DIR / "default.pt"
    assert resolve_encoder_path("fer-small") == WEIGHTS_DIR / "fer-small.pt"
    assert str(resolve_encoder_path("runs/x/encoder.pt")) == "runs/x/encoder.pt"
    assert str(resolve_encoder_path("model.pt")) == "model.pt"


def test_loading_missing_corrupt_or_foreign_files_fails_clearly(tmp_path, small_encoder_file):
    with pytest.raises(CheckpointError, match="face encoder 'no-such-encoder' not found"):
        load_encoder("no-such-encoder")
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(tmp_path / "absent.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(small_encoder_file[0].read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_encoder(corrupt)
    other = tmp_path / "other.pt"
    save_checkpoint(other, {"x": 1}, "avemo-model", 1)
    with pytest.raises(CheckpointError, match="expected 'avemo-face-encoder'"):
        load_encoder(other)
    mismatched = tmp_path / "mismatched.pt"
    data = torch.load(small_encoder_file[0], weights_only=True)
    data["arch_cfg"]["stages_out_channels"] = [8, 16, 32, 64, 96]
    save_checkpoint(mismatched, data, ENCODER_FORMAT, 1)
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_encoder(mismatched)


def test_export_checks_its_arguments(tmp_path):
    model = build_encoder("efficientface", 3, in_chans=1, **SMALL_EF)
    with pytest.raises(ValueError, match="1 value"):
        export_encoder(tmp_path / "x.pt", model, "efficientface", {}, ["a", "b", "c"], 32, True, [0.5, 0.5], [0.2])
    with pytest.raises(ValueError, match="2 class names for a 3-class network"):
        export_encoder(tmp_path / "x.pt", model, "efficientface", {}, ["a", "b"], 32, True, [0.5], [0.2])


def test_the_shipped_default_encoder_loads_and_describes_itself():
    enc = load_encoder("default")
    assert enc.classes == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    assert enc.feature_dim <= 1024 and enc.input_size == 48 and enc.grayscale
    assert 0 < enc.metrics["test"]["accuracy"] <= 1 and 0 < enc.metrics["test"]["uar"] <= 1
    assert enc.training["command"].startswith("avemo-train-face")
    assert (WEIGHTS_DIR / "default.pt").stat().st_size < 10 * 2**20
    crops = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    assert enc.embed(crops).shape == (3, enc.feature_dim)


def test_both_encoders_give_their_last_spatial_map_beside_the_pooled_feature():
    # EfficientFace: the pooled feature is the mean of the last map's cells
    ef = build_encoder("efficientface", 7, **SMALL_EF).eval()
    x = torch.randn(2, 3, 48, 48)
    feats, maps = ef.forward_features_and_maps(x)
    assert maps.shape[:2] == (2, ef.feature_dim)
    torch.testing.assert_close(feats, maps.mean((2, 3)))
    torch.testing.assert_close(feats, ef.forward_features(x))
    # TransFER: the class token, beside the encoder's output token of every stem cell (6 x 6 at 48 px)
    tf = build_encoder("transfer", 7).eval()
    feats, maps = tf.forward_features_and_maps(x)
    assert maps.shape == (2, tf.feature_dim, 6, 6)
    torch.testing.assert_close(feats, tf.forward_features(x))


def test_shipped_encoder_maps_are_3x3_cells_whose_mean_is_its_feature():
    enc = load_encoder("default")
    assert enc.map_grid == (3, 3)
    crops = np.random.default_rng(0).integers(0, 255, (3, 60, 60, 3), dtype=np.uint8)
    feats, maps = enc.embed_maps(crops)
    assert maps.shape == (3, 3, 3, enc.feature_dim)
    torch.testing.assert_close(feats, enc.embed(crops))
    torch.testing.assert_close(maps.mean((1, 2)), feats, atol=1e-5, rtol=1e-4)


def test_settings_that_name_a_replaced_shipped_encoder_find_it_by_its_hash():
    # caches and models made before `default` was replaced record the old file's hash under that name
    from avemo.encoders import file_sha256, load_named_encoder
    from avemo.extraction import ClipExtractor
    from avemo.features import ExtractionSettings
    old = file_sha256(WEIGHTS_DIR / "default-v1.pt")
    assert old != file_sha256(WEIGHTS_DIR / "default.pt")
    assert load_named_encoder("default", old).name == "default-v1"
    assert load_named_encoder("default", None).name == "default"
    extractor = ClipExtractor(ExtractionSettings(encoder="default", encoder_sha256=old), "cpu")
    assert extractor.encoder.sha256 == old and extractor.settings.encoder == "default"
    with pytest.raises(ValueError, match="not the one these settings were made with"):
        ClipExtractor(ExtractionSettings(encoder="default", encoder_sha256="0" * 64), "cpu")
