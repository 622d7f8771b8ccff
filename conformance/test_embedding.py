"""The token embedding lookup of the implementation under test, its vocabulary split over the model axis: tokens
drawn from the whole vocabulary, so every shard's slice is read, must come back as exactly their rows."""
from conformance.components import EMBEDDING


def test_embedding(judge):
    judge.check(EMBEDDING, seq=64)
