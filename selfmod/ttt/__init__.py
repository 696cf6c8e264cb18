"""Test-time training: layers whose forward pass trains an inner model on the input sequence.

Functional primitives (attention formulas, ``ttt_linear``, ``ttt_mlp``) live in
:mod:`selfmod.ttt.functional`; ``nn.Module`` layers and small models wrap them.

References: Sun et al., arXiv 2310.13807 (MTTT); Sun et al., arXiv 2407.04620 (TTT layers).
"""

from selfmod.ttt.functional import (
    init_mlp,
    linear_attention,
    nadaraya_watson,
    softmax_attention,
    ttt_causal_scan,
    ttt_inner_loop,
    ttt_linear,
    ttt_mlp,
)
from selfmod.ttt.layers import (
    MTTTMLP,
    TTTMLP,
    ConvMixer,
    LinearAttention,
    MTTTLinear,
    SoftmaxAttention,
    TTTLinear,
    gaussian_noise,
    random_mask,
)
from selfmod.ttt.models import (
    MIXERS,
    Block,
    CausalLM,
    SequenceClassifier,
    make_mixer,
    mixer_choice,
)

__all__ = [
    "MIXERS",
    "MTTTMLP",
    "TTTMLP",
    "Block",
    "CausalLM",
    "ConvMixer",
    "LinearAttention",
    "MTTTLinear",
    "SequenceClassifier",
    "SoftmaxAttention",
    "TTTLinear",
    "gaussian_noise",
    "init_mlp",
    "linear_attention",
    "make_mixer",
    "mixer_choice",
    "nadaraya_watson",
    "random_mask",
    "softmax_attention",
    "ttt_causal_scan",
    "ttt_inner_loop",
    "ttt_linear",
    "ttt_mlp",
]
