"""Implementations under test behind one protocol (adapters/protocol.py): the suite drives whatever `--impl`
names through it. The built-in model's adapter lives beside the model (tp_llama/adapter.py); shipped adapters
of public libraries live here."""
