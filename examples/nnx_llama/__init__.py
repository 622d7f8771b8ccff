"""A Flax NNX Llama 3.1 and its adapter (every capability): the adapter path of docs/results.md."""
