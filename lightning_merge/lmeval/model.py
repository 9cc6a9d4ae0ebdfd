"""An lm-evaluation-harness model over the resident (merged, possibly sharded) model.

lm-eval's ``HFLM(pretrained=module)`` forces one process and cannot run under
FSDP or ZeRO-3. :class:`ResidentLM` is a ``TemplateLM`` that does what ``HFLM``
does, request for request, but hands every forward to a *runner*:

1. Plan, on every process alike: requests are tokenized as ``HFLM`` tokenizes
   them (the tokenizer's own BOS, left truncation to the model's positions),
   sorted and batched with lm-eval's own ``Collator`` (one row per group of
   one-token continuations that share a context), so the batches are exactly
   ``HFLM``'s at the same ``batch_size``.
2. Run: ``runner.map(fn, batches)`` returns every batch's output, in order. A
   :class:`LocalRunner` calls ``fn`` in this process; the Evaluator's runner
   (``evaluate.py``) deals the batches round-robin over the ranks, pads the
   shorter ranks with a dummy batch so that every rank runs the same number of
   forwards (what FSDP and ZeRO-3 need), and gathers the outputs.
3. Assemble, on every process alike, back in request order.

Because a batch is the same tensor whichever rank scores it, the per-request
log-likelihoods are bit for bit the same at 1, 2 or 3 ranks, and equal to
``HFLM``'s on the same model (tested). lm-eval itself sees one process
(``rank`` 0, ``world_size`` 1) on every rank: each rank builds the same
requests and computes the same metrics, and only the model calls are split.
Generation is greedy through ``model.generate`` with lm-eval's stop sequences;
with ``synced=True`` (sharded models) every rank keeps stepping until all are
done (``synced_gpus``).

Nothing here knows ranks or Lightning: that is the runner's business.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (Collator, _add_special_kwargs, configure_pad_token, handle_stop_sequences,
                                  has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text,
                                  resolve_max_length)
from lm_eval.models.utils_hf import pad_and_concat, stop_sequences_criteria

__all__ = ["Runner", "LocalRunner", "ScoreBatch", "GenerateBatch", "ResidentLM", "score_batch", "generate_batch",
           "deal", "collect"]

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # HFLM._DEFAULT_MAX_LENGTH: a config and tokenizer that name no length
_MAX_ENCODED = 2_000_000  # token-id lists kept across evaluations (about two encodings per request)


class Runner(Protocol):
    """Runs ``fn(model, item)`` for every item and returns the outputs in item order, on every process."""

    def map(self, fn: Callable[[torch.nn.Module, Any], Any], items: Sequence[Any]) -> list[Any]: ...


def deal(n: int, rank: int, world: int) -> list[int]:
    """The item indices rank ``rank`` of ``world`` runs: round-robin, padded with ``-1`` (a dummy run of item 0
    whose output is dropped) so that every rank runs ``ceil(n / world)`` items, the same number of forwards."""
    mine = list(range(rank, n, world))
    per = -(-n // world) if n else 0
    return mine + [-1] * (per - len(mine))


def collect(per_rank: Sequence[Sequence[tuple[int, Any]]], n: int) -> list[Any]:
    """Every rank's ``(index, output)`` pairs (dummies dropped) back in item order; each index exactly once."""
    out: list[Any] = [None] * n
    seen = [False] * n
    for pairs in per_rank:
        for i, value in pairs:
            if seen[i]:
                raise RuntimeError(f"item {i} was run by two ranks")
            out[i], seen[i] = value, True
    if not all(seen):
        raise RuntimeError(f"items {[i for i in range(n) if not seen[i]][:8]} were run by no rank")
    return out


class LocalRunner:
    """One process: calls ``fn`` on the model directly, under ``torch.no_grad``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def map(self, fn, items):
        with torch.no_grad():
            return [fn(self.model, item) for item in items]


@dataclass
class ScoreBatch:
    """One forward of log-likelihood rows: ``inps`` right-padded, and for each row its scored span.

    ``members[r]`` are the continuations scored from row ``r``'s logits (more than one when lm-eval's
    Collator groups one-token continuations that share a context).
    """

    inps: torch.Tensor
    inplens: list[int]
    contlens: list[int]
    members: list[list[list[int]]]


@dataclass
class GenerateBatch:
    """One ``generate`` call: left-padded contexts, their mask, and lm-eval's generation settings."""

    context: torch.Tensor
    attention_mask: torch.Tensor
    max_length: int
    until: list[str]
    kwargs: dict = field(default_factory=dict)


def score_batch(model: torch.nn.Module, b: ScoreBatch) -> list[list[tuple[float, bool]]]:
    """``(sum of log-probabilities, is greedy)`` of every member of every row, computed as HFLM does."""
    multi_logits = F.log_softmax(model(b.inps).logits, dim=-1)  # HFLM: self.model(inps).logits, no mask
    padlen = b.inps.shape[1]
    out = []
    for logits, inplen, contlen, members in zip(multi_logits, b.inplens, b.contlens, b.members, strict=True):
        ctx_len = inplen + (logits.shape[0] - padlen)
        logits = logits[ctx_len - contlen: ctx_len].unsqueeze(0)  # [1, seq, vocab]
        greedy_tokens = logits.argmax(dim=-1)
        row = []
        for cont in members:
            cont_toks = torch.tensor(cont, dtype=torch.long, device=logits.device).unsqueeze(0)
            max_equal = (greedy_tokens[:, -cont_toks.shape[1]:] == cont_toks).all()
            # HFLM's gather over the row's logits (a shorter member reads the first positions, as there)
            lp = torch.gather(logits, 2, cont_toks.unsqueeze(-1)).squeeze(-1)
            row.append((float(lp.sum()), bool(max_equal)))
        out.append(row)
    return out


def generate_batch(model: torch.nn.Module, b: GenerateBatch, *, tokenizer, synced: bool) -> list[list[int]]:
    """Greedy (or as lm-eval asks) generation of one batch; returns the generated token ids of each row."""
    kwargs = dict(b.kwargs)
    kwargs["temperature"] = kwargs.get("temperature", 0.0)  # HFLM._model_generate, verbatim in effect
    do_sample = kwargs.get("do_sample")
    if (temp := kwargs.get("temperature")) == 0.0 and do_sample is None:
        kwargs["do_sample"] = do_sample = False
    if do_sample is False and temp == 0.0:
        kwargs.pop("temperature", None)
    criteria = stop_sequences_criteria(tokenizer, b.until, b.context.shape[1], b.context.shape[0])
    out = model.generate(input_ids=b.context, attention_mask=b.attention_mask, max_length=b.max_length,
                         stopping_criteria=criteria, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                         synced_gpus=synced, **kwargs)
    return out[:, b.context.shape[1]:].tolist()


class ResidentLM(TemplateLM):
    """lm-eval's model interface over a model resident in this process (or sharded across ranks).

    ``config`` is the model's ``PretrainedConfig`` (for the maximum length), ``tokenizer`` the
    checkpoints' tokenizer, ``runner`` what runs the batches (:class:`LocalRunner`, or the Evaluator's).
    ``batch_size``, ``max_length``, ``add_bos_token`` and ``max_gen_toks`` mean what they mean for HFLM.
    Built once per run; the model it scores is whatever the runner's model holds at call time (the
    trial's merge).
    """

    def __init__(self, config, tokenizer, runner: Runner, *, batch_size: int = 8, max_length: int | None = None,
                 add_bos_token: bool | None = None, max_gen_toks: int = 256, synced: bool = False,
                 show_progress: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.tokenizer = configure_pad_token(tokenizer, model_config=config)
        self.runner = runner
        self._batch_size = int(batch_size)
        self._max_length = max_length
        self.add_bos_token = add_bos_token
        self._max_gen_toks = int(max_gen_toks)
        self.synced = synced
        self.show_progress = show_progress
        self.stats = {"forwards": 0, "rows": 0, "requests": 0, "generate_calls": 0}
        # Every trial of a search asks for the same prompts: their token ids are kept (by a digest of the
        # string), so a trial pays for its forwards, not for tokenizing the task again.
        self._encoded: dict[bytes, list[int]] = {}

    # --- what lm-eval asks of a model ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return resolve_max_length(self.config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """HFLM.tok_encode: the tokenizer's default special tokens unless told, no BOS twice."""
        key = hashlib.blake2b(string.encode("utf-8", "surrogatepass"), digest_size=20,
                              person=b"spec" if add_special_tokens is None else b"bos%d" % add_special_tokens).digest()
        cached = self._encoded.get(key)
        if cached is None:
            special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                special["add_special_tokens"] = False
            cached = self.tokenizer.encode(string, **special)
            if len(self._encoded) >= _MAX_ENCODED:
                self._encoded.clear()
            self._encoded[key] = cached
        encoding = list(cached)
        if left_truncate_len:
            encoding = encoding[-left_truncate_len:]
        return encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- log-likelihood -----------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """TemplateLM's tokenization of ``(context, continuation)`` pairs (its bar only with ``show_progress``)."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def _plan_scores(self, requests: list[tuple], batch_size: int | None = None):
        """HFLM's batches for ``requests`` (``(strings, context_enc, continuation_enc)``), and the row groups."""
        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _group(req):
            return req[-2] + req[-1][:-1]

        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts", group_fn=_group)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(tuple(_group(req)), []).append(i)
        batches, rows = [], []
        for chunk in re_ord.get_batched(n=batch_size or self.batch_size):
            inps, inplens, contlens, members, chunk_rows = [], [], [], [], []
            for _, context_enc, continuation_enc in chunk:
                if not context_enc or not continuation_enc:
                    raise ValueError("lm-eval sent a request with an empty context or continuation")
                if len(continuation_enc) > self.max_length:
                    raise ValueError(f"a continuation of {len(continuation_enc)} tokens is longer than the "
                                     f"model's {self.max_length} positions")
                total = len(context_enc) + len(continuation_enc)
                if total > self.max_length + 1:
                    log.debug("request of %d tokens left-truncated to the model's %d", total, self.max_length)
                inp = torch.tensor((context_enc + continuation_enc)[-(self.max_length + 1):][:-1], dtype=torch.long)
                idx = groups[tuple(_group((None, context_enc, continuation_enc)))]
                inps.append(inp)
                inplens.append(inp.shape[0])
                contlens.append(len(continuation_enc))
                members.append([requests[i][2] for i in idx])
                chunk_rows.append(idx)
            padlen = max(inplens)
            batches.append(ScoreBatch(pad_and_concat(padlen, inps, padding_side="right"), inplens, contlens,
                                      members))
            rows.append(chunk_rows)
        return batches, rows

    def _run_scores(self, plans: list[tuple[list[ScoreBatch], list]], sizes: list[int]) -> list[list]:
        """Score every plan's batches in one run (one pass over the ranks); results per plan, in request order."""
        flat = [b for batches, _ in plans for b in batches]
        outs = self.runner.map(score_batch, flat) if flat else []
        self.stats["forwards"] += len(flat)
        self.stats["rows"] += sum(b.inps.shape[0] for b in flat)
        results, k = [], 0
        for (batches, rows), n in zip(plans, sizes, strict=True):
            res: list[Any] = [None] * n
            for chunk_rows in rows:
                for idx, row_out in zip(chunk_rows, outs[k], strict=True):
                    for i, value in zip(idx, row_out, strict=True):
                        res[i] = value
                k += 1
            if any(r is None for r in res):
                raise RuntimeError("a log-likelihood request got no result")
            results.append(res)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        self.stats["requests"] += len(requests)
        plan = self._plan_scores(list(requests), override_bs)
        res = self._run_scores([plan], [len(requests)])[0]
        for (strings, _, _), answer in zip(requests, res, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows, batched ``batch_size`` windows at a time, scored in one run."""
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            rolling = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)))
            windows.extend((None,) + w for w in rolling)
            counts.append(len(rolling))
        self.stats["requests"] += len(windows)
        groups = [windows[i: i + self.batch_size] for i in range(0, len(windows), self.batch_size)]
        plans = [self._plan_scores(g, len(g)) for g in groups]
        per_window = [v for res in self._run_scores(plans, [len(g) for g in groups]) for v in res]
        out, k = [], 0
        for req, n in zip(requests, counts, strict=True):
            total = sum(v[0] for v in per_window[k: k + n])
            k += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    # --- generation ---------------------------------------------------------------------------
    def _encode_contexts(self, contexts: list[str], left_truncate_len: int):
        """HFLM.tok_batch_encode: left padding, the tokenizer's default BOS unless told, left truncation."""
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            special: dict = {}
            if has_bos_prefix(contexts[0], getattr(self.tokenizer, "bos_token", None)):
                special = {"add_special_tokens": False}
            elif self.add_bos_token is not None:
                special = {"add_special_tokens": self.add_bos_token}
            enc = self.tokenizer(contexts, truncation=False, padding="longest", return_tensors="pt", **special)
        finally:
            self.tokenizer.padding_side = old
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if left_truncate_len and ids.shape[1] > left_truncate_len:
            log.warning("generation context of %d tokens left-truncated to %d", ids.shape[1], left_truncate_len)
            ids, mask = ids[:, -left_truncate_len:], mask[:, -left_truncate_len:]
        return ids, mask

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        def _collate(req):
            return -len(self.tok_encode(req[0])), req[0]

        re_ords = Collator([req.args for req in requests], sort_fn=_collate, group_by="gen_kwargs",
                           group_fn=lambda x: x[1])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        batches, meta = [], []
        for chunk in re_ords.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise ValueError(f"the task asks for {max_gen_toks} new tokens, more than the model's "
                                 f"{self.max_length} positions")
            ids, mask = self._encode_contexts(list(contexts), max_ctx_len)
            max_length = kwargs.pop("max_length", ids.shape[1] + max_gen_toks)
            batches.append(GenerateBatch(ids, mask, int(max_length), until, dict(kwargs)))
            meta.append((contexts, all_kwargs[0], until))
        fn = partial(generate_batch, tokenizer=self.tokenizer, synced=self.synced)
        outs = self.runner.map(fn, batches) if batches else []
        self.stats["generate_calls"] += len(batches)
        res = []
        for (contexts, gen_kwargs, until), toks_list in zip(meta, outs, strict=True):
            for context, toks in zip(contexts, toks_list, strict=True):
                s = postprocess_generated_text(generation=self.tok_decode(toks), stop=until, think_end_token=None)
                res.append(s)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), s)
        return re_ords.get_original(res)
