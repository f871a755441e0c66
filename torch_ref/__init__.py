"""The PyTorch reference path (bitsandbytes, PEFT, transformers builders, a torch training loop) that
parity_tests/ and benchmarks/ compare jaxlora against. Not part of the jaxlora wheel: it is imported from
the repository root. Importing it changes no global state (torch threads, environment); the callers set
what they need (parity_tests/conftest.py)."""
