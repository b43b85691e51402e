"""Structured Tail-Aware Generation (STAG): prompts, validation, engines and the Ray pipeline.

An LLM turns each training image's labels (tail classes marked) and caption into a 50-80 word
scene description that describes the tail classes first and tags each as ``<tail> name </tail>``.
``prompt`` builds the chat messages, ``grammar`` the per-sample grammar and bad words of
constrained decoding, ``validate`` checks (and deterministically repairs) what came back; all
three are shared modules (no torch, vLLM, Ray or transformers at import time) and run in
either environment.
"""
