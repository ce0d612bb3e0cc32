"""ArcFace (additive angular margin, Deng et al. 2019) as a Keras layer.

    emb = ...                                   # (B, D) embeddings (any scale)
    logits = ArcFace(num_classes)([emb, labels])  # (B, num_classes), float32
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

The layer holds the class centres W (D, num_classes). With x = emb / |emb| and
w_j = W[:, j] / |W[:, j]|, cos_j = x . w_j and, for the target class y only,

    phi = cos(theta_y + m) = cos_y cos(m) - sin_y sin(m)      where theta_y + m <= pi
    phi = cos_y - m sin(m)                                    past it (cos_y <= cos(pi - m))
    phi = cos(theta_y + m) if cos_y > 0 else cos_y            with easy_margin=True

logits = s * (one_hot(y) * phi + (1 - one_hot(y)) * cos). Called without labels
(inference) it returns s * cos, no margin. Defaults s=30, m=0.35 (the seed recipe);
s=64, m=0.5 is the paper's face-recognition setting.

No acos is taken, and sin = sqrt(max(1 - cos^2, eps)) keeps value and gradient
finite at |cos| = 1 exactly. All arithmetic is float32, also under a mixed
precision policy (the layer's dtype policy defaults to float32, inputs are cast).
"""

from __future__ import annotations

import math

import keras
from keras import ops

_SIN_SQ_EPS = 1e-7  # floor under 1 - cos^2 before the square root
_NORM_EPS = 1e-12


def _l2_normalize(x, axis):
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=axis, keepdims=True), _NORM_EPS))


@keras.saving.register_keras_serializable(package="embedding")
class ArcFace(keras.layers.Layer):
    """Class centres + ArcFace margin: ([embeddings (B, D), labels (B,)]) -> logits (B, C).

    Args:
        num_classes: number of identities (columns of the centre matrix).
        scale: s, the logit scale (30.0).
        margin: m, the additive angular margin in radians (0.35).
        easy_margin: apply the margin only where cos > 0 and otherwise leave the
            target logit unchanged, instead of the cos - m sin(m) fallback.
        centers_initializer: initializer of the (D, num_classes) centres.

    Call with a list `[embeddings, labels]` (labels: integer class ids, shape
    (B,) or (B, 1)) to train, or with the embeddings alone for the plain scaled
    cosine logits. Only the embedding model is needed at inference; this layer
    is the classifier used by the loss.
    """

    def __init__(
        self,
        num_classes: int,
        scale: float = 30.0,
        margin: float = 0.35,
        easy_margin: bool = False,
        centers_initializer="glorot_uniform",
        **kwargs,
    ):
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = "float32"  # keep the margin math in float32 under mixed precision
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin}.")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}.")
        self.num_classes = num_classes
        self.scale = float(scale)
        self.margin = float(margin)
        self.easy_margin = bool(easy_margin)
        self.centers_initializer = keras.initializers.get(centers_initializer)
        self._cos_m = math.cos(self.margin)
        self._sin_m = math.sin(self.margin)
        self._threshold = math.cos(math.pi - self.margin)  # theta + m > pi beyond this
        self._fallback = math.sin(math.pi - self.margin) * self.margin  # = m sin(m)

    def build(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        dim = input_shape[-1]
        if dim is None:
            raise ValueError("ArcFace needs a known embedding size (last axis).")
        self.centers = self.add_weight(
            name="centers",
            shape=(dim, self.num_classes),
            initializer=self.centers_initializer,
            dtype="float32",
        )

    def cosine(self, embeddings):
        """cos(theta) between each embedding and each centre: (B, D) -> (B, C), float32."""
        x = _l2_normalize(ops.cast(embeddings, "float32"), axis=-1)
        w = _l2_normalize(ops.cast(self.centers, "float32"), axis=0)
        return ops.matmul(x, w)

    def margin_cosine(self, cos):
        """phi(cos), the target-class value with the margin applied (elementwise)."""
        sin = ops.sqrt(ops.maximum(1.0 - ops.square(cos), _SIN_SQ_EPS))
        phi = cos * self._cos_m - sin * self._sin_m
        if self.easy_margin:
            return ops.where(cos > 0.0, phi, cos)
        return ops.where(cos > self._threshold, phi, cos - self._fallback)

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            if len(inputs) == 1:
                embeddings, labels = inputs[0], None
            else:
                embeddings, labels = inputs
        else:
            embeddings, labels = inputs, None
        cos = self.cosine(embeddings)
        if labels is None:
            return cos * self.scale
        labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
        target = ops.one_hot(labels, self.num_classes, dtype="float32")
        phi = self.margin_cosine(cos)
        logits = target * phi + (1.0 - target) * cos
        return logits * self.scale

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "scale": self.scale,
            "margin": self.margin,
            "easy_margin": self.easy_margin,
            "centers_initializer": keras.initializers.serialize(self.centers_initializer),
        }
