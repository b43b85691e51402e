"""The per-row logic of STAG, without Ray: prompt, generate, validate, repair, retry, fall back.

A Ray actor (``ray_pool``) wraps a :class:`Describer` around its engine; tests and benchmarks
use one directly, in either environment, with no cluster.

An image without labels is not sent to the engine (reason ``no_labels``) and goes straight to
the fallback; a prompt too long for the model is not retried.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from ltdist.labels import LabelSpace
from ltdist.stag.config import NOT_DESCRIBED, StagConfig
from ltdist.stag.engines import (
    PROMPT_TOO_LONG,
    Engine,
    GenerationRequest,
    TemplateEngine,
    build_engine,
)
from ltdist.stag.grammar import GrammarCache, banned_words
from ltdist.stag.prompt import build_messages, chat_prompt
from ltdist.stag.validate import repair, validate

TRUNCATED = "truncated"  # the reason given to a text that hit engine.max_tokens


def wants_description(cfg: StagConfig, space: LabelSpace, label_ids: Iterable[int]) -> bool:
    """Whether an image goes to the engine: always with ``describe: all``; with ``tail`` when
    it has a tail label (by the training split's label space, as its ``tail_labels``)."""
    return cfg.describe == "all" or any(space.is_tail(int(i)) for i in label_ids)


def derive_seed(seed: int, key: str, attempt: int) -> int:
    """The sampling seed of one attempt: a hash of (config seed, key, attempt), 31 bits."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class RowResult:
    """What the actor returns for one input row."""

    key: str
    shard: int
    status: str = ""
    description: str | None = None  # tags kept; None when there is none
    text: str | None = None  # markup stripped (what training reads); None: use the caption
    attempts: int = 0
    reasons: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    # 'first_try' | 'repair' (first generation, repaired) | 'retry' (a later one) | '' (none)
    stage: str = ""
    # per generation: word count (markup stripped), repetition, named an absent class
    words: list[int] = field(default_factory=list)
    repetition: list[float] = field(default_factory=list)
    hallucinated: int = 0
    grammars_built: int = 0  # distinct grammars the actor's Describer had built so far
    prompt_tokens: int = 0
    generated_tokens: int = 0
    engine: str = ""
    worker: str = ""  # JSON: pid, node, actor id and GPU ids of the actor that did it


class Describer:
    """Prompts, generation, validation, retries and fallback for a batch of rows.

    A row is ``{"key", "shard", "label_ids", "caption"}``. Every row gets up to
    ``max_attempts`` generations (attempt a seeded with ``derive_seed(engine.seed, key, a)``);
    only the rows still invalid go to the next attempt, so one engine call serves the whole
    batch per attempt. A prompt that does not fit the model is not retried. With
    ``constrain.grammar`` a model engine gets each row's grammar (one per tail set, built once)
    and with ``constrain.ban_absent_classes`` the names of the classes the image lacks as bad
    words; with ``repair`` an invalid text is repaired and validated again before a retry.

    Without an engine it writes only the texts of rows that are not described
    (:meth:`not_described`).
    """

    def __init__(self, cfg: StagConfig, space: LabelSpace, engine: Engine | None = None):
        self.cfg, self.space, self.engine = cfg, space, engine
        words = dict(min_words=cfg.validation.min_words, max_words=cfg.validation.max_words)
        self.fallback_writer = TemplateEngine(None, **words)
        # template texts need no constraint
        model_engine = engine is not None and engine.name != TemplateEngine.name
        self.grammars = (
            GrammarCache(cfg.constrain, **words) if model_engine and cfg.constrain.grammar else None
        )
        self.ban = model_engine and cfg.constrain.ban_absent_classes

    def prompt(self, label_ids: list[int], caption: str | None) -> str:
        messages = build_messages(label_ids, caption, self.space, self.cfg.prompt)
        if self.engine.tokenizer is None:  # the template engine reads labels, not prompts
            return messages[-1]["content"]
        return chat_prompt(messages, self.engine.tokenizer)

    def _request(
        self, row: dict, prompt: str, attempt: int, constraints: dict | None = None
    ) -> GenerationRequest:
        ids = sorted(set(row["label_ids"]))  # the prompt's order: tails by class id
        names = self.space.display_names
        return GenerationRequest(
            key=row["key"],
            prompt=prompt,
            seed=derive_seed(self.cfg.engine.seed, row["key"], attempt),
            labels=[names[i] for i in ids],
            tail_labels=[names[i] for i in ids if self.space.is_tail(i)],
            **(constraints or {}),
        )

    def _constraints(self, row: dict) -> dict:
        """A row's grammar and banned words (the same for all its attempts)."""
        ids = sorted(set(row["label_ids"]))
        tails = [self.space.display_names[i] for i in ids if self.space.is_tail(i)]
        return {
            "grammar": self.grammars.get(tails) if self.grammars else None,
            "banned_words": (
                banned_words(ids, self.space, allow_parts_of_present=self.grammars is None)
                if self.ban
                else None
            ),
        }

    def describe(self, rows: list[dict]) -> list[RowResult]:
        if self.engine is None:
            raise RuntimeError("Describer.describe needs an engine")
        results = [RowResult(r["key"], int(r["shard"]), engine=self.engine.name) for r in rows]
        # an image without labels has nothing to describe: straight to the fallback
        pending = [i for i, r in enumerate(rows) if r["label_ids"]]
        for i, res in enumerate(results):
            if not rows[i]["label_ids"]:
                res.reasons = ["no_labels"]
        prompts = {i: self.prompt(rows[i]["label_ids"], rows[i]["caption"]) for i in pending}
        constraints = {i: self._constraints(rows[i]) for i in pending}
        for attempt in range(self.cfg.max_attempts):
            if not pending:
                break
            requests = [
                self._request(rows[i], prompts[i], attempt, constraints[i]) for i in pending
            ]
            self._record(requests, attempt)
            generations = self.engine.generate(requests)
            if [g.key for g in generations] != [q.key for q in requests]:
                raise RuntimeError(
                    f"engine {self.engine.name} returned {len(generations)} generations out of "
                    f"order for {len(requests)} requests"
                )
            still = []
            for i, gen in zip(pending, generations):
                res = results[i]
                res.attempts += 1
                res.prompt_tokens += gen.num_prompt_tokens
                res.generated_tokens += gen.num_tokens
                if gen.finish_reason == PROMPT_TOO_LONG:
                    res.reasons = [PROMPT_TOO_LONG]
                    continue  # the same prompt will not fit next time either
                ids = rows[i]["label_ids"]
                verdict = validate(gen.text, ids, self.space, self.cfg.validation)
                res.words.append(verdict.word_count)
                res.repetition.append(round(verdict.repetition, 4))
                res.hallucinated += bool(verdict.hallucinated)
                res.reasons = list(verdict.reasons)
                truncated = gen.finish_reason == "length" and self.cfg.reject_truncated
                if truncated:
                    res.reasons.append(TRUNCATED)
                elif not verdict.valid and self.cfg.repair:
                    fixed = repair(gen.text, ids, self.space)
                    if fixed.repairs:
                        again = validate(fixed.text, ids, self.space, self.cfg.validation)
                        if again.valid:
                            verdict, res.repairs = again, fixed.repairs
                if verdict.valid and not truncated:
                    res.status = "generated"
                    res.stage = "retry" if attempt else ("repair" if res.repairs else "first_try")
                    res.description, res.text = verdict.description, verdict.text
                else:
                    still.append(i)
            pending = still
        built = self.grammars.builds if self.grammars else 0
        for i, res in enumerate(results):
            res.grammars_built = built
            if not res.status:
                self._fall_back(rows[i], res)
        return results

    def _fall_back(self, row: dict, res: RowResult) -> None:
        caption = (row["caption"] or "").strip()
        if self.cfg.fallback == "drop":
            res.status = "dropped"
        elif self.cfg.fallback == "caption" and caption:
            res.status, res.text = "fallback_caption", caption
        else:  # 'template', or 'caption' for an image without one
            res.status = "fallback_template"
            res.description, res.text = self._template(row)

    def _template(self, row: dict) -> tuple[str | None, str]:
        """The rule-based writer's (description, text) for a row."""
        request = self._request(row, "", self.cfg.max_attempts)
        gen = self.fallback_writer.generate([request])[0]
        verdict = validate(gen.text, row["label_ids"], self.space, self.cfg.validation)
        return verdict.description, verdict.text

    def not_described(self, row: dict) -> RowResult:
        """A row that ``describe: tail`` keeps from the engine: written with its caption as the
        text (the ``fallback: caption`` text), the template writer's text when it has none;
        no attempts, no description."""
        res = RowResult(
            row["key"],
            int(row["shard"]),
            status=NOT_DESCRIBED,
            stage=NOT_DESCRIBED,
            engine=self.cfg.engine.kind,
        )
        res.text = (row["caption"] or "").strip() or self._template(row)[1]
        return res

    def _record(self, requests: list[GenerationRequest], attempt: int) -> None:
        if not self.cfg.record_requests:
            return
        line = json.dumps(
            {"pid": os.getpid(), "attempt": attempt, "keys": [q.key for q in requests]}
        )
        with open(self.cfg.record_requests, "a") as f:  # one append per batch
            f.write(line + "\n")


def make_engine(cfg: StagConfig) -> Engine:
    """The configured engine; the template engine writes to the validation's word range."""
    if cfg.engine.kind == "template":
        return TemplateEngine(
            cfg.engine, min_words=cfg.validation.min_words, max_words=cfg.validation.max_words
        )
    return build_engine(cfg.engine)
