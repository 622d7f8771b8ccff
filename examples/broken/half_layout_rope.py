"""Broken on purpose: captures q_rope in the model's own rotate-half layout (see examples/broken/__init__.py)."""
from examples.simple_llama.adapter import SimpleLlamaAdapter
from examples.simple_llama.model import interleaved_to_halves


class HalfLayoutRoPEAdapter(SimpleLlamaAdapter):
    """examples.simple_llama rotates q and k as halves (i, i + head_dim/2) and converts them back to Meta's
    interleaved pairs for capture; this one hands q_rope over before the conversion (k_rope stays right)."""

    def forward(self, tokens, start_pos=0, capture=False):
        out = super().forward(tokens, start_pos, capture)
        if not capture:
            return out
        logits, taps = out
        return logits, {name: interleaved_to_halves(value) if name.endswith(".q_rope") else value
                        for name, value in taps.items()}
