"""Integrations of linattn's kernels into other libraries' models.

Each integration is its own module, imported explicitly; importing one switches nothing
until its ``enable()`` runs, and the library core never imports these modules.

- :mod:`linattn.integrations.transformers`: Hugging Face transformers' Qwen3-Next, Kimi
  Linear and Nemotron-H on linattn's kernels, packed sequences included.
"""
