"""The fused audio-visual model (Deep Fusion spine), its parts by name, and its checkpoints."""
from avemo.model.attention import ScaledSoftmaxAttention, masked_softmax
from avemo.model.audio import FCNAudioStream
from avemo.model.fusion import FUSIONS, ConcatFusion, FactorizedBilinearPooling
from avemo.model.losses import LOSSES, CompactSoftmaxCE, build_loss
from avemo.model.net import (MODALITIES, MODEL_KIND, MODEL_VERSION, AVEmoNet, Ensemble, ModelConfig, build_model,
                             build_video_stream, load_model, save_model)
from avemo.model.video import VIDEO_STREAMS, AttentionVideoStream, FrameAttentionStream, SpatioTemporalStream

__all__ = [
    "ScaledSoftmaxAttention", "masked_softmax", "FCNAudioStream", "FUSIONS", "ConcatFusion",
    "FactorizedBilinearPooling", "LOSSES", "CompactSoftmaxCE", "build_loss", "MODALITIES", "MODEL_KIND",
    "MODEL_VERSION", "AVEmoNet", "Ensemble", "ModelConfig", "build_model", "build_video_stream", "load_model", "save_model",
    "VIDEO_STREAMS", "AttentionVideoStream", "FrameAttentionStream", "SpatioTemporalStream",
]
