"""Images to L2-normalised ConvNeXt embeddings, cosine verification and its metrics."""
