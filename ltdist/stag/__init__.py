"""Structured Tail-Aware Generation (STAG): prompts, validation, engines and the Ray pipeline.

An LLM turns each training image's labels (tail classes marked) and caption into a 50-80 word
scene description that describes the tail classes first and tags each as ``<tail> name </tail>``.
``prompt`` builds the chat messages, ``grammar`` the per-sample grammar and bad words of
constrained decoding, ``validate`` checks (and deterministically repairs) what came back.
The job (``pipeline.run_stag``) is composed of ``config``, ``describe`` (the per-row logic),
``ray_pool`` (the only module that uses Ray), ``watchdog`` (a stalled engine is restarted,
a batch that keeps failing given up), ``publish`` (shards) and ``report``. Every
module imports in either environment: torch, vLLM, Ray and transformers are imported only
where an engine or the actor pool starts.
"""
