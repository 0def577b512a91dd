"""The fused audio-visual model (Deep Fusion spine), its parts by name, and its checkpoints."""
from avemo.model.attention import ScaledSoftmaxAttention, masked_softmax
from avemo.model.audio import FCNAudioStream
from avemo.model.fusion import FUSIONS, ConcatFusion, FactorizedBilinearPooling, ProductOfExperts
from avemo.model.losses import LOSSES, CompactSoftmaxCE, build_loss
from avemo.model.net import (DEFAULT_MODEL, MODALITIES, MODEL_KIND, MODEL_VERSION, AVEmoNet, Ensemble, ModelConfig,
                             available_models, build_model, build_video_stream, load_model, resolve_model_path,
                             save_model)
from avemo.model.video import (STT_TOKENS, VIDEO_STREAMS, AttentionVideoStream, CellSpatioTemporalStream,
                               FrameAttentionStream, MeanVideoStream, SpatioTemporalStream)

__all__ = [
    "ScaledSoftmaxAttention", "masked_softmax", "FCNAudioStream", "FUSIONS", "ConcatFusion",
    "FactorizedBilinearPooling", "ProductOfExperts", "LOSSES", "CompactSoftmaxCE", "build_loss", "MODALITIES", "MODEL_KIND",
    "MODEL_VERSION", "DEFAULT_MODEL", "AVEmoNet", "Ensemble", "ModelConfig", "available_models", "build_model",
    "build_video_stream", "load_model", "resolve_model_path", "save_model",
    "VIDEO_STREAMS", "AttentionVideoStream", "FrameAttentionStream", "MeanVideoStream", "SpatioTemporalStream",
    "STT_TOKENS", "CellSpatioTemporalStream",
]
