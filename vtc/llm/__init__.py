"""The language model's side, the same for every family: visual tokens removed from its input (prefill.py) or
between its decoder layers (layers.py), and decoding over the KV cache that leaves. The adapters decide what to keep.
"""
